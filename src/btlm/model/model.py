"""BTLM-3B-8k, top to bottom: config, ALiBi, attention, MLP, block, model, LM head.

A from-scratch, `transformers`-native re-implementation of Cerebras' ``modeling_btlm.py`` (the remote code
of ``cerebras/btlm-3b-8k-base``). It keeps the released module tree, parameter names and GPT-2 ``Conv1D``
weight layout ``[in, out]``, so the released checkpoint loads unchanged, and it computes the same logits.
The math is the remote code's in eval mode, quirks included; the comment at each quirk says what it is.

Two attention paths share one ALiBi implementation (:func:`alibi_bias`):

* ``"eager"`` — the plain reference: full ``[B, H, T, K]`` scores in the order of the original
  (scale, causal ``where``, + padding mask, + ALiBi, softmax). This is what the remote code does.
* ``"sdpa"`` (default) — :func:`torch.nn.functional.scaled_dot_product_attention` over query chunks whose
  ALiBi bias + mask is built in the compute dtype, so the extra memory per layer is bounded by the chunk
  size instead of ``O(H·T²)`` fp32; each chunk only reads the keys its causal window can see. When
  gradients are needed the backward pass recomputes each chunk, its bias included, instead of keeping it
  (autograd would otherwise hold every chunk's bias, ``H·T²/2`` values per layer), so a training step's
  memory grows linearly in T.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def validate_alibi_scaling(alibi_scaling: Any) -> None:
    """Validate ``alibi_scaling`` exactly like the original ``BTLMConfig._alibi_scaling_validation``.

    ``None``, or a dict with exactly two keys: ``type`` (must be ``"linear"``) and either ``factor`` (a
    float > 1, fixed interpolation; an int such as ``4`` is rejected as in the original) or
    ``train_seq_len`` (an int > 1, dynamic interpolation).
    """
    if alibi_scaling is None:
        return
    if not isinstance(alibi_scaling, dict) or len(alibi_scaling) != 2:
        raise ValueError(
            "`alibi_scaling` must be a dict with two fields, `type` and `factor` or `type` and "
            f"`train_seq_len`, got {alibi_scaling!r}"
        )
    scaling_type = alibi_scaling.get("type")
    factor = alibi_scaling.get("factor")
    train_seq_len = alibi_scaling.get("train_seq_len")
    if scaling_type != "linear":
        raise ValueError(f"`alibi_scaling['type']` must be 'linear', got {scaling_type!r}")
    if factor is None and train_seq_len is None:
        raise ValueError(f"`alibi_scaling` needs `factor` or `train_seq_len` besides `type`, got {alibi_scaling!r}")
    if factor is not None and not (isinstance(factor, float) and factor > 1.0):
        raise ValueError(f"`alibi_scaling['factor']` must be a float > 1.0 (e.g. 4.0), got {factor!r}")
    if train_seq_len is not None and not (
        isinstance(train_seq_len, int) and not isinstance(train_seq_len, bool) and train_seq_len > 1
    ):
        raise ValueError(f"`alibi_scaling['train_seq_len']` must be an integer > 1, got {train_seq_len!r}")


class BTLMConfig(PreTrainedConfig):
    """Configuration of a BTLM model; the fields and defaults of the original ``BTLMConfig``.

    The defaults are GPT-2's (as in the original); the released 3B values are :data:`PRESETS` ``"3b"``.
    ``attn_chunk_size`` is this implementation's only addition: the longest query chunk of the default
    SDPA attention path (memory per layer is bounded by it; it does not change results).
    """

    model_type = "btlm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    position_embedding_type: str = "learned"
    mup_width_scale: float = 1.0
    mup_embeddings_scale: float = 1.0
    mup_output_alpha: float = 1.0
    mup_scale_qk_dot_by_d: bool = False
    alibi_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attn_chunk_size: int = 1024

    def __post_init__(self, **kwargs):
        validate_alibi_scaling(self.alibi_scaling)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.position_embedding_type not in ("alibi", "learned"):
            raise ValueError(f"position_embedding_type must be 'alibi' or 'learned', got {self.position_embedding_type!r}")
        if self.attn_chunk_size < 1:
            raise ValueError(f"attn_chunk_size must be >= 1, got {self.attn_chunk_size}")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def output_logits_scale(self) -> float:
        """The muP output multiplier applied to the logits (0.222 for BTLM-3B)."""
        return self.mup_output_alpha * self.mup_width_scale


_BTLM_COMMON = dict(
    activation_function="swiglu",
    position_embedding_type="alibi",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    initializer_range=0.073,
    mup_embeddings_scale=14.6,
    mup_output_alpha=2.22,
    mup_scale_qk_dot_by_d=True,
    vocab_size=50257,
    n_positions=8192,
    architectures=["BTLMLMHeadModel"],
)

#: Named model shapes. ``3b`` is the released ``cerebras/btlm-3b-8k-base`` config; ``mup_width_scale``
#: follows the muP base width 256 of BTLM (256 / n_embd), and n_inner ≈ 8/3·n_embd as in the release.
PRESETS: dict[str, dict] = {
    "3b": dict(_BTLM_COMMON, n_embd=2560, n_layer=32, n_head=32, n_inner=6826, mup_width_scale=0.1,
               mup_output_alpha=2.2200000000000003),
    "small": dict(_BTLM_COMMON, n_embd=768, n_layer=12, n_head=12, n_inner=2048, mup_width_scale=256 / 768),
    "tiny": dict(_BTLM_COMMON, n_embd=64, n_layer=2, n_head=4, n_inner=170, mup_width_scale=1.0),
}


def config_from_preset(name: str, **overrides) -> BTLMConfig:
    """Return a :class:`BTLMConfig` for a named preset (``tiny``, ``small``, ``3b``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return BTLMConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------------
# ALiBi — the one implementation every attention path uses
# --------------------------------------------------------------------------------------------------


def alibi_slopes(n_head: int) -> list[float]:
    """ALiBi head slopes ``m_h``: ``2^(-8(h+1)/n)`` for a power-of-two ``n``; otherwise the slopes of the
    nearest lower power of two followed by the even-indexed slopes of twice that, truncated."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return power_of_2(n_head)
    closest = 2 ** math.floor(math.log2(n_head))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_head - closest]


def alibi_divisor(alibi_scaling: dict | None, key_length: int) -> float:
    """Position-interpolation divisor ``s`` of the slopes for a forward over ``key_length`` keys.

    Fixed (``factor``): ``s = factor`` at every length. Dynamic (``train_seq_len``): ``s = K /
    train_seq_len`` when ``K > train_seq_len`` (strictly), else 1. ``K`` counts cached keys and padding,
    as in the original, so left padding can change the divisor.
    """
    if alibi_scaling is None:
        return 1.0
    if alibi_scaling.get("factor") is not None:
        return alibi_scaling["factor"]
    train_seq_len = alibi_scaling["train_seq_len"]
    return key_length / train_seq_len if key_length > train_seq_len else 1.0


def alibi_bias(slopes: torch.Tensor, q_start: int, q_len: int, k_len: int, divisor: float, dtype) -> torch.Tensor:
    """ALiBi bias ``bias[h, i, j] = (m_h / -s) · |j - i|`` for query rows ``q_start…q_start+q_len-1`` and key
    columns ``0…k_len-1``, shape ``[H, q_len, k_len]``, computed in ``dtype`` in the original's order of
    operations (slopes divided first, then times the integer distance) so bf16 rounds the same way."""
    device = slopes.device
    rows = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    distance = (cols - rows).abs()
    # The slopes are fixed (``from_pretrained`` may mark them trainable): a bias that required grad would
    # make attention compute and keep an [H, q, k] bias gradient per layer.
    return (slopes.detach().to(dtype) / -divisor).unsqueeze(1) * distance


class AlibiPositionEmbeddingLayer(nn.Module):
    """Holds the ALiBi ``slopes`` ``[H, 1]`` as the checkpoint does: a frozen parameter.

    The released checkpoint stores bf16-rounded slopes (0.83984375, not 0.8409…); they are used as stored,
    which is what the original computes. Fresh models get the exact slopes from ``_init_weights``.
    """

    def __init__(self, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.slopes = nn.Parameter(torch.tensor(alibi_slopes(n_head)).unsqueeze(-1), requires_grad=False)

    def __setattr__(self, name, value):
        # Loading (from_pretrained) replaces the Parameter with a new one that has requires_grad=True;
        # keep every slopes Parameter frozen, so no optimizer (even AdamW(model.parameters())) moves them.
        if name == "slopes" and isinstance(value, nn.Parameter):
            value.requires_grad_(False)
        super().__setattr__(name, value)

    def forward(self, q_start: int, q_len: int, k_len: int, divisor: float, dtype) -> torch.Tensor:
        return alibi_bias(self.slopes, q_start, q_len, k_len, divisor, dtype)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------

# Upper bound on the elements of one chunk's bias+mask tensor [B, H, chunk, K] in the SDPA path
# (2^25 fp32 elements = 128 MiB): long inputs get shorter query chunks instead of more memory.
_SDPA_BIAS_BUDGET = 1 << 25


class BTLMAttention(nn.Module):
    """Multi-head self-attention with ALiBi, GPT-2 ``Conv1D`` projections and a muP ``1/d`` score scale."""

    def __init__(self, config: BTLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.head_dim, self.embed_dim = config.n_head, config.head_dim, config.n_embd
        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # muP: scores are divided by d (not √d) when mup_scale_qk_dot_by_d; BTLM-3B divides by 80.
        self.attn_scale_power = 1.0 if config.mup_scale_qk_dot_by_d else 0.5

    def score_divisor(self) -> float:
        divisor = self.head_dim**self.attn_scale_power if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            divisor *= self.layer_idx + 1
        return divisor

    def forward(self, hidden_states, attn_context: dict, past_key_values: Cache | None = None):
        B, T, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past_key_values is not None:
            # The cached K/V are used as given (never recomputed): with dynamic interpolation this is
            # what makes cached decoding depend on history, exactly as in the original.
            k, v = past_key_values.update(k, v, self.layer_idx)
            # A static (pre-allocated) cache returns all its max_cache_len slots; the first K are filled.
            k, v = k[:, :, : attn_context["key_length"]], v[:, :, : attn_context["key_length"]]
        if self.config._attn_implementation == "eager":
            out = self._eager(q, k, v, attn_context)
        else:
            out = self._sdpa_chunked(q, k, v, attn_context)
        out = out.transpose(1, 2).reshape(B, T, self.embed_dim)
        return self.resid_dropout(self.c_proj(out))

    def _eager(self, q, k, v, ctx):
        """The original ``_attn``: scale, causal ``where``, + padding mask, + ALiBi, softmax."""
        T, K = q.shape[-2], k.shape[-2]
        if self.config.reorder_and_upcast_attn:  # numerics only: scores and softmax in fp32
            q, k = q.float(), k.float()
        scores = q @ k.transpose(-1, -2)
        scores = scores / torch.full([], self.score_divisor(), dtype=scores.dtype, device=scores.device)
        causal = torch.ones(T, K, dtype=torch.bool, device=q.device).tril(K - T)
        min_value = torch.finfo(scores.dtype).min
        scores = torch.where(causal, scores, torch.full([], min_value, dtype=scores.dtype, device=q.device))
        if ctx["key_mask"] is not None:
            pad = (1.0 - ctx["key_mask"][:, None, None, :].to(scores.dtype)) * min_value
            scores = scores + pad
        if ctx["alibi"] is not None:
            scores = scores + ctx["alibi"](K - T, T, K, ctx["divisor"], scores.dtype).unsqueeze(0)
        probs = self.attn_dropout(F.softmax(scores, dim=-1).to(v.dtype))
        return probs @ v

    def _sdpa_chunked(self, q, k, v, ctx):
        """SDPA over query chunks with an additive bias = ALiBi where allowed, ``finfo.min`` where masked.

        Chunk ``[c0, c1)`` of the T new queries sits at absolute rows ``P+c0…P+c1-1`` and can only see keys
        ``< P+c1`` (causal), so only those are read. Masked entries get ``finfo.min`` rather than ``-inf`` so a
        fully padded query row stays finite (its output is garbage, as in the original)."""
        B, H, T, d = q.shape
        K = k.shape[-2]
        P = K - T
        key_mask = ctx["key_mask"]
        mask_batch = B if key_mask is not None else 1
        chunk = max(1, min(self.config.attn_chunk_size, _SDPA_BIAS_BUDGET // max(1, mask_batch * H * K)))
        scale = 1.0 / self.score_divisor()
        dropout_p = self.config.attn_pdrop if self.training else 0.0
        chunks = [(c0, min(T, c0 + chunk)) for c0 in range(0, T, chunk)]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _RecomputedChunkAttention.apply(q, k, v, self, ctx, chunks, dropout_p, scale)
        return self._chunks(q, k, v, ctx, chunks, dropout_p, scale)

    def _chunks(self, q, k, v, ctx, chunks, dropout_p, scale):
        P = k.shape[-2] - q.shape[-2]
        outputs = [self._chunk_attention(q[:, :, c0:c1], k[:, :, : P + c1], v[:, :, : P + c1], P + c0, ctx, dropout_p, scale)
                   for c0, c1 in chunks]  # keys < P+c1: those the chunk's last row can see
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    def _chunk_attention(self, q, k, v, q_start, ctx, dropout_p, scale):
        """SDPA of one query chunk (absolute rows ``q_start…``) over the keys it can see, bias built here."""
        bias = self._chunk_bias(q_start, q.shape[-2], k.shape[-2], q.dtype, ctx)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)

    @staticmethod
    def _chunk_bias(q_start, q_len, k_len, dtype, ctx):
        device = ctx["device"]
        rows = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        allowed = torch.arange(k_len, device=device)[None, :] <= rows  # causal, [q_len, k_len]
        if ctx["key_mask"] is not None:
            allowed = allowed[None, None] & ctx["key_mask"][:, None, None, :k_len].bool()
        if ctx["alibi"] is not None:
            bias = ctx["alibi"](q_start, q_len, k_len, ctx["divisor"], dtype)  # [H, q, k]
        else:
            bias = torch.zeros((), dtype=dtype, device=device)
        bias = torch.where(allowed, bias, torch.finfo(dtype).min)
        # A 4-D mask keeps SDPA on its fused CPU kernel; a 3-D one falls back to the ~3x slower math path.
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        return bias


class _RecomputedChunkAttention(torch.autograd.Function):
    """The chunked SDPA path under autograd: the backward pass recomputes one chunk at a time, its bias
    included, and accumulates that chunk's gradients into q, k, v's. Autograd keeps only q, k and v, so a
    training step holds O(T) per layer instead of every chunk's ``[B, H, q, K]`` bias (H·T²/2 values), and
    no per-chunk gradient of the key/value slices (a full-length tensor each) is alive at once."""

    @staticmethod
    def forward(ctx, q, k, v, attn, attn_ctx, chunks, dropout_p, scale):
        ctx.save_for_backward(q, k, v)
        ctx.run = (attn, attn_ctx, chunks, dropout_p, scale)
        # Attention dropout must draw the same masks when recomputed: start from the same RNG state.
        ctx.rng = None
        if dropout_p > 0:
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(q.device) if q.device.type == "cuda" else None)
        return attn._chunks(q, k, v, attn_ctx, chunks, dropout_p, scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        attn, attn_ctx, chunks, dropout_p, scale = ctx.run
        P = k.shape[-2] - q.shape[-2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        cuda = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, enabled=ctx.rng is not None):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if cuda:
                    torch.cuda.set_rng_state(ctx.rng[1], q.device)
            for c0, c1 in chunks:
                kc = P + c1
                with torch.enable_grad():
                    inputs = [t.detach().requires_grad_() for t in (q[:, :, c0:c1], k[:, :, :kc], v[:, :, :kc])]
                    out = attn._chunk_attention(*inputs, P + c0, attn_ctx, dropout_p, scale)
                    gq, gk, gv = torch.autograd.grad(out, inputs, grad_out[:, :, c0:c1])
                dq[:, :, c0:c1] = gq
                dk[:, :, :kc] += gk
                dv[:, :, :kc] += gv
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# MLP, block
# --------------------------------------------------------------------------------------------------


class BTLMMLP(nn.Module):
    """Feed-forward network. SwiGLU (BTLM): ``c_proj(c_fc(x) · silu(c_fc2(x)))``; ``c_fc2`` is the gate."""

    def __init__(self, config: BTLMConfig):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.swiglu = config.activation_function == "swiglu"
        self.c_fc = Conv1D(inner, config.n_embd)
        if self.swiglu:
            self.c_fc2 = Conv1D(inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, inner)
        self.act = nn.SiLU() if self.swiglu else ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        h = self.c_fc(x) * self.act(self.c_fc2(x)) if self.swiglu else self.act(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class BTLMBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm GPT-2 block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: BTLMConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = BTLMAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = BTLMMLP(config)

    def forward(self, hidden_states, attn_context: dict, past_key_values: Cache | None = None):
        # `past_key_values` is passed by that keyword so gradient checkpointing disables the cache.
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attn_context, past_key_values=past_key_values)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# --------------------------------------------------------------------------------------------------
# muP parameter kinds: the one rule behind the initialisation and every optimizer grouping
# --------------------------------------------------------------------------------------------------

#: Normalisation layers: their weights (and biases) are never weight-decayed.
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)

#: The decoder's weight-matrix optimizer groups (Model Zoo's ``adjust_learning_rate`` names); with one muP
#: width they share one learning rate (``hidden`` in :meth:`~BTLMPreTrainedModel.get_mup_param_groups`).
MUP_DECODER_GROUPS = ("decoder_attention", "decoder_input_ffn", "decoder_output_ffn")

#: The optimizer group of each muP kind: decoder weight matrices at the width-scaled learning rate, the
#: embedding and an untied LM head at lr×1, norms and biases at lr×1 without weight decay. The ALiBi slopes
#: (kind ``alibi_slopes``) are in no group: they are fixed.
MUP_KIND_GROUPS = {
    "attention": "decoder_attention",
    "attention_output": "decoder_attention",
    "ffn": "decoder_input_ffn",
    "ffn_output": "decoder_output_ffn",
    "embedding": "embedding",
    "output": "embedding",
    "norm": "no_decay",
    "bias": "no_decay",
    "lora": "lora",
}


def mup_param_kind(module_name: str, param_name: str, module: nn.Module) -> str | None:
    """The muP kind of parameter ``param_name`` of ``module``, which is named ``module_name`` in its model.

    Names are matched by their last parts, so any prefix (``transformer.``, a wrapper's ``_orig_mod.``) and
    the module's own model (block, decoder, LM model) give the same kind; projections may be GPT-2
    ``Conv1D`` or ``nn.Linear`` alike.

    * ``alibi_slopes``: the ALiBi slopes (fixed; whatever their ``requires_grad``).
    * ``norm``: a normalisation layer's weight. ``bias``: the ``bias`` of a norm, projection or embedding.
    * ``embedding``: an ``nn.Embedding`` weight (tokens, learned positions).
    * ``attention`` / ``attention_output``: a projection weight under an ``attn`` module, ``c_proj`` the
      output; ``ffn`` / ``ffn_output``: under an ``mlp`` module (``c_fc``, ``c_fc2``) / its ``c_proj``.
    * ``output``: the ``lm_head`` weight (a parameter of its own only when not tied to the embedding).
    * ``lora``: a peft LoRA adapter's parameter (under a ``lora_A`` / ``lora_B`` module). Adapters are not
      width-scaled hidden matrices (one side is the rank), and Model Zoo's muP groups do not match them
      either: they train at lr×1 with weight decay, in a group of their own.

    ``None``: no rule (a layer this model does not have).
    """
    if isinstance(module, AlibiPositionEmbeddingLayer):
        return "alibi_slopes"
    if any(part.startswith("lora_") for part in module_name.split(".")):
        return "lora"
    if not isinstance(module, (*NORM_TYPES, nn.Embedding, Conv1D, nn.Linear)):
        return None
    if param_name == "bias":
        return "bias"
    if param_name != "weight":
        return None
    if isinstance(module, NORM_TYPES):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    path = f".{module_name}."
    leaf = module_name.rsplit(".", 1)[-1]
    if ".attn." in path:
        return "attention_output" if leaf == "c_proj" else "attention"
    if ".mlp." in path:
        return "ffn_output" if leaf == "c_proj" else "ffn"
    return "output" if leaf == "lm_head" else None


def mup_init_std(config: BTLMConfig, kind: str) -> float:
    """Std of the normal muP init of a weight of ``kind``, ``σ = initializer_range``: embeddings
    ``σ``; decoder projections and the LM head ``σ·√mup_width_scale``; the two output projections that
    divided by ``√(2·n_layer)`` (two residual branches per block). BTLM-3B: 0.073, 0.0231, 0.00289."""
    if kind == "embedding":
        return config.initializer_range
    hidden_std = config.initializer_range * math.sqrt(config.mup_width_scale)
    if kind in ("attention_output", "ffn_output"):
        return hidden_std / math.sqrt(2 * config.n_layer)
    if kind in ("attention", "ffn", "output"):
        return hidden_std
    raise ValueError(f"muP kind {kind!r} has no normal init")


def mup_named_parameters(model: nn.Module) -> Iterator[tuple[str, str | None, nn.Parameter]]:
    """``(name, kind, param)`` of every parameter of ``model`` once, in module order; a tied parameter under
    its first name (``transformer.wte.weight``, not ``lm_head.weight``). Kinds from :func:`mup_param_kind`."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                name = f"{module_name}.{param_name}" if module_name else param_name
                yield name, mup_param_kind(module_name, param_name, module), param


def mup_optimizer_groups(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Map each trainable parameter's name to ``(optimizer group, param)`` (:data:`MUP_KIND_GROUPS`).

    Left out: the ALiBi slopes and parameters with ``requires_grad=False``. A trainable parameter with no
    rule raises ``ValueError``. The trainer and :meth:`~BTLMPreTrainedModel.get_mup_param_groups` both
    group through this function.
    """
    groups: dict[str, tuple[str, nn.Parameter]] = {}
    for name, kind, param in mup_named_parameters(model):
        if kind == "alibi_slopes" or not param.requires_grad:
            continue
        if kind is None:
            raise ValueError(f"parameter {name} has no muP parameter group rule")
        groups[name] = (MUP_KIND_GROUPS[kind], param)
    return groups


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class BTLMPreTrainedModel(PreTrainedModel):
    config_class = BTLMConfig
    config: BTLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BTLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Buffers of older checkpoints (the first fp32 upload, JAIS): GPT-2's causal-mask buffers.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$", r"attn\.masked_bias$"]

    @torch.no_grad()
    def _init_weights(self, module):
        """muP init of ``module``'s parameters by their :func:`mup_param_kind`: weights
        ``N(0, mup_init_std)`` (hidden ``σ·√mup_width_scale``, the two output projections that divided by
        ``√(2·n_layer)``, embeddings ``σ``; ``σ = initializer_range``, 0.073 for BTLM-3B → 0.0231 and
        0.00289, the stds of the Model Zoo BTLM config), norm weights 1, biases 0, exact ALiBi slopes."""
        module_name = next((name for name, m in self.named_modules() if m is module), "")
        for param_name, param in module.named_parameters(recurse=False):
            kind = mup_param_kind(module_name, param_name, module)
            if kind == "alibi_slopes":
                init.copy_(param, torch.tensor(alibi_slopes(module.n_head)).unsqueeze(-1))
            elif kind == "bias":
                init.zeros_(param)
            elif kind == "norm":
                init.ones_(param)
            elif kind not in (None, "lora"):  # adapters keep peft's init (B = 0: no change at the start)
                init.normal_(param, mean=0.0, std=mup_init_std(self.config, kind))

    def get_mup_param_groups(self, lr: float, weight_decay: float = 0.0, decoupled_wd: bool = True) -> list[dict]:
        """Optimizer parameter groups for muP training, to pass to ``torch.optim.AdamW``.

        The groups of :func:`mup_optimizer_groups` (the trainer's), with one width for the decoder:

        * ``hidden``: the decoder's projection weights, at ``lr·mup_width_scale`` with ``weight_decay`` (or
          ``weight_decay/mup_width_scale`` when ``decoupled_wd=False``, the MuAdam convention).
        * ``embedding``: the (tied) token embedding, learned positions, an untied LM head: ``lr``, ``weight_decay``.
        * ``no_decay``: norm weights and every bias, at ``lr`` without weight decay. The released
          method's source is not public, so whether Conv1D biases belong here or in ``hidden`` is unknown;
          we follow the Cerebras training semantics (biases: lr×1, no weight decay).
        * ``lora``: peft LoRA adapters (the base weights are then frozen): ``lr``, ``weight_decay``.
        The ALiBi slopes are excluded (they are fixed: a frozen parameter, also after loading), and so is
        every parameter with ``requires_grad=False``. Empty groups are dropped.
        """
        width = self.config.mup_width_scale
        hidden_wd = weight_decay if decoupled_wd else weight_decay / width
        groups = {
            "hidden": dict(params=[], lr=lr * width, weight_decay=hidden_wd),
            "embedding": dict(params=[], lr=lr, weight_decay=weight_decay),
            "no_decay": dict(params=[], lr=lr, weight_decay=0.0),
            "lora": dict(params=[], lr=lr, weight_decay=weight_decay),
        }
        for group, param in mup_optimizer_groups(self).values():
            groups["hidden" if group in MUP_DECODER_GROUPS else group]["params"].append(param)
        return [dict(name=name, **group) for name, group in groups.items() if group["params"]]


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise one ``ValueError`` naming a token id outside ``[0, vocab_size)``. It reads values back, so it
    belongs on CPU tensors (on an accelerator the read would wait for the device)."""
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


class BTLMModel(BTLMPreTrainedModel):
    """The decoder: embeddings × ``mup_embeddings_scale``, blocks, final LayerNorm."""

    def __init__(self, config: BTLMConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if config.position_embedding_type == "learned" else None
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([BTLMBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.relative_pe = AlibiPositionEmbeddingLayer(config.n_head) if config.position_embedding_type == "alibi" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _check_inputs(self, input_ids, past_length: int, seq_length: int) -> None:
        # Ids on an accelerator are not read back: that would stall the device on every forward. Callers
        # that move batches there (the trainer) check the ids on the CPU first.
        if input_ids is not None and input_ids.device.type == "cpu":
            check_token_ids(input_ids, self.config.vocab_size)
        if past_length + seq_length > self.config.n_positions:
            raise ValueError(
                f"input of {past_length + seq_length} tokens (cached {past_length} + new {seq_length}) is longer "
                f"than n_positions={self.config.n_positions}. To run longer inputs raise `n_positions` in the config "
                'and use position interpolation, e.g. alibi_scaling={"type": "linear", "train_seq_len": 8192}.'
            )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        # int(): a static cache reports its fill level as a tensor
        past_length = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        B, T = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
        self._check_inputs(input_ids, past_length, T)

        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if self.wpe is not None:  # learned positions are added before the muP scale
            if position_ids is None:
                position_ids = torch.arange(past_length, past_length + T, device=x.device)[None]
            x = x + self.wpe(position_ids)
        # HF multiplies by a tensor in the activation dtype, so in bf16 the factor is 14.625.
        x = x * torch.tensor(self.config.mup_embeddings_scale, dtype=x.dtype, device=x.device)
        x = self.drop(x)

        K = past_length + T
        if attention_mask is not None:
            if attention_mask.shape != (B, K):
                raise ValueError(f"attention_mask must have shape [batch, cached + new] = {[B, K]}, got {list(attention_mask.shape)}")
            if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
                attention_mask = None  # nothing padded: skip the mask work (not worth a device sync elsewhere)
        attn_context = dict(
            key_length=K,
            key_mask=attention_mask,
            alibi=self.relative_pe,
            divisor=alibi_divisor(self.config.alibi_scaling, K),  # one divisor for the whole forward
            device=x.device,
        )
        for block in self.h:
            x = block(x, attn_context, past_key_values=past_key_values if use_cache else None)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values if use_cache else None)


class BTLMLMHeadModel(BTLMPreTrainedModel, GenerationMixin):
    """BTLM with the tied LM head; logits × ``mup_output_alpha·mup_width_scale``."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    @staticmethod
    def create_masks_for_generate(attention_mask=None, **kwargs):
        """Keep the 2-D padding mask when ``generate`` uses a static cache (it would build a 4-D causal mask
        over the whole pre-allocated cache): the attention builds its causal + ALiBi bias itself."""
        return attention_mask

    def __init__(self, config: BTLMConfig):
        super().__init__(config)
        self.transformer = BTLMModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scaled logits for final hidden states; lets callers (long-context eval) compute them in chunks."""
        logits = self.lm_head(hidden_states)
        return logits * torch.tensor(self.config.output_logits_scale, dtype=logits.dtype, device=logits.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward. With ``labels`` the loss is the mean next-token cross-entropy (labels are
        shifted inside; ``-100`` is ignored). ``logits_to_keep=n`` computes logits for the last ``n``
        positions only (``generate`` uses 1 during prefill).

        ``num_items_in_batch`` (passed by ``transformers.Trainer``, which then does not divide the loss by
        the gradient-accumulation steps itself): the loss is the cross-entropy *sum* over that many label
        tokens, so accumulated micro-batches add up to the mean over the whole batch."""
        out = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.logits_from_hidden(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            num_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="mean" if num_items is None else "sum")
            if num_items is not None:
                loss = loss / torch.as_tensor(num_items, device=loss.device)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

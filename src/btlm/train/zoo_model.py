"""The training model of a Model Zoo ``model:`` section: its :class:`btlm.model.BTLMConfig`, the Model Zoo
initialisation, and the loss (the model itself is :mod:`btlm.model.model`).

Name mapping (that of the Cerebras HF↔CS checkpoint converter): ``hidden_size→n_embd``,
``num_hidden_layers→n_layer``, ``num_heads→n_head``, ``filter_size→n_inner``,
``max_position_embeddings→n_positions``, ``nonlinearity→activation_function``, dropouts,
``embeddings_scale→mup_embeddings_scale``, ``scale_qk_dot_by_d→mup_scale_qk_dot_by_d``,
``mup_width_scale = optimizer.adjust_learning_rate.decoder_kernel`` and
``mup_output_alpha = output_logits_scale / mup_width_scale`` (so the logits scale is exactly the YAML's).

muP has two spellings in Model Zoo params, both accepted:

* Release 2.0-2.2: initializers already scaled for the width, ``output_logits_scale`` (the final
  factor, e.g. 0.222) and ``optimizer.adjust_learning_rate.decoder_kernel`` (e.g. 0.1).
* Release 2.3+: ``mup_base_hidden_size`` / ``mup_base_filter_size`` with initializers at the *base*
  std and ``output_logits_alpha``. With ``m = hidden_size / mup_base_hidden_size`` and
  ``mf = filter_size / mup_base_filter_size``: attention and FFN-input stds × m^-1/2, attention output
  std × m^-1/2·(2L)^-1/2, FFN output std × mf^-1/2·(2L)^-1/2 (truncation bounds scaled alike); logits ×
  ``output_logits_alpha / m`` (``/ √m`` if ``scale_output_logits_by_d`` is False); learning rates of
  attention and FFN input × 1/m, of the FFN output × 1/mf (see ``config.lr_multipliers``).
  For the HF config: ``mup_width_scale = 1/m`` and ``mup_output_alpha = logits scale / mup_width_scale``,
  so an exported model's logits equal the training model's (Cerebras' own converter drops this scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import InitializerConfig, ModelConfig, OptimizerConfig, lr_multipliers


def mup_width_scale(model: ModelConfig, optimizer: OptimizerConfig | None = None) -> float:
    """The HF ``mup_width_scale``: the attention learning-rate multiplier (1/m, or ``decoder_kernel``)."""
    if optimizer is not None:
        return lr_multipliers(model, optimizer)["decoder_attention"]
    return 1 / model.hidden_width_mult


def btlm_config_from_params(model: ModelConfig, optimizer: OptimizerConfig | None = None, **overrides):
    """The HF :class:`BTLMConfig` described by a Model Zoo ``model`` section."""
    from btlm.model import BTLMConfig

    width = mup_width_scale(model, optimizer)
    scale = model.logits_scale()
    # No logit scale in the params means none in the model (Model Zoo multiplies only when one is set).
    logits_scale = 1.0 if scale is None else scale
    init_std = model.embedding_initializer.std if model.embedding_initializer else model.initializer_range
    kwargs = dict(
        vocab_size=model.vocab_size,
        n_positions=model.max_position_embeddings,
        n_embd=model.hidden_size,
        n_layer=model.num_hidden_layers,
        n_head=model.num_heads,
        n_inner=model.filter_size,
        activation_function=model.nonlinearity,
        resid_pdrop=model.dropout_rate,
        embd_pdrop=model.dropout_rate if model.embedding_dropout_rate is None else model.embedding_dropout_rate,
        attn_pdrop=model.dropout_rate if model.attention_dropout_rate is None else model.attention_dropout_rate,
        layer_norm_epsilon=model.layer_norm_epsilon,
        initializer_range=init_std,
        scale_attn_weights=model.attention_type == "scaled_dot_product",
        scale_attn_by_inverse_layer_idx=model.scale_qk_dot_by_layer_idx,
        position_embedding_type=model.position_embedding_type,
        mup_width_scale=width,
        mup_embeddings_scale=model.embeddings_scale,
        mup_output_alpha=logits_scale / width,
        mup_scale_qk_dot_by_d=model.scale_qk_dot_by_d,
        alibi_scaling=({"type": "linear", "factor": float(model.pos_scaling_factor)}
                       if model.pos_scaling_factor != 1.0 else None),
        tie_word_embeddings=True,
        use_cache=False,
        architectures=["BTLMLMHeadModel"],
    )
    kwargs.update(overrides)
    return BTLMConfig(**kwargs)


def _apply_initializer(tensor: torch.Tensor, init: InitializerConfig) -> None:
    with torch.no_grad():
        if init.name == "truncated_normal":
            lo, hi = init.bounds()
            nn.init.trunc_normal_(tensor, mean=init.mean, std=init.std, a=lo, b=hi)
        elif init.name == "normal":
            nn.init.normal_(tensor, mean=init.mean, std=init.std)
        elif init.name == "zeros":
            nn.init.zeros_(tensor)
        elif init.name == "ones":
            nn.init.ones_(tensor)
        else:
            nn.init.constant_(tensor, init.val)


def scale_initializer(init: InitializerConfig, factor: float) -> InitializerConfig:
    """Model Zoo's ``scale_initializers_by_dimension``: std and the truncation bounds × factor."""
    if init.name not in ("normal", "truncated_normal"):
        return init
    if init.name == "normal":
        return init.model_copy(update={"std": init.std * factor})
    lo, hi = init.bounds()
    return init.model_copy(update={"std": init.std * factor, "a": lo * factor, "b": hi * factor})


def effective_initializers(cfg: ModelConfig) -> dict[str, InitializerConfig]:
    """The initializer of each weight kind: ``embedding``, ``attention`` (q/k/v), ``attention_output``,
    ``ffn`` (FFN input projections) and ``ffn_output`` (the model's ``mup_param_kind`` names), after muP
    scaling.

    Without muP base sizes (2.0-2.2 spelling) the YAML's initializers are used as given; defaults are
    ``trunc_normal(initializer_range)`` and ``initializer_range/√(2L)`` for the output projections.
    With ``mup_base_hidden_size`` (2.3+) the YAML's stds are the base model's and are scaled as in
    Model Zoo's GPT-2 model; the output defaults are then *unscaled* ``initializer_range`` (depth
    scaling comes with the muP factor), and — as there — the FFN output keeps the unscaled
    ``output_layer_initializer`` when ``mup_base_filter_size`` is absent.
    """
    rng = cfg.initializer_range
    default = InitializerConfig(name="truncated_normal", std=rng)
    mup = cfg.mup_base_hidden_size is not None
    attention = cfg.initializer or default
    output = cfg.output_layer_initializer or (
        default if mup else InitializerConfig(name="truncated_normal", std=rng / (2 * cfg.num_hidden_layers) ** 0.5))
    ffn = cfg.ffn_initializer or attention
    ffn_output = cfg.ffn_output_layer_initializer or output
    depth = (2 * cfg.num_hidden_layers) ** -0.5
    if mup:
        m = cfg.hidden_width_mult
        attention, ffn = scale_initializer(attention, m**-0.5), scale_initializer(ffn, m**-0.5)
        output = scale_initializer(output, m**-0.5 * depth)
    if cfg.mup_base_filter_size is not None:
        ffn_output = scale_initializer(ffn_output, cfg.filter_width_mult**-0.5 * depth)
    return {"embedding": cfg.embedding_initializer or default, "attention": attention,
            "attention_output": output, "ffn": ffn, "ffn_output": ffn_output}


def initialize_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Re-initialise ``model`` with the YAML's initializers (Model Zoo rules).

    ``embedding_initializer`` → token (and learned position) embeddings; ``initializer`` → q/k/v (and
    both FFN input projections unless ``ffn_initializer``); ``output_layer_initializer`` → attention
    output (and FFN output unless ``ffn_output_layer_initializer``); muP scaling per
    :func:`effective_initializers`. Biases 0, LayerNorm 1/0. Model Zoo leaves
    ``linear_layer_for_glu.bias`` at torch's uniform default (a quirk of its code); we zero it like
    every other bias (documented choice).
    """
    from btlm.model import mup_named_parameters

    inits = effective_initializers(cfg)
    for _, kind, param in mup_named_parameters(model):  # the model's muP kinds: one rule for init and lr
        if kind == "norm":
            nn.init.ones_(param)
        elif kind == "bias":
            nn.init.zeros_(param)
        elif kind in inits:  # an untied LM head (kind "output") keeps the model's own init
            _apply_initializer(param, inits[kind])


def build_model(model_cfg: ModelConfig, optimizer_cfg: OptimizerConfig | None = None, seed: int | None = None,
                **overrides):
    """A freshly initialised :class:`BTLMLMHeadModel` for the ``model`` section (fp32 master weights)."""
    from btlm.model import BTLMLMHeadModel

    if seed is not None:
        torch.manual_seed(seed)  # Model Zoo: the global seed is set just before model construction
    model = BTLMLMHeadModel(btlm_config_from_params(model_cfg, optimizer_cfg, **overrides))
    initialize_weights(model, model_cfg)
    return model


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Model Zoo's ``GPTLMHeadModelLoss``; labels are already the next tokens (shifted at preprocessing).

    ``batch_size``: ``Σ ce·m / B · loss_weight`` (= per-token mean for packed data with
    ``loss_weight = 1/msl``; padding still counts in the denominator); ``num_tokens``: ``Σ ce·m / Σ m``.
    Computed in fp32 even under autocast.
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.long().flatten(), reduction="none")
    total = (ce * loss_mask.flatten().to(ce.dtype)).sum()
    if cfg.loss_scaling == "num_tokens":
        return total / loss_mask.sum().clamp_min(1).to(ce.dtype)
    return total / labels.shape[0] * cfg.loss_weight

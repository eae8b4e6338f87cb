"""``btlm export-gguf``: write a BTLM checkpoint as a GGUF file that llama.cpp runs as JAIS.

llama.cpp has no BTLM architecture, but its JAIS architecture (``general.architecture = "jais"``) is the
same network: pre-LayerNorm GPT-2 blocks with a fused QKV projection, ALiBi, scores scaled by ``1/d``,
a SiLU-gated FFN and muP multipliers. This module does what llama.cpp's own converter
(``convert_hf_to_gguf.py``, class ``JaisModel``) does with a JAIS checkpoint, reading the BTLM one:

* GPT-2 ``Conv1D`` weights ``[in, out]`` are transposed to ``[out, in]``; legacy ``attn.bias`` /
  ``attn.masked_bias`` buffers are dropped;
* ``mup_embeddings_scale`` is folded into ``token_embd.weight`` and ``mup_output_alpha·mup_width_scale``
  into ``output.weight`` (both from the tied ``wte``; BTLM's ``lm_head`` is the same matrix);
* ``relative_pe.slopes`` become ``jais.attention.max_alibi_bias = -round(log2(m_0)·n')``, from which
  llama.cpp recomputes the slopes (``n'`` = largest power of two ≤ n_head);
* ``mlp.c_fc`` → ``ffn_up``, ``mlp.c_fc2`` → ``ffn_gate`` (``up · silu(gate)``), ``mlp.c_proj`` → ``ffn_down``;
* the tokenizer goes in as ``tokenizer.ggml.model = "gpt2"`` with ``tokenizer.ggml.pre = "gpt-2"`` (the
  pre-tokenizer is identified by the same token-hash test the converter uses), tokens, token types,
  merges and the special-token ids.

One addition: the FFN width is zero-padded to a multiple of ``pad_ffn_to`` (256 by default, so BTLM-3B's
6826 becomes 6912). Quantised llama.cpp types work on blocks of 32 (Q4_0, Q8_0) or 256 (K-quants) along
each row, and ``ffn_down``'s rows are FFN-wide: unpadded they can only stay F16. The padding is exact —
padded units get zero ``up``/``gate`` weights and biases, so ``up · silu(gate) = 0 · silu(0) = 0``, and zero
``down`` columns — and ``jais.feed_forward_length`` holds the padded width.

Tensors are read one at a time from the checkpoint (safetensors or ``pytorch_model*.bin``) and streamed
into the file, so exporting the 3B model needs memory for one tensor, not for the model. The file is
written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable

import numpy as np

from .packing import round_up
from btlm.errors import BTLMError

logger = logging.getLogger(__name__)

#: ``--outtype`` choices (the type of the matrices; norms and biases are always F32, as in llama.cpp's converter).
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

#: The converter's pre-tokenizer test string (``get_vocab_base_pre`` in ``convert_hf_to_gguf.py``): the
#: sha256 of ``str(tokenizer.encode(CHKTXT))`` identifies the BPE pre-tokenizer.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
#: Known hashes → ``tokenizer.ggml.pre`` (GPT-2's BPE, which BTLM uses, is llama.cpp's "gpt-2").
_PRE_TOKENIZERS = {"3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2"}

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_F16_MAX = 65504.0


class GGUFExportError(BTLMError, ValueError):
    """A model directory or setting that cannot be exported to GGUF (the message says why)."""


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint lazily
# --------------------------------------------------------------------------------------------------


class _Checkpoint:
    """Name → tensor access to a HF checkpoint directory without materialising the whole model.

    Handles ``model.safetensors``, sharded ``model-*.safetensors`` and (sharded) ``pytorch_model*.bin``
    (loaded with ``weights_only=True`` and memory-mapped). Names are stored without the
    ``transformer.`` prefix; the tied ``lm_head.weight`` and the legacy causal-mask buffers are skipped.
    """

    def __init__(self, model_dir: Path, stack: contextlib.ExitStack):
        self._getters: dict[str, Callable] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        st_files = sorted(model_dir.glob("*.safetensors"))
        bin_files = sorted(model_dir.glob("pytorch_model*.bin"))
        if st_files:
            from safetensors import safe_open

            for f in st_files:
                try:
                    handle = stack.enter_context(safe_open(str(f), framework="pt"))
                except Exception as e:  # noqa: BLE001 - SafetensorError (truncated or not safetensors)
                    raise GGUFExportError(f"{f}: cannot read the weights ({e})") from None
                for key in handle.keys():
                    shape = tuple(handle.get_slice(key).get_shape())
                    self._add(key, shape, lambda h=handle, k=key: h.get_tensor(k))
        elif bin_files:
            import torch

            for f in bin_files:
                try:
                    state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                    state = torch.load(str(f), map_location="cpu", weights_only=True)
                for key, tensor in state.items():
                    self._add(key, tuple(tensor.shape), lambda t=tensor: t)
        else:
            raise GGUFExportError(f"{model_dir} has no weights (model*.safetensors or pytorch_model*.bin)")

    def _add(self, key: str, shape: tuple[int, ...], getter: Callable) -> None:
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name == "lm_head.weight" or name.endswith(_IGNORED_SUFFIXES):
            return  # tied to wte / GPT-2 causal-mask buffers
        self._getters[name] = getter
        self._shapes[name] = shape

    def names(self) -> set[str]:
        return set(self._getters)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a float32 numpy array (bf16/fp16 checkpoints are upcast)."""
        import torch

        return self._getters[name]().to(torch.float32).numpy()


# --------------------------------------------------------------------------------------------------
# Config checks
# --------------------------------------------------------------------------------------------------


def _read_config(model_dir: Path):
    """Load and validate ``config.json`` as a BTLM config that llama.cpp's JAIS graph can compute."""
    from .config import read_unquantized_btlm_config

    read_unquantized_btlm_config(
        model_dir, GGUFExportError, quantized_hint="GGUF needs the unquantised weights: export from the fp32/bf16 "
        "model directory and pick --outtype q8_0/q4_0 instead")
    from btlm.io import ModelLoadError, read_config, validate_config

    try:
        config = read_config(model_dir)
        validate_config(config, str(model_dir))
    except ModelLoadError as e:
        raise GGUFExportError(str(e)) from None

    problems = []
    if config.activation_function != "swiglu":
        problems.append(f"activation_function is {config.activation_function!r} (llama.cpp's JAIS FFN is SwiGLU)")
    if config.position_embedding_type != "alibi":
        problems.append(f"position_embedding_type is {config.position_embedding_type!r} (JAIS uses ALiBi only)")
    if not (config.scale_attn_weights and config.mup_scale_qk_dot_by_d):
        problems.append(
            "attention scores are not scaled by 1/head_dim (scale_attn_weights and mup_scale_qk_dot_by_d must be "
            "true): llama.cpp's JAIS graph hard-codes kq_scale = 1/head_dim"
        )
    if config.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx is true (not supported by llama.cpp's JAIS graph)")
    scaling = config.alibi_scaling
    if scaling is not None and scaling.get("factor") is not None:
        problems.append(
            f"alibi_scaling {scaling!r} divides every ALiBi slope by a fixed factor, which llama.cpp's "
            "max_alibi_bias cannot express"
        )
    if problems:
        raise GGUFExportError(f"{model_dir} cannot be exported for llama.cpp: " + "; ".join(problems))
    return config


def _alibi_max_bias(slopes: np.ndarray, n_head: int) -> float:
    """``max_alibi_bias`` from the checkpoint slopes, as llama.cpp's converter computes it; checks that the
    slopes llama.cpp will recompute from it are the checkpoint's (up to the bf16 rounding of released files)."""
    slopes = slopes.reshape(-1).astype(np.float64)
    if slopes.shape[0] != n_head:
        raise GGUFExportError(f"relative_pe.slopes has {slopes.shape[0]} entries; expected n_head={n_head}")
    if not (np.isfinite(slopes).all() and (slopes > 0).all()):
        raise GGUFExportError(f"relative_pe.slopes must be positive and finite, got {slopes.tolist()}")
    n_pow2 = 2 ** math.floor(math.log2(n_head))
    max_bias = float(-round(math.log2(float(slopes[0])) * n_pow2))
    expected = llama_alibi_slopes(n_head, max_bias)
    rel = np.abs(slopes - expected) / expected
    if not rel.max() < 1e-2:
        raise GGUFExportError(
            f"the checkpoint's ALiBi slopes are not the standard ALiBi slopes (max relative difference "
            f"{rel.max():.3g} from those of max_alibi_bias={max_bias}); llama.cpp would compute different attention"
        )
    return max_bias


def llama_alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """The ALiBi slopes llama.cpp derives from ``n_head`` and ``max_alibi_bias`` (``ggml_soft_max_ext``):
    ``m0^(h+1)`` for the first ``n'`` heads, ``m1^(2(h-n')+1)`` after, with ``m0 = 2^(-max_bias/n')``,
    ``m1 = 2^(-max_bias/2/n')`` and ``n'`` the largest power of two ≤ ``n_head``."""
    n_pow2 = 2 ** math.floor(math.log2(n_head))
    m0 = 2.0 ** (-max_bias / n_pow2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n_pow2)
    return np.array([m0 ** (h + 1) if h < n_pow2 else m1 ** (2 * (h - n_pow2) + 1) for h in range(n_head)])


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _tokenizer_dir(model_dir: Path, stack: contextlib.ExitStack) -> Path:
    """The model directory if it holds tokenizer files, else a temporary one with BTLM's GPT-2 BPE."""
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file():
        return model_dir
    from btlm.tokenizer import save_tokenizer

    logger.warning("%s has no tokenizer files; writing BTLM's GPT-2 BPE tokenizer into the GGUF", model_dir)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="btlm-gguf-tok-")))
    save_tokenizer(tmp)
    return tmp


def _add_vocab(writer, tok_dir: Path, vocab_size: int) -> None:
    """Tokenizer metadata as ``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2`` writes it."""
    import gguf

    from btlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(
            f"the tokenizer in {tok_dir} has ids up to {max(vocab.values())}, more than the model's vocab_size={vocab_size}"
        )
    chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh not in _PRE_TOKENIZERS:
        raise GGUFExportError(
            f"the tokenizer in {tok_dir} is not GPT-2's BPE (pre-tokenizer hash {chkhsh}); llama.cpp's pre-tokenizer "
            "for it is unknown"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif reverse[i] in added:
            tokens.append(tokenizer.decode(tokenizer.encode(reverse[i])))
            special = tokenizer.added_tokens_decoder[i].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS[chkhsh])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise GGUFExportError(f"no BPE merges found in {tok_dir} (tokenizer.json or merges.txt)")
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(False)  # BTLM prepends no BOS (the model card's usage)


# --------------------------------------------------------------------------------------------------
# Tensor plan
# --------------------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy shape ([out, in] for matrices; GGUF stores it reversed)
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 data


def _pick_type(name: str, shape: tuple[int, ...], want):
    """The GGML type for a tensor: F32 for 1-D tensors, else ``want`` when its rows are whole blocks, else F16
    (the converter's fallback)."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:
        logger.warning("%s: rows of %d are not a multiple of %s's block of %d; stored as F16",
                       name, shape[-1], want.name, block)
        return gguf.GGMLQuantizationType.F16
    return want


def _plan(config, ckpt: _Checkpoint, outtype: str, n_ff_padded: int) -> list[_Tensor]:
    import gguf

    T = gguf.GGMLQuantizationType
    linear_type, embed_type = {
        "f32": (T.F32, T.F32), "f16": (T.F16, T.F16), "bf16": (T.BF16, T.BF16),
        "q8_0": (T.Q8_0, T.Q8_0),
        # Like llama-quantize's Q4_0 except that the embedding and output matrices are Q8_0 (llama-quantize
        # makes output Q6_K, which gguf-py cannot write, and token_embd Q4_0).
        "q4_0": (T.Q4_0, T.Q8_0),
    }[outtype]
    D, F, V, L = config.n_embd, config.n_inner or 4 * config.n_embd, config.vocab_size, config.n_layer
    Fp = n_ff_padded

    expected = {"wte.weight": (V, D), "ln_f.weight": (D,), "ln_f.bias": (D,), "relative_pe.slopes": (config.n_head, 1)}
    for i in range(L):
        p = f"h.{i}."
        expected.update({
            p + "ln_1.weight": (D,), p + "ln_1.bias": (D,), p + "ln_2.weight": (D,), p + "ln_2.bias": (D,),
            p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
            p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
            p + "mlp.c_fc.weight": (D, F), p + "mlp.c_fc.bias": (F,),
            p + "mlp.c_fc2.weight": (D, F), p + "mlp.c_fc2.bias": (F,),
            p + "mlp.c_proj.weight": (F, D), p + "mlp.c_proj.bias": (D,),
        })
    present = ckpt.names()
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise GGUFExportError(
            f"checkpoint does not match its config.json (n_layer={L}): missing {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}; unexpected {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}"
        )

    wrong = [f"{n} {list(ckpt.shape(n))} (config.json implies {list(s)})" for n, s in expected.items() if ckpt.shape(n) != s]
    if wrong:
        raise GGUFExportError(f"checkpoint tensors do not match config.json: {', '.join(wrong[:8])}")

    def load(name):
        return ckpt.get(name)

    def conv(name):  # Conv1D [in, out] -> [out, in]
        return np.ascontiguousarray(load(name).T)

    def pad_rows(a):  # [F, ...] -> [Fp, ...] with zero rows
        return np.concatenate([a, np.zeros((Fp - a.shape[0], *a.shape[1:]), np.float32)]) if Fp > a.shape[0] else a

    def pad_cols(a):  # [D, F] -> [D, Fp] with zero columns
        return np.concatenate([a, np.zeros((a.shape[0], Fp - a.shape[1]), np.float32)], axis=1) if Fp > a.shape[1] else a

    emb_scale = np.float32(config.mup_embeddings_scale)
    out_scale = np.float32(config.mup_output_alpha * config.mup_width_scale)
    plan: list[_Tensor] = []

    def add(name, shape, kind, make):
        plan.append(_Tensor(name, shape, _pick_type(name, shape, kind), make))

    add("token_embd.weight", (V, D), embed_type, lambda: load("wte.weight") * emb_scale)
    for i in range(L):
        h, b = f"h.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", (D,), linear_type, lambda h=h: load(h + "ln_1.weight"))
        add(b + "attn_norm.bias", (D,), linear_type, lambda h=h: load(h + "ln_1.bias"))
        add(b + "attn_qkv.weight", (3 * D, D), linear_type, lambda h=h: conv(h + "attn.c_attn.weight"))
        add(b + "attn_qkv.bias", (3 * D,), linear_type, lambda h=h: load(h + "attn.c_attn.bias"))
        add(b + "attn_output.weight", (D, D), linear_type, lambda h=h: conv(h + "attn.c_proj.weight"))
        add(b + "attn_output.bias", (D,), linear_type, lambda h=h: load(h + "attn.c_proj.bias"))
        add(b + "ffn_norm.weight", (D,), linear_type, lambda h=h: load(h + "ln_2.weight"))
        add(b + "ffn_norm.bias", (D,), linear_type, lambda h=h: load(h + "ln_2.bias"))
        add(b + "ffn_up.weight", (Fp, D), linear_type, lambda h=h: pad_rows(conv(h + "mlp.c_fc.weight")))
        add(b + "ffn_up.bias", (Fp,), linear_type, lambda h=h: pad_rows(load(h + "mlp.c_fc.bias")))
        add(b + "ffn_gate.weight", (Fp, D), linear_type, lambda h=h: pad_rows(conv(h + "mlp.c_fc2.weight")))
        add(b + "ffn_gate.bias", (Fp,), linear_type, lambda h=h: pad_rows(load(h + "mlp.c_fc2.bias")))
        add(b + "ffn_down.weight", (D, Fp), linear_type, lambda h=h: pad_cols(conv(h + "mlp.c_proj.weight")))
        add(b + "ffn_down.bias", (D,), linear_type, lambda h=h: load(h + "mlp.c_proj.bias"))
    add("output_norm.weight", (D,), linear_type, lambda: load("ln_f.weight"))
    add("output_norm.bias", (D,), linear_type, lambda: load("ln_f.bias"))
    add("output.weight", (V, D), embed_type, lambda: load("wte.weight") * out_scale)
    return plan


def _encode(t: _Tensor) -> np.ndarray:
    """Convert a planned tensor's float32 data to its GGML type (bytes for quantised types)."""
    import gguf

    data = np.ascontiguousarray(t.make(), dtype=np.float32)
    if tuple(data.shape) != t.shape:  # internal consistency
        raise AssertionError(f"{t.name}: data shape {data.shape} != planned {t.shape}")
    if not np.isfinite(data).all():
        raise GGUFExportError(f"{t.name} contains NaN or infinite values")
    if t.qtype == gguf.GGMLQuantizationType.F16 and np.abs(data).max(initial=0.0) > _F16_MAX:
        raise GGUFExportError(f"{t.name} has values beyond the float16 range; use --outtype bf16 or f32")
    return gguf.quants.quantize(data, t.qtype)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16",
                pad_ffn_to: int = 256, progress: bool = True, overwrite: bool = False) -> Path:
    """Write the BTLM checkpoint in ``model_dir`` as a GGUF file that llama.cpp loads as JAIS.

    Args:
        model_dir: an unquantised BTLM model directory (``config.json`` + safetensors or
            ``pytorch_model*.bin``; tokenizer files optional, BTLM's GPT-2 BPE is used when absent).
        out_path: the ``.gguf`` file to write (atomically: a temporary sibling renamed into place).
        outtype: ``f32``, ``f16`` (default), ``bf16``, ``q8_0`` or ``q4_0`` for the matrices. LayerNorms and
            biases are F32 in every case (as llama.cpp's converter writes them). ``q8_0`` quantises every matrix
            to Q8_0, like ``convert_hf_to_gguf.py --outtype q8_0``; ``q4_0`` makes the block linears Q4_0 and
            the embedding and output matrices Q8_0. A matrix whose rows are not whole blocks falls back to F16.
        pad_ffn_to: zero-pad the FFN width to a multiple of this (256 by default: 6826 → 6912 for BTLM-3B,
            which lets llama-quantize's K-quants and Q4_0/Q8_0 quantise ``ffn_down``); 1 or 0 disables it.
            Exact: the padded units contribute nothing.
        progress: show a tqdm progress bar over the tensors.
        overwrite: replace an existing ``out_path`` file (otherwise refused before any work).

    Returns:
        The path of the written file.

    Raises:
        GGUFExportError: missing directory, not a BTLM model, an already-quantised ``btlm quantize`` directory,
            an unknown ``outtype``, or a model llama.cpp's JAIS graph cannot compute (e.g.
            ``mup_scale_qk_dot_by_d=False``, learned positions, fixed ALiBi interpolation).
    """
    import gguf
    from tqdm import tqdm

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unsupported outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if not isinstance(pad_ffn_to, int) or pad_ffn_to < 0:
        raise GGUFExportError(f"pad_ffn_to must be a non-negative integer, got {pad_ffn_to!r}")
    model_dir = Path(model_dir)
    out = Path(out_path)
    config = _read_config(model_dir)
    if out.is_dir():
        raise GGUFExportError(f"output path {out} is a directory; give a file name such as model.gguf")
    from btlm.io import check_output_file

    check_output_file(out, overwrite, what="--out")

    n_ff = config.n_inner or 4 * config.n_embd
    n_ff_padded = round_up(n_ff, max(1, pad_ffn_to))
    context_length = config.n_positions
    if config.alibi_scaling is not None:  # dynamic interpolation: plain ALiBi up to train_seq_len
        context_length = min(context_length, config.alibi_scaling["train_seq_len"])
        logger.warning(
            "alibi_scaling %s (dynamic position interpolation) is not supported by llama.cpp; the GGUF declares "
            "context_length=%d, up to which the model is unchanged", config.alibi_scaling, context_length)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]

    from btlm.io import atomic_path

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out))  # renamed onto ``out`` when the block succeeds
        ckpt = _Checkpoint(model_dir, stack)
        plan = _plan(config, ckpt, outtype, n_ff_padded)
        max_bias = _alibi_max_bias(ckpt.get("relative_pe.slopes"), config.n_head)

        writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.JAIS])
        try:
            writer.add_name(model_dir.resolve().name)
            writer.add_block_count(config.n_layer)
            writer.add_context_length(context_length)
            writer.add_embedding_length(config.n_embd)
            writer.add_feed_forward_length(n_ff_padded)
            writer.add_head_count(config.n_head)
            writer.add_layer_norm_eps(config.layer_norm_epsilon)
            writer.add_max_alibi_bias(max_bias)
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_vocab(writer, _tokenizer_dir(model_dir, stack), config.vocab_size)

            for t in plan:
                nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype)))
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tqdm(plan, desc=f"export-gguf {outtype}", unit="tensor", disable=not progress):
                writer.write_tensor_data(_encode(t))
        finally:
            writer.close()
    return out

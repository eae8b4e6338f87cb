"""Model-level quantisation: swap a BTLM's ``Conv1D`` linears (and its tied embedding) for quantised ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .config import BTLMQuantConfig
from .modules import Int4Conv1D, Int8Conv1D, Int8Embedding, TiedInt8Head
from .packing import QuantizationError


def _check_btlm(model: nn.Module) -> None:
    from btlm.model import BTLMLMHeadModel

    if not isinstance(model, BTLMLMHeadModel):
        raise QuantizationError(f"expected a BTLMLMHeadModel to quantise, got {type(model).__name__}")
    if getattr(model.config, "quantization_config", None) is not None:
        raise QuantizationError("this model is already quantised (its config has a quantization_config)")


def block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear inside the transformer blocks (``c_attn``, ``c_proj``, …)."""
    for name, module in model.named_modules():
        if name.startswith("transformer.h.") and isinstance(module, (Conv1D, Int4Conv1D, Int8Conv1D)):
            yield name, module


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _tie_int8_head(model: nn.Module, embedding: Int8Embedding) -> None:
    """Install the int8 embedding and the head that reads it; transformers must not re-tie ``lm_head.weight``."""
    model.transformer.wte = embedding
    model.lm_head = TiedInt8Head(embedding)
    model.all_tied_weights_keys = {}


@torch.no_grad()
def quantize_model(
    model: nn.Module, bits: int = 4, group_size: int = 128, embedding_bits: int | None = 8, progress: bool = True
) -> nn.Module:
    """Quantise ``model`` (a ``BTLMLMHeadModel``) in place, layer by layer, and return it.

    Every block ``Conv1D`` becomes :class:`Int4Conv1D` (``bits=4``, group-wise) or :class:`Int8Conv1D`;
    with ``embedding_bits=8`` the tied embedding/LM head becomes per-row int8, otherwise it is kept as is.
    Each float weight is released as soon as its replacement exists, so peak memory stays near the
    size of the input model. ``model.config.quantization_config`` records the settings for ``from_pretrained``.
    """
    config = BTLMQuantConfig(bits=bits, group_size=group_size, embedding_bits=embedding_bits)
    _check_btlm(model)
    linears = [(name, m) for name, m in block_linears(model) if isinstance(m, Conv1D)]
    for name, conv in tqdm(linears, desc=f"int{bits} quantise", disable=not progress):
        new = Int4Conv1D.from_conv1d(conv, group_size) if bits == 4 else Int8Conv1D.from_conv1d(conv)
        _set_module(model, name, new)
    if embedding_bits == 8:
        _tie_int8_head(model, Int8Embedding.from_embedding(model.transformer.wte))
    model.config.quantization_config = config
    return model


def replace_with_empty_quantized(model: nn.Module, config: BTLMQuantConfig) -> None:
    """Swap modules for empty quantised ones (on the model's device, e.g. ``meta``) before loading weights."""
    for name, conv in list(block_linears(model)):
        kw = dict(dtype=conv.bias.dtype, device=conv.bias.device)
        in_features, out_features = conv.weight.shape
        if config.bits == 4:
            new = Int4Conv1D(in_features, out_features, config.group_size, **kw)
        else:
            new = Int8Conv1D(in_features, out_features, **kw)
        _set_module(model, name, new)
    if config.embedding_bits == 8:
        wte = model.transformer.wte
        _tie_int8_head(
            model, Int8Embedding(wte.num_embeddings, wte.embedding_dim, dtype=wte.weight.dtype, device=wte.weight.device)
        )


def prepare_for_inference(model: nn.Module, checkpoint_files=None) -> nn.Module:
    """Make every quantised module kernel-ready now, layer by layer, rather than on the first forward:
    int4 weights packed for this CPU's kernel, every kernel operand 64-byte aligned.

    With ``checkpoint_files`` (the safetensors files the model was just loaded from) each tensor a kernel
    needs is read from its file with ``pread`` instead of through the memory-mapped view, so packing the
    3B model costs one layer's worth of transient memory and the mapped pages of the stored int4 codes are
    never read (see docs/quant.md, "Memory").
    """
    from .checkpoint import TensorReader

    with TensorReader(checkpoint_files or []) as reader:
        for name, module in model.named_modules():
            if isinstance(module, (Int4Conv1D, Int8Conv1D, Int8Embedding)):
                module.prepare_kernel(reader.for_module(name) if reader else None)
    return model


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float tensors that are not quantisation parameters (LayerNorms, biases, the int8
    embedding's row scales) to ``dtype``; int4 scales/zeros and int8 linear scales stay bf16 for the kernels."""
    keep = {id(m.scales_and_zeros) for m in model.modules() if isinstance(m, Int4Conv1D)}
    keep |= {id(m.weight_scale) for m in model.modules() if isinstance(m, Int8Conv1D)}
    for param in model.parameters():
        if param.is_floating_point() and id(param) not in keep:
            param.data = param.data.to(dtype)
    return model


def quantize_dir(model_dir, out_dir, bits: int = 4, group_size: int = 128, embedding_bits: int | None = 8,
                 dtype: str = "fp32", overwrite: bool = False, progress: bool = True) -> Path:
    """Load ``model_dir``, quantise it layer by layer and write it (+ tokenizer) to ``out_dir``.

    ``out_dir`` must be new or empty unless ``overwrite`` (checked before loading)."""
    from btlm.io import check_output_dir, load_model, parse_dtype, resolve_tokenizer

    from . import save_quantized
    from .config import BTLMQuantConfig, read_unquantized_btlm_config

    BTLMQuantConfig(bits=bits, group_size=group_size, embedding_bits=embedding_bits)  # validate before loading
    check_output_dir(out_dir, overwrite, what="--out")
    model_dir = Path(model_dir)
    read_unquantized_btlm_config(model_dir, quantized_hint="quantise from the unquantised model directory")
    model = load_model(model_dir)  # in the checkpoint's dtype: bf16 for the release, no fp32 copy of 3B
    with torch.no_grad():
        quantize_model(model, bits=bits, group_size=group_size, embedding_bits=embedding_bits, progress=progress)
        cast_unquantized(model, parse_dtype(dtype))
    return save_quantized(model, out_dir, tokenizer=resolve_tokenizer(model_dir), overwrite=overwrite)

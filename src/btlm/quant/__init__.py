"""Weight-only int4 / int8 quantisation of BTLM for CPU inference (``btlm quantize``).

``register()`` (called by ``import btlm``) teaches ``transformers`` to load directories written by
``btlm quantize``; ``load_quantized(path)`` is the direct route.
"""

from __future__ import annotations

import os

from .config import QUANT_METHOD, BTLMQuantConfig
from .packing import QuantizationError

__all__ = ["QUANT_METHOD", "BTLMQuantConfig", "QuantizationError", "load_quantized", "quantize_model", "register",
           "save_quantized"]


def register() -> None:
    """Register the ``btlm_woq`` quantization config and quantizer with transformers (idempotent, cheap)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BTLMQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        from .hf import BTLMWeightOnlyQuantizer

        register_quantizer(QUANT_METHOD)(BTLMWeightOnlyQuantizer)


def quantize_model(model, bits: int = 4, group_size: int = 128, embedding_bits: int | None = 8, progress: bool = True):
    """Quantise a ``BTLMLMHeadModel`` in place (see :func:`btlm.quant.quantize.quantize_model`)."""
    from .quantize import quantize_model as _quantize

    return _quantize(model, bits=bits, group_size=group_size, embedding_bits=embedding_bits, progress=progress)


def save_quantized(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False):
    """Write a quantised model (safetensors + config.json with ``quantization_config``) atomically."""
    from btlm.io import save_model

    return save_model(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def load_quantized(path: str | os.PathLike, dtype=None):
    """Load a directory written by ``btlm quantize`` into a model that computes from the packed weights."""
    import json
    from pathlib import Path

    from btlm.io import load_model

    register()
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        qc = json.loads(config_file.read_text()).get("quantization_config") or {}
        if qc.get("quant_method") != QUANT_METHOD:
            raise QuantizationError(
                f"{config_file} has no btlm quantization_config (quant_method {qc.get('quant_method')!r}, "
                f"expected {QUANT_METHOD!r}): quantise it first with `btlm quantize`"
            )
    return load_model(path, dtype=dtype)

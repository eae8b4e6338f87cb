"""``quantization_config`` of a quantised BTLM directory (``config.json``), as a transformers config class."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils.quantization_config import QuantizationConfigMixin

from .packing import QuantizationError, check_settings

#: ``quant_method`` written to config.json; transformers looks the quantizer up by it.
QUANT_METHOD = "btlm_woq"
#: 2: int4 codes in the canonical nibble layout (the same bytes on every CPU), packed for the kernel at load.
#: 1: int4 codes in one CPU's kernel layout (and, in the earliest files, the nibble layout: the two cannot
#: be told apart), so version-1 int4 files are refused; version-1 int8 files are the same as version 2.
FORMAT_VERSION = 2


class BTLMQuantConfig(QuantizationConfigMixin):
    """Weight-only quantisation of a BTLM: ``bits`` (4 or 8) for every block ``Conv1D``, int4 in groups of
    ``group_size`` input features, and the tied embedding/LM head in int8 (``embedding_bits=8``) or kept
    in the model dtype (``None``)."""

    def __init__(self, bits: int = 4, group_size: int | None = 128, embedding_bits: int | None = 8,
                 format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size if bits == 4 else None
        self.embedding_bits = embedding_bits
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        check_settings(self.bits, self.group_size)
        if self.embedding_bits not in (None, 8):
            raise QuantizationError(f"unsupported embedding_bits {self.embedding_bits!r}: expected 8 or null")
        if self.format_version == 1 and self.bits == 4:
            raise QuantizationError(
                "this int4 model was written by an older btlm (quantization_config format_version 1, a CPU-specific "
                "layout that crashes or computes garbage on other CPUs): re-run `btlm quantize` on the unquantised model"
            )
        if self.format_version not in (1, FORMAT_VERSION):
            raise QuantizationError(
                f"quantization_config format_version {self.format_version!r} is not supported (expected "
                f"{FORMAT_VERSION}; a newer btlm wrote it?)"
            )


def read_unquantized_btlm_config(path, error: type[Exception] = QuantizationError, quantized_hint: str = "") -> dict:
    """``config.json`` of the unquantised BTLM model directory ``path`` as a dict, or ``error`` naming what is
    wrong: a missing directory, a file, no or invalid ``config.json``, another ``model_type``, or an already
    quantised directory (``quantized_hint`` says what to do instead). Shared by ``btlm quantize`` and
    ``btlm export-gguf``, which both need the full-precision weights."""
    path = Path(path)
    if not path.exists():
        raise error(f"model directory {path} does not exist (this reads a local directory; download a hub "
                    "model first, e.g. with `huggingface-cli download`)")
    if not path.is_dir():
        raise error(f"{path} is a file; expected a BTLM model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise error(f"{path} has no config.json: expected a BTLM model directory (Hugging Face layout)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{config_file} is not valid JSON: {e}") from None
    if raw.get("model_type") != "btlm":
        raise error(f"{config_file} has model_type {raw.get('model_type')!r}; expected 'btlm' (not a BTLM model)")
    if raw.get("quantization_config"):
        method = (raw["quantization_config"] or {}).get("quant_method")
        raise error(f"{path} is already quantised (quantization_config.quant_method {method!r})"
                    + (f"; {quantized_hint}" if quantized_hint else ""))
    return raw

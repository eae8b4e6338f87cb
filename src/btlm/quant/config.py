"""``quantization_config`` of a quantised BTLM directory (``config.json``), as a transformers config class."""

from __future__ import annotations

from transformers.utils.quantization_config import QuantizationConfigMixin

from .packing import QuantizationError, check_settings

#: ``quant_method`` written to config.json; transformers looks the quantizer up by it.
QUANT_METHOD = "btlm_woq"
FORMAT_VERSION = 1


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
        if self.format_version != FORMAT_VERSION:
            raise QuantizationError(
                f"quantization_config format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )

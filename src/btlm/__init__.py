"""btlm: run, train, extend, shrink and evaluate Cerebras BTLM-3B-8k models with PyTorch + transformers.

``import btlm`` registers the BTLM classes with the ``transformers`` Auto classes, so the released
checkpoint loads with ``AutoModelForCausalLM.from_pretrained`` and no ``trust_remote_code``.
"""

from btlm.model import (
    PRESETS,
    BTLMConfig,
    BTLMLMHeadModel,
    BTLMModel,
    config_from_preset,
)
from btlm.quant import register as _register_quantizer
from btlm.tokenizer import load_tokenizer

_register_quantizer()  # directories written by `btlm quantize` load through from_pretrained too

__version__ = "0.1.0"

__all__ = ["PRESETS", "BTLMConfig", "BTLMLMHeadModel", "BTLMModel", "config_from_preset", "load_tokenizer"]

"""transformers integration: ``from_pretrained`` on a directory written by ``btlm quantize``.

transformers 5 looks up ``config.json``'s ``quantization_config.quant_method`` in its quantizer registry
(``register_quantization_config`` / ``register_quantizer``); :func:`btlm.quant.register` adds ours. The
quantizer only *loads* pre-quantised checkpoints: before the weights are read it swaps the model's
``Conv1D`` (and embedding) modules for empty quantised ones whose tensor names match the file, so the
standard loader fills them; afterwards it packs the int4 weights for this CPU's kernel and aligns every
kernel operand, reading those tensors from the checkpoint files (not through the memory map).
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer

from .config import BTLMQuantConfig
from .packing import QuantizationError
from .quantize import prepare_for_inference, replace_with_empty_quantized


class BTLMWeightOnlyQuantizer(HfQuantizer):
    """Loads BTLM int4/int8 weight-only checkpoints onto CPU."""

    requires_calibration = True  # loading only: quantise with `btlm quantize` / quantize_model
    quantization_config: BTLMQuantConfig

    def validate_environment(self, *args, device_map=None, **kwargs):
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if any(d not in (None, "auto") and not str(d).startswith("cpu") for d in devices):
            raise QuantizationError(
                f"btlm int{self.quantization_config.bits} checkpoints run on CPU only; got device_map={device_map!r}"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from btlm.model import BTLMLMHeadModel

        if not isinstance(model, BTLMLMHeadModel):
            raise QuantizationError(
                f"quant_method {self.quantization_config.quant_method!r} is for BTLMLMHeadModel, not {type(model).__name__}"
            )
        replace_with_empty_quantized(model, self.quantization_config)
        self.checkpoint_files = list(checkpoint_files or [])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return prepare_for_inference(model, getattr(self, "checkpoint_files", None))

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

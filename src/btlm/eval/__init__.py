"""Long-context evaluation: per-position loss curves (``btlm eval-long``) and passkey retrieval (``btlm passkey``)."""

from btlm.eval.common import EvalError, ScalingSetting, parse_scaling

__all__ = ["EvalError", "ScalingSetting", "parse_scaling"]

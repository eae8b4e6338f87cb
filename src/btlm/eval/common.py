"""Helpers shared by the long-context evaluations: ALiBi-scaling settings, model loading, figures."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from btlm.model.model import validate_alibi_scaling
from btlm.errors import BTLMError
from btlm.io import atomic_write as write_atomic  # noqa: F401  (used by the evaluations)


class EvalError(BTLMError, ValueError):
    """Bad input or settings for an evaluation (the message names the value and what was expected)."""


@dataclass(frozen=True)
class ScalingSetting:
    """One position-interpolation setting: a display ``label`` and the config's ``alibi_scaling`` value."""

    label: str
    alibi_scaling: dict | None


def parse_scaling(spec: str) -> ScalingSetting:
    """Parse ``none`` | ``fixed:F`` | ``dynamic:L`` into a :class:`ScalingSetting`.

    ``fixed:F`` divides the ALiBi slopes by ``F`` at every length (``{"type": "linear", "factor": F}``);
    ``dynamic:L`` divides them by ``K/L`` only when the ``K`` keys exceed the training length ``L``
    (``{"type": "linear", "train_seq_len": L}``). The model config requires ``F > 1``; ``fixed:1`` is
    accepted here and means no scaling, since dividing by 1 is the identity.
    """
    text = spec.strip().lower()
    if text == "none":
        return ScalingSetting("none", None)
    kind, _, value = text.partition(":")
    try:
        if kind == "fixed":
            factor = float(value)
            if factor == 1.0:
                return ScalingSetting("fixed:1", None)
            scaling = {"type": "linear", "factor": factor}
            label = f"fixed:{factor:g}"
        elif kind == "dynamic":
            scaling = {"type": "linear", "train_seq_len": _parse_length(value)}
            label = f"dynamic:{scaling['train_seq_len']}"
        else:
            raise EvalError(f"unknown ALiBi scaling {spec!r}: expected none, fixed:F (F >= 1) or dynamic:L")
        validate_alibi_scaling(scaling)
    except ValueError as err:
        if isinstance(err, EvalError):
            raise
        raise EvalError(f"bad ALiBi scaling {spec!r}: {err}") from None
    return ScalingSetting(label, scaling)


def _parse_length(text: str) -> int:
    """``"8192"`` / ``"8k"`` (= 8192) → int; raises EvalError otherwise."""
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise EvalError(f"bad length {text!r}: expected an integer such as 8192 or 8k") from None


def parse_lengths(text: str) -> list[int]:
    """Comma-separated lengths such as ``1k,2k,4096`` → ``[1024, 2048, 4096]`` (each > 0)."""
    lengths = [_parse_length(part) for part in text.split(",") if part.strip()]
    if not lengths or any(n <= 0 for n in lengths):
        raise EvalError(f"bad lengths {text!r}: expected positive comma-separated lengths such as 1k,2k,4k")
    return lengths


def load_for_context(model_path: str, context: int, dtype=None, device=None):
    """Load a model whose ``n_positions`` admits ``context`` tokens; returns ``(model, trained_n_positions)``.

    Raising ``n_positions`` is how BTLM runs past its training length (ALiBi has no position table); the
    scaling setting is switched later on the loaded model (see :func:`apply_scaling`), so the weights are
    loaded once for all settings. ``device`` None means CUDA when available, else CPU (always CPU for a
    quantised model, which refuses any other device).
    """
    from btlm.io import load_model, read_config, resolve_device

    trained = read_config(model_path).n_positions if Path(model_path, "config.json").is_file() else None
    overrides = {"n_positions": max(context, trained or 0)}
    device = resolve_device(device, model_path) if not isinstance(device, torch.device) else device
    model = load_model(model_path, dtype=dtype, device=device, **overrides)
    return model, trained


def apply_scaling(model, setting: ScalingSetting) -> None:
    """Switch ``model`` to ``setting``: the forward pass reads ``config.alibi_scaling`` on every call."""
    validate_alibi_scaling(setting.alibi_scaling)
    model.config.alibi_scaling = None if setting.alibi_scaling is None else dict(setting.alibi_scaling)


def model_label(path: str | os.PathLike) -> str:
    """A short plot label for a model directory: its last two path parts (``runs/tiny_pi/hf`` →
    ``tiny_pi/hf``), since exported models often live in generically named ``hf/`` folders."""
    return "/".join(Path(path).resolve().parts[-2:])


def save_figure_atomic(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())

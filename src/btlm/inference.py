"""Initialise and generate: the library functions behind ``btlm init`` and ``btlm generate``.

Loading and saving model directories lives in :mod:`btlm.io` (re-exported here: ``load_model``,
``save_model``, ``ModelLoadError``, ``parse_dtype``).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

from btlm.errors import BTLMError, UsageError
from btlm.io import ModelLoadError, load_model, parse_dtype, read_config, resolve_tokenizer, save_model
from btlm.model import BTLMLMHeadModel, config_from_preset

__all__ = ["ModelLoadError", "choose_device", "check_generation_args", "context_overrides", "generate_batch", "generate_text", "init_model_dir", "load_model",
           "parse_dtype", "read_prompts", "resolve_tokenizer", "save_model"]


def init_model_dir(preset: str, out_dir: str | os.PathLike, seed: int = 0, dtype=None, overwrite: bool = False,
                   **overrides) -> Path:
    """Write a randomly initialised BTLM of a preset shape (muP init) plus tokenizer to ``out_dir``.

    An existing non-empty ``out_dir`` is refused unless ``overwrite`` (see :func:`btlm.io.atomic_dir`)."""
    from btlm.io import check_output_dir

    check_output_dir(out_dir, overwrite)
    config = config_from_preset(preset, **overrides)
    torch.manual_seed(seed)
    dtype = parse_dtype(dtype)
    model = BTLMLMHeadModel(config)
    if dtype not in (None, "auto"):
        model = model.to(dtype)
    return save_model(model, out_dir, overwrite=overwrite)


def choose_device(path: str | os.PathLike, device: str | None = None) -> str:
    """The device to run the model at ``path`` on (see :func:`btlm.io.resolve_device`): ``device`` if
    given, else CUDA when available, else CPU; quantised models always CPU."""
    from btlm.io import resolve_device

    return str(resolve_device(device, path))


def check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """One clear error, before any compute, when the prompt plus the new tokens exceed ``n_positions``."""
    limit = getattr(model.config, "n_positions", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise BTLMError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} is longer than "
                        f"n_positions={limit}; to generate past the trained length raise it with --n-positions N "
                        "--alibi-scaling dynamic")


def generate_text(model, tokenizer, prompt: str, stream: bool = False, **gen_kwargs) -> str:
    """Generate a continuation of ``prompt``; with ``stream`` the text is printed as it is produced."""
    from transformers import TextStreamer

    if not prompt:
        raise UsageError("--prompt is empty: give the text to continue, e.g. --prompt 'Hello'")
    check_generation_args(**gen_kwargs)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    check_length(model, inputs["input_ids"].shape[1], gen_kwargs.get("max_new_tokens", 20))
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    if gen_kwargs.get("num_beams", 1) > 1:
        streamer = None  # beam search has no single stream to print
    gen_kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    if model.device.type == "cpu":  # pre-allocated K/V: no torch.cat of the whole cache per token (docs/quant.md)
        gen_kwargs.setdefault("cache_implementation", "static")
    output = model.generate(**inputs, streamer=streamer, **gen_kwargs)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def generate_batch(model, tokenizer, prompts: list[str], batch_size: int = 8, **gen_kwargs) -> list[str]:
    """Continuations (without the prompt) of ``prompts``, generated ``batch_size`` at a time in left-padded
    batches (exact for BTLM: ALiBi sees only distances, and padded keys are masked)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(model.device)
        check_length(model, batch["input_ids"].shape[1], gen_kwargs.get("max_new_tokens", 20))
        ids = model.generate(**batch, **gen_kwargs)
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of ``path`` (``-``: standard input)."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise BTLMError(f"prompt file {path} does not exist") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise BTLMError(f"no prompts in {'standard input' if path == '-' else path} (one prompt per line)")
    return prompts


def context_overrides(model_path: str, n_positions: int | None = None, alibi_scaling: str | None = None) -> dict:
    """Config overrides to generate past the trained length, as the model card shows.

    ``n_positions`` raises the position limit; ``alibi_scaling`` is ``dynamic`` (interpolate by ``K /
    trained length`` once ``K`` keys exceed the checkpoint's ``n_positions``), ``dynamic:L``, ``fixed:F``
    or ``none``.
    """
    from btlm.eval.common import parse_scaling

    overrides = {}
    if n_positions is not None:
        if n_positions < 1:
            raise UsageError(f"--n-positions must be >= 1, got {n_positions}")
        overrides["n_positions"] = n_positions
    if alibi_scaling is not None:
        spec = alibi_scaling.strip().lower()
        if spec == "dynamic":
            spec = f"dynamic:{read_config(model_path).n_positions}"
        overrides["alibi_scaling"] = parse_scaling(spec).alibi_scaling
    return overrides


def check_generation_args(max_new_tokens: int = 1, num_beams: int = 1, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, no_repeat_ngram_size: int = 0, **_ignored) -> None:
    """Range-check the generation settings before the model runs (``num_beams=0`` otherwise divides by
    zero deep inside ``generate``, ``top_p=2`` is silently accepted)."""
    checks = [("max-new-tokens", max_new_tokens, max_new_tokens >= 1, "an integer >= 1"),
              ("num-beams", num_beams, num_beams >= 1, "an integer >= 1"),
              ("temperature", temperature, temperature > 0, "a number > 0"),
              ("top-k", top_k, top_k >= 0, "an integer >= 0 (0 = no top-k filtering)"),
              ("top-p", top_p, 0 < top_p <= 1, "a probability in (0, 1]"),
              ("no-repeat-ngram-size", no_repeat_ngram_size, no_repeat_ngram_size >= 0, "an integer >= 0")]
    for name, value, ok, expected in checks:
        if not ok:
            raise UsageError(f"--{name} {value}: expected {expected}")

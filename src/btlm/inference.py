"""Load, save, initialise and generate: the functions behind ``btlm init`` and ``btlm generate``.

Every model the project writes goes through :func:`save_model`, which puts the tokenizer next to the
weights and writes the directory atomically (a temporary sibling directory renamed into place).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from btlm.model import BTLMConfig, BTLMLMHeadModel, config_from_preset, PRESETS
from btlm.tokenizer import load_tokenizer, save_tokenizer

MULTI_COMMAND = True  # this module serves `btlm init` and `btlm generate` (see btlm.cli)

_DTYPES = {"auto": "auto", "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model directory or checkpoint that cannot be loaded as BTLM (the message says why)."""


def parse_dtype(name: str | torch.dtype | None):
    """``"fp32"``/``"bf16"``/``"fp16"``/``"auto"`` (or a ``torch.dtype``) → what ``from_pretrained`` takes."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _check_model_dir(path: str) -> None:
    """Fail early, naming the path, for a local directory that cannot hold a model.

    A string that is not an existing path but has the hub form ``owner/name`` is left to the hub
    machinery (e.g. ``cerebras/btlm-3b-8k-base``)."""
    p = Path(path)
    if not p.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", path):
            return
        raise ModelLoadError(f"model directory {path} does not exist")
    if not p.is_dir():
        raise ModelLoadError(f"{path} is a file; expected a model directory")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{path} has no weights (model*.safetensors or pytorch_model*.bin)")


def load_model(path: str | os.PathLike, dtype=None, device=None, **config_overrides) -> BTLMLMHeadModel:
    """Load a BTLM checkpoint (a local directory or a hub id) in the released HF layout.

    Accepts ``pytorch_model.bin`` (loaded with ``weights_only``), ``model.safetensors`` and sharded
    variants; legacy ``attn.bias``/``attn.masked_bias`` buffers are ignored. Missing keys or wrong
    shapes raise :class:`ModelLoadError` naming them, instead of leaving randomly initialised weights.
    ``config_overrides`` edit the config before loading (e.g. ``n_positions=16384,
    alibi_scaling={"type": "linear", "train_seq_len": 8192}``).
    """
    path = str(path)
    _check_model_dir(path)
    config = BTLMConfig.from_pretrained(path, **config_overrides)
    # ignore_mismatched_sizes only defers the shape check to us, so the error can name the keys.
    model, info = BTLMLMHeadModel.from_pretrained(
        path, config=config, dtype=parse_dtype(dtype) or "auto", output_loading_info=True, ignore_mismatched_sizes=True
    )
    missing = sorted(k for k in info["missing_keys"] if k != "lm_head.weight")
    mismatched = [f"{k[0]} (checkpoint {list(k[1])}, model {list(k[2])})" if isinstance(k, tuple) and len(k) == 3 else str(k)
                  for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise ModelLoadError(
            f"checkpoint {path} does not match its config.json: missing keys {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}; wrong shapes {mismatched[:8]}"
        )
    if device is not None:
        model = model.to(device)
    return model.eval()


def save_model(model: BTLMLMHeadModel, out_dir: str | os.PathLike, tokenizer=None, **save_kwargs) -> Path:
    """Write ``model`` (config.json + safetensors in the released layout) and the tokenizer to ``out_dir``.

    The files are written into a temporary sibling directory that replaces ``out_dir`` only when
    complete, so a killed process never leaves a half-written model that looks finished.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, **save_kwargs)
        save_tokenizer(tmp, tokenizer)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def init_model_dir(preset: str, out_dir: str | os.PathLike, seed: int = 0, dtype=None, **overrides) -> Path:
    """Write a randomly initialised BTLM of a preset shape (muP init) plus tokenizer to ``out_dir``."""
    config = config_from_preset(preset, **overrides)
    torch.manual_seed(seed)
    dtype = parse_dtype(dtype)
    model = BTLMLMHeadModel(config)
    if dtype not in (None, "auto"):
        model = model.to(dtype)
    return save_model(model, out_dir)


def generate_text(model, tokenizer, prompt: str, stream: bool = False, **gen_kwargs) -> str:
    """Generate a continuation of ``prompt``; with ``stream`` the text is printed as it is produced."""
    from transformers import TextStreamer

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    if gen_kwargs.get("num_beams", 1) > 1:
        streamer = None  # beam search has no single stream to print
    gen_kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    if model.device.type == "cpu":  # pre-allocated K/V: no torch.cat of the whole cache per token (docs/quant.md)
        gen_kwargs.setdefault("cache_implementation", "static")
    output = model.generate(**inputs, streamer=streamer, **gen_kwargs)
    return tokenizer.decode(output[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- CLI


def _init_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btlm init", description=(
        "Write a randomly initialised BTLM model (muP init) and the GPT-2 tokenizer in the released HF "
        "layout, for offline use, tests and benchmarks."))
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (3b = the released shape)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=sorted(k for k in _DTYPES if k != "auto"), help="storage dtype")
    return p


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="btlm generate", description=(
        "Generate text with a BTLM model. Output is streamed token by token (except with beam search)."))
    p.add_argument("--model", required=True, help="model directory or hub id (e.g. cerebras/btlm-3b-8k-base)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES),
                   help="compute dtype (fp32 default: bf16 matmuls are slow on CPUs without AVX512-BF16; auto: on CPU "
                        "bf16 where this CPU has native bf16 and measures it faster, else fp32; on GPU the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true", help="print the whole text at the end instead of streaming")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in ("init", "generate") else ("generate", argv)
    try:
        if command == "init":
            args = _init_parser().parse_args(rest)
            out = init_model_dir(args.preset, args.out, seed=args.seed, dtype=args.dtype)
            print(f"wrote a random {args.preset} BTLM to {out}")
            return 0
        args = _generate_parser().parse_args(rest)
        torch.manual_seed(args.seed)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype
        if dtype == "auto" and torch.device(device).type == "cpu":  # bf16 only where this CPU runs it faster
            from btlm.precision import choose_cpu_dtype

            choice = choose_cpu_dtype()
            print(f"--dtype auto: {choice}", file=sys.stderr)
            dtype = choice.dtype
        model = load_model(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model) if Path(args.model, "tokenizer_config.json").is_file() else load_tokenizer()
        stream = not args.no_stream and args.num_beams == 1
        text = generate_text(
            model, tokenizer, args.prompt, stream=stream, max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        if not stream:
            print(text)
        return 0
    except (ModelLoadError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

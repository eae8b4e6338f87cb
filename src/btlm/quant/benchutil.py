"""Shared pieces of ``benchmarks/memory.py`` and ``benchmarks/decode.py``: the random 3B checkpoints, a
child-process runner (so each measurement's peak RSS is its own) and the machine's memory-read bandwidth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_WORKDIR = Path(os.environ.get("BTLM_BENCH_DIR", "/tmp/btlm-bench"))
#: dtype argument for from_pretrained per variant; quantised dirs carry their own (fp32 unquantised parts)
LOAD_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "int8": "auto", "int4": "auto"}


def add_checkpoint_arguments(parser, default_out: Path) -> None:
    """``--reuse``, ``--preset``, ``--workdir`` and ``--out``, shared by the benchmarks that run on the random
    3B checkpoints."""
    parser.add_argument("--reuse", action="store_true",
                        help="reuse rows measured by an earlier run with the same settings (kept in --workdir)")
    parser.add_argument("--preset", default="3b", help="model shape (3b; small/tiny for a quick check)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the random checkpoints are kept")
    parser.add_argument("--out", type=Path, default=default_out, help=f"result file (default {default_out})")


def ensure_checkpoints(workdir: Path, variants, preset: str = "3b") -> dict[str, Path]:
    """Random-weight checkpoints ``workdir/<preset>-<variant>`` (written once, reused by later runs)."""
    from .synthetic import write_random_checkpoint

    return {v: write_random_checkpoint(workdir / f"{preset}-{v}", v, preset=preset) for v in variants}


def run_child(script: str, *args: str, timeout: float = 1800) -> dict:
    """Run ``python script --child args…`` and parse the JSON on its last stdout line."""
    res = subprocess.run([sys.executable, script, "--child", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode:
        lines = res.stderr.strip().splitlines() or [f"exit code {res.returncode}"]
        return {"error": lines[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def load_for_benchmark(path: str, variant: str, attn: str = "sdpa"):
    """``AutoModelForCausalLM.from_pretrained`` as a user would call it, after ``import btlm``."""
    import btlm  # noqa: F401  (registers the model classes)
    from transformers import AutoModelForCausalLM

    from . import register

    register()
    dtype = LOAD_DTYPE[variant]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype, dtype), attn_implementation=attn)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of every parameter (tied ones once): what one decode step has to read from memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-``repeats`` read bandwidth (GB/s) of summing a ``gib`` GiB fp32 tensor with all threads."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def write_result(path: Path, lines: list[str]) -> None:
    """Write a benchmark's Markdown result atomically (temp file + rename) and echo it."""
    from btlm.io import atomic_write

    atomic_write(path, "\n".join(lines))
    print("\n".join(lines))

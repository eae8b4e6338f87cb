"""Shared pieces of the benchmark scripts (``memory.py``, ``decode.py``, ``train_step.py``): the random 3B
checkpoints, a child-process runner (so each measurement's peak RSS is its own), the machine's description
and memory-read bandwidth. Not part of the library: the scripts import it as ``_common`` (run as
``python benchmarks/<script>.py``, this folder is first on ``sys.path``)."""

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
    from _random_checkpoint import write_random_checkpoint

    return {v: write_random_checkpoint(workdir / f"{preset}-{v}", v, preset=preset) for v in variants}


def run_child(script: str, *args: str, timeout: float = 1800, capability: str | None = None) -> dict:
    """Run ``python script --child args…`` (under ``ATEN_CPU_CAPABILITY=capability`` if given) and parse the
    JSON on its last stdout line."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability) if capability else None
    res = subprocess.run([sys.executable, script, "--child", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if res.returncode:
        lines = res.stderr.strip().splitlines() or [f"exit code {res.returncode}"]
        return {"error": lines[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def load_for_benchmark(path: str, variant: str, attn: str = "sdpa"):
    """``AutoModelForCausalLM.from_pretrained`` as a user would call it, after ``import btlm``."""
    import btlm  # noqa: F401  (registers the model classes)
    from transformers import AutoModelForCausalLM

    from btlm.quant import register

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


def machine_description() -> str:
    """One line naming this machine's CPU as the benchmarks depend on it: model, threads, PyTorch's kernel
    capability, the vector / bf16 flags present."""
    from btlm.precision import NATIVE_BF16_FLAGS, cpu_facts

    facts = cpu_facts()
    model = "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    shown = sorted(f for f in facts.flags if f in {"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"} | NATIVE_BF16_FLAGS)
    return (f"{model}, {torch.get_num_threads()} threads, PyTorch CPU capability {facts.capability} "
            f"(flags: {' '.join(shown) or 'none of avx2/avx512/bf16'}), torch {torch.__version__}")


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def write_result(path: Path, lines: list[str]) -> None:
    """Write a benchmark's Markdown result atomically (temp file + rename) and echo it."""
    from btlm.io import atomic_write

    atomic_write(path, "\n".join(lines))
    print("\n".join(lines))


def lora_vs_full_rows(rows: list[dict], extra: tuple[str, ...] = ()) -> list[str]:
    """Markdown table rows comparing fine-tuning variants with the first one (the full fine-tune): step seconds
    and peak memory, each with its ratio to the first, trainable parameters, optimizer state MiB, then the
    ``extra`` fields as they are."""
    full = rows[0]
    return [f"| {r['variant']} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f}× | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / full['peak_mib']:.2f}× | {r['trainable']:,} of {r['total']:,} | "
            f"{r['optimizer_state_mib']:.1f} |" + "".join(f" {r[k]} |" for k in extra) for r in rows]

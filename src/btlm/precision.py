"""bf16 or fp32 on this CPU? Chosen from the CPU's features and a short measurement, not assumed.

bf16 matmuls are the fastest thing a CPU with AVX512-BF16 or AMX does (2048³ ``torch.mm``: 410 GFLOP/s
against 180 for fp32 on an EPYC with AVX512-BF16), and the slowest thing a CPU without them does (14–33×
slower than fp32 on AVX2 machines: emulated). So:

1. without a native bf16 instruction in the CPU's flags (``avx512_bf16``, ``amx_bf16``; ``bf16`` on Arm)
   the answer is fp32, with no measurement (an emulated bf16 matmul is too slow to even measure briefly);
2. with one, a bf16 and an fp32 matmul are timed (well under a second) and bf16 is chosen only if it is
   at least :data:`MIN_SPEEDUP` times faster here (a BIOS, a VM or the PyTorch build can hide the units).

Used by ``btlm run CPU`` (``mixed_precision: true``) and ``btlm generate --dtype auto``. The CPU facts
and the measurement can be passed in, so the choice is testable for any CPU.
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

#: CPU flags that mean bf16 matmuls run in hardware (x86: AVX512-BF16, AMX; Arm: the BF16 extension).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: bf16 must beat fp32 by this factor to be chosen (it also costs accuracy).
MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class CPUFacts:
    """What the choice depends on: the CPU's feature flags, the kernel set PyTorch dispatches to, the ISA."""

    flags: frozenset[str]
    capability: str = "unknown"
    machine: str = "unknown"


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: torch.dtype
    reason: str
    #: measured matmul GFLOP/s per dtype name, where measured
    measured: dict | None = None

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_facts() -> CPUFacts:
    """This machine's :class:`CPUFacts` (flags from ``/proc/cpuinfo``; empty where it does not exist)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86 / Arm
                flags.update(value.split())
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        capability = "unknown"
    return CPUFacts(frozenset(flags), capability, platform.machine())


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n``³ ``torch.mm`` in ``dtype`` on this CPU (all threads)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def choose_cpu_dtype(facts: CPUFacts | None = None,
                     measure: Callable[[torch.dtype], float] | None = None,
                     min_speedup: float = MIN_SPEEDUP) -> PrecisionChoice:
    """bf16 where this CPU has native bf16 matmuls *and* they measure ``min_speedup``× faster than fp32,
    else fp32; the returned reason says which facts decided. ``facts`` and ``measure`` (dtype → GFLOP/s)
    default to this machine's; without arguments the result is computed once per process."""
    if facts is None and measure is None and min_speedup == MIN_SPEEDUP:
        return _choice_for_this_cpu()
    facts = facts or cpu_facts()
    native = sorted(NATIVE_BF16_FLAGS & facts.flags)
    if not native:
        return PrecisionChoice(torch.float32, f"no native bf16 matmul on this CPU (none of "
                               f"{', '.join(sorted(NATIVE_BF16_FLAGS))} in its flags; {facts.machine}, "
                               f"PyTorch kernels {facts.capability}): bf16 would be emulated, many times slower")
    measure = measure or matmul_gflops
    bf16, fp32 = measure(torch.bfloat16), measure(torch.float32)
    measured = {"bf16": bf16, "fp32": fp32}
    ratio = bf16 / fp32 if fp32 > 0 else float("inf")
    facts_text = f"CPU has {', '.join(native)}; matmul measured bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s ({ratio:.2f}x)"
    if ratio >= min_speedup:
        return PrecisionChoice(torch.bfloat16, facts_text, measured)
    return PrecisionChoice(torch.float32, f"{facts_text}, below the {min_speedup}x that bf16's lost precision needs",
                           measured)


@functools.lru_cache(maxsize=1)
def _choice_for_this_cpu() -> PrecisionChoice:
    return choose_cpu_dtype(cpu_facts(), matmul_gflops, MIN_SPEEDUP)

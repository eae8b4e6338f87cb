"""PyTorch's weight-only CPU kernels behind one door: packing for the running CPU, alignment, fallback.

* **Packing.** ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` lays the int4 codes out differently
  for each CPU capability (``default``, ``AVX2``, ``AVX512``: three different byte strings for the same
  input). Files therefore hold a canonical layout (:func:`btlm.quant.packing.pack_nibbles`) and
  :func:`int4_pack` converts it, in the running process, for the running kernel.
* **Alignment.** The AVX-512 kernels fault on operands that are not 64-byte aligned (a tensor viewed
  straight from a memory-mapped safetensors file sits wherever the file puts it). :func:`aligned` copies
  such a tensor; every operand handed to a kernel goes through it, so alignment is checked, not assumed.
* **Fallback.** Whether a kernel works on this CPU / build is found out once per process by running it on
  a small known input (:func:`available`). Where it raises or computes something else, the callers
  dequantise and use a dense matmul instead, after one warning line.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("btlm.quant")

#: Byte alignment of every tensor handed to a packed kernel (a cache line; what the AVX-512 kernels need).
ALIGNMENT = 64

_available: dict[str, bool] = {}


def cpu_capability() -> str:
    """The kernel set ATen dispatches to in this process (``DEFAULT``, ``AVX2``, ``AVX512``, …)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old / exotic builds
        return "unknown"


def is_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGNMENT == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is contiguous and 64-byte aligned, else a contiguous copy that is (checked)."""
    if t.is_contiguous() and is_aligned(t):
        return t
    out = t.contiguous().clone() if t.is_contiguous() else t.contiguous()
    if not is_aligned(out):  # the allocator aligns to 64 on x86; make sure anyway
        nbytes = out.numel() * out.element_size()
        buf = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
        offset = (-buf.data_ptr()) % ALIGNMENT
        out = buf[offset:offset + nbytes].view(t.dtype).view(t.shape).copy_(t)
    if not is_aligned(out):
        raise RuntimeError(f"could not allocate a {ALIGNMENT}-byte aligned copy of a {tuple(t.shape)} tensor")
    return out


# The raw operators, looked up at call time (a build without them raises AttributeError, which the probe
# turns into the fallback). Tests replace these to simulate a CPU without the kernel.
def _int4_pack_op(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def _int4_mm_op(x, packed, group_size: int, scales_and_zeros):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def _int8_mm_op(x, weight, scales):
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes (0..15, any integer dtype) → the int4 kernel's layout for *this* CPU, aligned."""
    return aligned(_int4_pack_op(codes.to(torch.int32).contiguous()))


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` (bf16 ``x`` ``[M, K]``) with ``packed`` from :func:`int4_pack`; every operand aligned."""
    return _int4_mm_op(aligned(x), aligned(packed), group_size, aligned(scales_and_zeros))


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight · scales)ᵀ`` (bf16 ``x``, int8 ``weight`` ``[N, K]``, bf16 ``scales`` ``[N]``), aligned."""
    return _int8_mm_op(aligned(x), aligned(weight), aligned(scales))


def _probe(kind: str) -> None:
    """Run one kernel on a small known input; raise if it fails or computes something else."""
    from .packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=gen)
    x = torch.randn(3, 128, generator=gen).bfloat16()
    if kind == "int4":
        q, sz = quantize_int4(w, 32)
        y, ref = int4_mm(x, int4_pack(q), 32, sz), x.float() @ dequantize_int4(q, sz).T
    else:
        q, scale = quantize_int8(w)
        y, ref = int8_mm(x, q, scale), x.float() @ dequantize_int8(q, scale).T
    err = (y.float() - ref).abs().max().item()
    if not err <= 2e-2 * ref.abs().max().item():
        raise RuntimeError(f"wrong result on a test input (max error {err:.3g})")


def available(kind: str) -> bool:
    """Whether PyTorch's ``kind`` (``"int4"`` / ``"int8"``) weight-only kernel works here (probed once;
    a warning line says so when it does not, and the caller falls back to dequantise + dense matmul)."""
    if kind not in _available:
        try:
            _probe(kind)
            _available[kind] = True
        except Exception as e:  # missing operator, no kernel for this CPU, wrong numbers
            _available[kind] = False
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            logger.warning("btlm: PyTorch's %s weight-only kernel is not usable on this CPU (capability %s: %s); "
                           "%s layers dequantise and use a dense matmul instead (same weights, slower)",
                           kind, cpu_capability(), reason[:200], kind)
    return _available[kind]


def reset() -> None:
    """Forget the probe results (tests that simulate another CPU)."""
    _available.clear()

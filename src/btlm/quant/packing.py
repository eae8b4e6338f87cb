"""Weight-only quantisation math: group-wise asymmetric int4 and per-channel symmetric int8.

Conventions follow PyTorch's own CPU weight-only kernels, which do the matmuls:

* int4 (``torch.ops.aten._weight_int4pack_mm_for_cpu``): a weight ``W[n, k]`` (``nn.Linear`` layout,
  ``N`` outputs × ``K`` inputs) is split along ``K`` into groups of ``group_size``; each (group, n) has a
  ``scale`` and a ``zero`` and ``W ≈ (q - 8) · scale + zero`` with ``q ∈ [0, 15]``. The kernel takes the
  scales and zeros as one ``[K / group_size, N, 2]`` tensor. We checked this formula numerically against
  the kernel (``tests/quant/test_packing.py``).
* int8 (``torch.ops.aten._weight_int8pack_mm``): ``W ≈ q · scale[n]``, ``q ∈ [-127, 127]``.

Shape rules the kernels impose (found by probing torch 2.13; violating the int8 one segfaults):
int4 needs ``group_size ∈ {32, 64, 128, 256}`` and ``K`` a multiple of it; int8 needs ``K`` a multiple of
16. BTLM's FFN width 6826 meets neither, so ``K`` is zero-padded (the activations are zero-padded the same
way, so the padded columns contribute exactly nothing) and ``N`` is padded to a multiple of 32 (the int4
kernel needs a multiple of 16 on every capability; 32 leaves no ragged block on any of them).

Files store the codes in a canonical layout (:func:`pack_nibbles`), not in a kernel's: the kernels' packed
layouts differ per CPU capability, so packing for the running CPU happens at load time
(:mod:`btlm.quant.kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from btlm.errors import BTLMError

#: Group sizes the int4 CPU kernel accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
SUPPORTED_BITS = (4, 8)
#: int4 output rows (N) are zero-padded to a multiple of this.
INT4_N_MULTIPLE = 32
INT8_K_MULTIPLE = 32


class QuantizationError(BTLMError, ValueError):
    """Bad quantisation settings (bit width, group size) or an unsupported model/directory."""


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def check_settings(bits: int, group_size: int | None) -> None:
    """Raise :class:`QuantizationError` naming the bad value if ``bits``/``group_size`` are unsupported."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"unsupported bit width {bits!r}: expected one of {SUPPORTED_BITS}")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(
            f"unsupported group size {group_size!r} for int4: expected one of {INT4_GROUP_SIZES} "
            "(PyTorch's int4 CPU kernel only takes these; widths that are not a multiple are zero-padded)"
        )


def pad_weight(weight: torch.Tensor, n_multiple: int, k_multiple: int) -> torch.Tensor:
    """Zero-pad an ``[N, K]`` weight to multiples of ``n_multiple`` rows and ``k_multiple`` columns."""
    n, k = weight.shape
    return F.pad(weight, (0, round_up(k, k_multiple) - k, 0, round_up(n, n_multiple) - n))


# ------------------------------------------------------------------------------------------------ int4


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 of an ``[N, K]`` weight (``nn.Linear`` layout).

    Returns ``q`` (uint8 ``[Np, Kp]``, values 0..15, padded rows/columns are zero weights) and
    ``scales_and_zeros`` (bf16 ``[Kp / group_size, Np, 2]``). Scales and zeros are rounded to bf16
    *before* ``q`` is computed, so the stored codes are the best ones for the stored scales.
    """
    w = pad_weight(weight.float(), INT4_N_MULTIPLE, group_size)
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)
    w_min, w_max = groups.amin(-1), groups.amax(-1)
    scale = ((w_max - w_min) / 15).clamp(min=1e-8).bfloat16().float()
    zero = (w_min + 8 * scale).bfloat16().float()
    q = ((groups - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8).round_().clamp_(0, 15)
    scales_and_zeros = torch.stack([scale.T, zero.T], dim=-1).bfloat16().contiguous()
    return q.to(torch.uint8).view(n, k), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int4`: ``[Np, Kp]`` codes → ``[Np, Kp]`` weights in ``dtype``."""
    n, k = q.shape
    n_groups = scales_and_zeros.shape[0]
    scale = scales_and_zeros[..., 0].T.to(dtype).unsqueeze(-1)  # [N, G, 1]
    zero = scales_and_zeros[..., 1].T.to(dtype).unsqueeze(-1)
    w = (q.view(n, n_groups, k // n_groups).to(dtype) - 8).mul_(scale).add_(zero)
    return w.view(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """The file layout of int4 codes: ``[N, K]`` codes → ``[N, K/2]`` bytes, two codes per byte along ``K``,
    the even column in the low nibble (as GGUF / AWQ). Plain row-major bytes: the same on every CPU."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[N, K/2]`` bytes → ``[N, K]`` uint8 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


# ------------------------------------------------------------------------------------------------ int8


def quantize_int8(weight: torch.Tensor, k_multiple: int = INT8_K_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of an ``[N, K]`` weight: ``(q int8 [N, Kp], scales bf16 [N])``.

    ``K`` is zero-padded to ``k_multiple`` (the int8 kernel needs a multiple of 16; pass 1 for an
    embedding table, which is only gathered and multiplied by full-width activations).
    """
    w = pad_weight(weight.float(), 1, k_multiple)
    scale = (w.abs().amax(-1) / 127).clamp(min=1e-8).bfloat16().float()
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8).contiguous()  # the kernel needs contiguous
    return q, scale.bfloat16()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`."""
    return q.to(dtype) * scales.to(dtype)[:, None]

"""Quantised drop-in modules for BTLM's ``Conv1D`` linears and its tied embedding / LM head.

The int4 / int8 matmuls run in PyTorch's own CPU kernels (:mod:`btlm.quant.kernels`) with **bf16
activations**: on AVX2 CPUs the int4 kernel with fp32 activations is ~10× slower than with bf16 (see
docs/quant.md), so every module casts its input to bf16 for the kernel and casts the result back to the
model's dtype (that of its bias or scale parameter, so ``model.to(dtype)`` keeps working). Where a kernel
is not usable on this CPU, the modules dequantise and use a dense matmul instead (same math, slower).

All stored tensors are ``nn.Parameter(requires_grad=False)`` so ``from_pretrained`` fills them like any
weight; what a kernel needs beyond them (the int4 weight packed for this CPU) is built by
``prepare_kernel`` and never saved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import kernels
from .packing import (
    INT4_N_MULTIPLE,
    INT8_K_MULTIPLE,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    round_up,
    unpack_nibbles,
)

#: Above this many rows (tokens) an int4 matmul dequantises the weight to the activation dtype and
#: uses a dense matmul instead of the int4 kernel. Measured on the 3B shape (2 AVX2 cores): the kernel
#: costs ~1 ms per row per 17.5M weights, dequantise + fp32 matmul ~130 ms + 0.35 ms per row, so the
#: dense route wins above ~200 rows (long prompts); decode (1 row) always uses the kernel.
DEQUANT_MIN_ROWS = 256

#: ``read(name)`` returns a fresh, in-memory copy of this module's stored tensor ``name`` (read from the
#: checkpoint file), or None to use the loaded parameter itself.
Reader = Callable[[str], "torch.Tensor | None"]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _check_cpu(x: torch.Tensor, what: str) -> None:
    if x.device.type != "cpu":
        raise RuntimeError(
            f"{what} runs on CPU only (PyTorch's weight-only CPU kernels); got input on {x.device}. "
            "On GPU load the fp/bf16 model with BitsAndBytesConfig(load_in_4bit=True) instead (docs/quant.md)."
        )


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _read(param: nn.Parameter, read: Reader | None, name: str) -> torch.Tensor:
    fresh = read(name) if read is not None else None
    return param.data if fresh is None else fresh


def _make_kernel_ready(param: nn.Parameter, read: Reader | None, name: str, dtype=None) -> None:
    """Point ``param`` at an aligned (and, with ``dtype``, converted) copy of its data, read from the file
    when ``read`` can (so the memory-mapped pages are never touched)."""
    t = _read(param, read, name)
    param.data = kernels.aligned(t if dtype is None else t.to(dtype))


class Int4Conv1D(nn.Module):
    """``y = x @ W + b`` like GPT-2's ``Conv1D`` (``W`` is ``[in, out]``), from group-wise int4 weights.

    Stored tensors (the file format, the same on every CPU): ``qweight`` uint8 ``[Np, Kp/2]``, the 4-bit
    codes in ``nn.Linear`` orientation, two per byte along ``K`` (:func:`btlm.quant.packing.pack_nibbles`);
    ``scales_and_zeros`` bf16 ``[Kp/group_size, Np, 2]``; ``bias`` ``[out]``. ``Np``/``Kp`` are the padded
    widths (:mod:`btlm.quant.packing`). :meth:`prepare_kernel` packs ``qweight`` for this CPU's int4 kernel
    into ``packed`` (not a parameter: never saved, rebuilt in each process).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = round_up(in_features, group_size)
        self.padded_out = round_up(out_features, INT4_N_MULTIPLE)
        kw = dict(device=device)
        self.qweight = _frozen(torch.zeros(self.padded_out, self.padded_in // 2, dtype=torch.uint8, **kw))
        self.scales_and_zeros = _frozen(
            torch.zeros(self.padded_in // group_size, self.padded_out, 2, dtype=torch.bfloat16, **kw)
        )
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, **kw))
        self.packed: torch.Tensor | None = None  # qweight in this CPU's int4 kernel layout

    @classmethod
    def from_conv1d(cls, conv: Conv1D, group_size: int) -> "Int4Conv1D":
        """Quantise a ``Conv1D`` (its weight is ``[in, out]``)."""
        in_features, out_features = conv.weight.shape
        module = cls(in_features, out_features, group_size, dtype=conv.bias.dtype)
        q, scales_and_zeros = quantize_int4(conv.weight.detach().T, group_size)
        module.qweight.data = pack_nibbles(q)
        module.scales_and_zeros.data = scales_and_zeros
        module.bias.data = conv.bias.detach().clone()
        return module

    def codes(self) -> torch.Tensor:
        """The ``[Np, Kp]`` uint8 codes."""
        return unpack_nibbles(self.qweight)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The ``[out, in]`` (``nn.Linear`` layout) weight the module computes with."""
        w = dequantize_int4(self.codes(), self.scales_and_zeros, dtype)
        return w[: self.out_features, : self.in_features]

    @torch.no_grad()
    def prepare_kernel(self, read: Reader | None = None) -> None:
        """Pack the codes for this CPU's int4 kernel (once) and give the kernel aligned bf16 scales.

        ``read`` (used by the loader) supplies the stored tensors straight from the file, so the packing
        never pages in the memory-mapped ``qweight``: after loading it stays mapped but unread (no
        memory) and is read only to save the model or to dequantise for a long prompt.
        """
        sz = self.scales_and_zeros
        if sz.dtype != torch.bfloat16 or not kernels.is_aligned(sz) or read is not None:
            _make_kernel_ready(sz, read, "scales_and_zeros", torch.bfloat16)
        if self.packed is None and kernels.available("int4"):
            self.packed = kernels.int4_pack(unpack_nibbles(_read(self.qweight, read, "qweight")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x, "Int4Conv1D")
        if self.packed is None:
            self.prepare_kernel()
        out_dtype = self.bias.dtype
        x2 = _pad_last(x.reshape(-1, x.shape[-1]), self.padded_in)
        if self.packed is None or x2.shape[0] >= DEQUANT_MIN_ROWS:  # no kernel here, or a long prompt
            y = F.linear(x2.to(out_dtype), dequantize_int4(self.codes(), self.scales_and_zeros, out_dtype))
        else:
            y = kernels.int4_mm(x2.bfloat16(), self.packed, self.group_size, self.scales_and_zeros)
        y = y[:, : self.out_features].to(out_dtype) + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=4, group_size={self.group_size}"


def _int8_matmul(x2: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out_dtype) -> torch.Tensor:
    """``x2 @ (weight · scales)ᵀ`` in the int8 kernel, or dequantised where the kernel is not usable."""
    if kernels.available("int8"):
        return kernels.int8_mm(x2.bfloat16(), weight, scales.bfloat16()).to(out_dtype)
    return F.linear(x2.to(out_dtype), dequantize_int8(weight, scales, out_dtype))


class Int8Conv1D(nn.Module):
    """``y = x @ W + b`` from per-output-channel int8 weights (``weight_int8`` ``[out, Kp]``)."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.padded_in = round_up(in_features, INT8_K_MULTIPLE)
        self.weight_int8 = _frozen(torch.zeros(out_features, self.padded_in, dtype=torch.int8, device=device))
        self.weight_scale = _frozen(torch.ones(out_features, dtype=torch.bfloat16, device=device))
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, device=device))

    @classmethod
    def from_conv1d(cls, conv: Conv1D) -> "Int8Conv1D":
        in_features, out_features = conv.weight.shape
        module = cls(in_features, out_features, dtype=conv.bias.dtype)
        module.weight_int8.data, module.weight_scale.data = quantize_int8(conv.weight.detach().T)
        module.bias.data = conv.bias.detach().clone()
        return module

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale, dtype)[:, : self.in_features]

    @torch.no_grad()
    def prepare_kernel(self, read: Reader | None = None) -> None:
        """Give the int8 kernel an aligned weight (read from the file by the loader: a tensor viewed from
        the memory-mapped file need not be 64-byte aligned)."""
        if read is not None or not kernels.is_aligned(self.weight_int8):
            _make_kernel_ready(self.weight_int8, read, "weight_int8")
        if read is not None or not kernels.is_aligned(self.weight_scale) or self.weight_scale.dtype != torch.bfloat16:
            _make_kernel_ready(self.weight_scale, read, "weight_scale", torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x, "Int8Conv1D")
        x2 = _pad_last(x.reshape(-1, x.shape[-1]), self.padded_in)
        y = _int8_matmul(x2, self.weight_int8, self.weight_scale, self.bias.dtype)
        return (y + self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8"


class Int8Embedding(nn.Module):
    """Token embedding stored as per-row int8; also serves as the tied LM head (:class:`TiedInt8Head`).

    Per-row scales fit both uses: a lookup dequantises whole rows, and the LM head's output channel ``v``
    is row ``v``, exactly the per-channel scale the int8 kernel wants. ``weight_scale`` is kept in the
    model dtype (it sets the output dtype); the kernel gets a bf16 copy.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_dim = round_up(embedding_dim, INT8_K_MULTIPLE)
        self.weight_int8 = _frozen(torch.zeros(num_embeddings, self.padded_dim, dtype=torch.int8, device=device))
        self.weight_scale = _frozen(torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        module = cls(emb.num_embeddings, emb.embedding_dim, dtype=emb.weight.dtype)
        q, scale = quantize_int8(emb.weight.detach())
        module.weight_int8.data, module.weight_scale.data = q, scale.to(emb.weight.dtype)
        return module

    @torch.no_grad()
    def prepare_kernel(self, read: Reader | None = None) -> None:
        """Aligned weights for the tied head's int8 kernel (see :meth:`Int8Conv1D.prepare_kernel`)."""
        if read is not None or not kernels.is_aligned(self.weight_int8):
            _make_kernel_ready(self.weight_int8, read, "weight_int8")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[input_ids, : self.embedding_dim].to(self.weight_scale.dtype)
        return rows * self.weight_scale[input_ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8"


class TiedInt8Head(nn.Module):
    """The LM head tied to an :class:`Int8Embedding` (``logits = h @ wteᵀ``); owns no tensors.

    The embedding is held outside ``_modules`` so the tensors are stored and counted once.
    """

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self.__dict__["embedding"] = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        _check_cpu(hidden, "TiedInt8Head")
        emb = self.embedding
        h2 = _pad_last(hidden.reshape(-1, hidden.shape[-1]), emb.padded_dim)
        logits = _int8_matmul(h2, emb.weight_int8, emb.weight_scale, hidden.dtype)
        return logits.view(*hidden.shape[:-1], emb.num_embeddings)

"""Quantised drop-in modules for BTLM's ``Conv1D`` linears and its tied embedding / LM head.

The int4 / int8 matmuls run in PyTorch's own CPU kernels with **bf16 activations**: on this AVX2 CPU the
int4 kernel with fp32 activations is ~10× slower than with bf16 (see docs/quant.md), so every module
casts its input to bf16 for the kernel and casts the result back to the model's dtype (that of its bias
or scale parameter, so ``model.to(dtype)`` keeps working).

All tensors are ``nn.Parameter(requires_grad=False)`` so ``from_pretrained`` fills them like any weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .packing import (
    INT8_K_MULTIPLE,
    KERNEL_BLOCK_N,
    dequantize_int4,
    from_kernel_layout,
    quantize_int4,
    quantize_int8,
    round_up,
    to_kernel_layout,
)

#: Above this many rows (tokens) an int4 matmul dequantises the weight to the activation dtype and
#: uses a dense matmul instead of the int4 kernel. Measured on the 3B shape (2 AVX2 cores): the kernel
#: costs ~1 ms per row per 17.5M weights, dequantise + fp32 matmul ~130 ms + 0.35 ms per row, so the
#: dense route wins above ~200 rows (long prompts); decode (1 row) always uses the kernel.
DEQUANT_MIN_ROWS = 256


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


class Int4Conv1D(nn.Module):
    """``y = x @ W + b`` like GPT-2's ``Conv1D`` (``W`` is ``[in, out]``), from group-wise int4 weights.

    Stored tensors: ``qweight`` uint8 ``[Np, Kp/2]``, the 4-bit codes (``nn.Linear`` orientation) already
    in the int4 CPU kernel's blocked layout (:func:`btlm.quant.packing.to_kernel_layout`), so a loaded
    checkpoint is used straight from the memory-mapped file with no conversion copy;
    ``scales_and_zeros`` bf16 ``[Kp/group_size, Np, 2]``; ``bias`` ``[out]``. ``Np``/``Kp`` are the
    padded widths (:mod:`btlm.quant.packing`).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = round_up(in_features, group_size)
        self.padded_out = round_up(out_features, KERNEL_BLOCK_N)
        kw = dict(device=device)
        self.qweight = _frozen(torch.zeros(self.padded_out, self.padded_in // 2, dtype=torch.uint8, **kw))
        self.scales_and_zeros = _frozen(
            torch.zeros(self.padded_in // group_size, self.padded_out, 2, dtype=torch.bfloat16, **kw)
        )
        self.bias = _frozen(torch.zeros(out_features, dtype=dtype, **kw))

    @classmethod
    def from_conv1d(cls, conv: Conv1D, group_size: int) -> "Int4Conv1D":
        """Quantise a ``Conv1D`` (its weight is ``[in, out]``)."""
        in_features, out_features = conv.weight.shape
        module = cls(in_features, out_features, group_size, dtype=conv.bias.dtype)
        q, scales_and_zeros = quantize_int4(conv.weight.detach().T, group_size)
        module.qweight.data = to_kernel_layout(q)
        module.scales_and_zeros.data = scales_and_zeros
        module.bias.data = conv.bias.detach().clone()
        return module

    def codes(self) -> torch.Tensor:
        """The ``[Np, Kp]`` uint8 codes."""
        return from_kernel_layout(self.qweight)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The ``[out, in]`` (``nn.Linear`` layout) weight the module computes with."""
        w = dequantize_int4(self.codes(), self.scales_and_zeros, dtype)
        return w[: self.out_features, : self.in_features]

    @torch.no_grad()
    def prepare_kernel(self) -> None:
        """Keep the scales bf16 as the kernel wants (a loader may have cast them to the model dtype)."""
        if self.scales_and_zeros.dtype != torch.bfloat16:
            self.scales_and_zeros.data = self.scales_and_zeros.data.bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x, "Int4Conv1D")
        self.prepare_kernel()
        out_dtype = self.bias.dtype
        x2 = _pad_last(x.reshape(-1, x.shape[-1]), self.padded_in)
        if x2.shape[0] >= DEQUANT_MIN_ROWS:  # long prompt: a dense matmul is faster (see DEQUANT_MIN_ROWS)
            y = F.linear(x2.to(out_dtype), dequantize_int4(self.codes(), self.scales_and_zeros, out_dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.bfloat16(), self.qweight, self.group_size, self.scales_and_zeros
            )
        y = y[:, : self.out_features].to(out_dtype) + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=4, group_size={self.group_size}"


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
        w = self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]
        return w[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_cpu(x, "Int8Conv1D")
        x2 = _pad_last(x.reshape(-1, x.shape[-1]), self.padded_in).bfloat16()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.weight_scale.bfloat16())
        return (y.to(self.bias.dtype) + self.bias).view(*x.shape[:-1], self.out_features)

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
        h2 = _pad_last(hidden.reshape(-1, hidden.shape[-1]), emb.padded_dim).bfloat16()
        logits = torch.ops.aten._weight_int8pack_mm(h2, emb.weight_int8, emb.weight_scale.bfloat16())
        return logits.to(hidden.dtype).view(*hidden.shape[:-1], emb.num_embeddings)

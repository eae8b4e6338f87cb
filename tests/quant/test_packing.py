"""Quantise/dequantise math and PyTorch's weight-only CPU kernels, checked against our own reference."""

import pytest
import torch

from btlm.quant.packing import (
    INT4_GROUP_SIZES,
    QuantizationError,
    check_settings,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)
from btlm.quant import kernels


def test_file_layout_is_two_nibbles_per_byte_along_k():
    """The documented file layout, byte for byte: low nibble = even column, high nibble = odd column."""
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    assert pack_nibbles(q).tolist() == [[0x21, 0x43], [0x0F, 0x87]]
    q = torch.randint(0, 16, (96, 256), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


@pytest.mark.parametrize("n,k,group_size", [(32, 64, 32), (96, 256, 64), (48, 128, 32), (6848, 256, 128)])
def test_int4_kernel_on_this_cpu_computes_the_canonical_codes(n, k, group_size):
    """Codes packed for the running CPU by torch's own converter give the dequantised weight's product
    (whatever ATEN_CPU_CAPABILITY this runs under)."""
    torch.manual_seed(0)
    q, sz = quantize_int4(torch.randn(n, k), group_size)
    packed = kernels.int4_pack(unpack_nibbles(pack_nibbles(q)))
    x = torch.randn(5, k).bfloat16()
    y = kernels.int4_mm(x, packed, group_size, sz)
    ref = x.float() @ dequantize_int4(q, sz).T
    assert torch.allclose(y.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_aligned_copies_only_what_is_not_aligned():
    base = torch.zeros(1000, dtype=torch.uint8)
    assert kernels.is_aligned(base)
    assert kernels.aligned(base) is base
    view = base[20:520]  # like a tensor viewed from a memory-mapped file at offset 20
    assert not kernels.is_aligned(view)
    copy = kernels.aligned(view)
    assert kernels.is_aligned(copy) and torch.equal(copy, view) and copy.data_ptr() != view.data_ptr()
    strided = torch.arange(64.0).view(8, 8).T
    assert kernels.aligned(strided).is_contiguous() and torch.equal(kernels.aligned(strided), strided)


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_int4_error_per_group_is_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 512) * torch.rand(64, 1) * 3  # rows with different ranges
    q, sz = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert sz.shape == (512 // group_size, 64, 2) and sz.dtype == torch.bfloat16
    err = (dequantize_int4(q, sz) - w).abs().view(64, -1, group_size).amax(-1)  # [N, G]
    step = sz[..., 0].float().T
    # round-to-nearest gives ≤ step/2; the bf16-rounded zero point may shift the grid by ≤ 2^-8 relative.
    assert (err <= 0.5 * step + 2**-8 * w.abs().view(64, -1, group_size).amax(-1) + 1e-6).all()
    # and the grid is actually used: the error is not trivially tiny either
    assert err.mean() > 0.05 * step.mean()


def test_int8_error_per_row():
    torch.manual_seed(0)
    w = torch.randn(48, 100)
    q, scale = quantize_int8(w)
    assert q.shape == (48, 128)  # K zero-padded to a multiple of 32 for the kernel
    assert torch.equal(q[:, 100:], torch.zeros(48, 28, dtype=torch.int8))
    err = (dequantize_int8(q, scale)[:, :100] - w).abs().amax(-1)
    assert (err <= 0.5 * scale.float() * 1.01).all()


def test_int4_kernel_computes_our_dequantised_weight():
    """The kernel's (q - 8)·scale + zero convention is the one our quantiser writes."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q, sz = quantize_int4(w, 64)
    x = torch.randn(5, 256).bfloat16()
    y = kernels.int4_mm(x, kernels.int4_pack(q), 64, sz)
    ref = x.float() @ dequantize_int4(q, sz).T
    assert torch.allclose(y.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_int8_kernel_computes_our_dequantised_weight():
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(48, 96))
    x = torch.randn(3, 96).bfloat16()
    y = kernels.int8_mm(x, q, scale)
    ref = x.float() @ dequantize_int8(q, scale).T
    assert torch.allclose(y.float(), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_padding_is_exact():
    """A width that is no multiple of the group (BTLM's 6826; here 170) is zero-padded, changing nothing."""
    torch.manual_seed(0)
    w = torch.randn(170, 170)
    q, sz = quantize_int4(w, 32)
    assert q.shape == (192, 192)  # N to a multiple of 32, K to a multiple of the group size
    deq = dequantize_int4(q, sz)
    assert torch.equal(deq[170:], torch.zeros(22, 192))  # padded output rows are zero weights
    x = torch.randn(4, 170)
    x_pad = torch.nn.functional.pad(x, (0, 22))
    assert torch.allclose(x_pad @ deq.T[:, :170], x @ deq[:170, :170].T, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,match", [(3, 128, "bit width 3"), (2, None, "bit width 2"),
                                                    (4, 100, "group size 100"), (4, 16, "group size 16"),
                                                    (4, 512, "group size 512"), (4, None, "group size None")])
def test_bad_settings_are_named(bits, group_size, match):
    with pytest.raises(QuantizationError, match=match):
        check_settings(bits, group_size)

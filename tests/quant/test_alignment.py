"""Int8 weights loaded at an unaligned address (safetensors views into the file) are realigned before use."""

import torch

from btlm.quant.modules import Int8Embedding, TiedInt8Head
from btlm.quant.quantize import prepare_for_inference


def test_misaligned_int8_embedding_head_is_realigned_and_runs():
    torch.manual_seed(0)
    emb = Int8Embedding.from_embedding(torch.nn.Embedding(50257, 64))
    expected = TiedInt8Head(emb)(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)))
    buf = torch.zeros(emb.weight_int8.numel() + 64, dtype=torch.int8)
    offset = next(i for i in range(1, 64) if (buf.data_ptr() + i) % 64)
    view = buf[offset:offset + emb.weight_int8.numel()].view_as(emb.weight_int8)
    view.copy_(emb.weight_int8)
    emb.weight_int8.data = view  # as loaded from a file: same values, unaligned address
    assert emb.weight_int8.data_ptr() % 64
    model = torch.nn.Module()
    model.emb = emb
    prepare_for_inference(model)
    assert emb.weight_int8.data_ptr() % 64 == 0
    # without the realignment this call dies with SIGSEGV in torch's AVX512 kernel
    out = TiedInt8Head(emb)(torch.randn(2, 64, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(out, expected)

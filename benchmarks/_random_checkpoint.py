"""Random-weight BTLM checkpoints of the released 3B shape for the memory and speed benchmarks (not part of
the library; imported by ``_common.ensure_checkpoints``).

Writing a 3B checkpoint naively (``BTLMLMHeadModel(config)`` in fp32, then quantise) needs >10 GB of RAM.
Here the model is never materialised: each block is built on the ``meta`` device, filled with random
weights (muP init scales) one at a time, quantised if asked, and written as its own safetensors shard,
so peak memory is one block plus the embedding. The result is an ordinary sharded HF directory
(``model-00001-of-000NN.safetensors`` + index) that ``from_pretrained`` loads like a real checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from btlm.quant.config import BTLMQuantConfig
from btlm.quant.modules import Int4Conv1D, Int8Conv1D, Int8Embedding
from transformers.pytorch_utils import Conv1D

#: variant name → (weights dtype or bits)
VARIANTS = ("fp32", "bf16", "int8", "int4")


def _random_block(config, index: int, dtype: torch.dtype, gen: torch.Generator):
    """One ``BTLMBlock`` with random weights at the model's muP init scales (``mup_init_std`` per kind)."""
    from btlm.model import BTLMBlock, mup_init_std, mup_named_parameters

    with torch.device("meta"):
        block = BTLMBlock(config, index)
    block = block.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for _, kind, p in mup_named_parameters(block):
            if kind == "norm":
                p.fill_(1.0)
            elif kind == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * mup_init_std(config, kind))
    return block


def _quantise_block(block, bits: int, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State dict of ``block`` with its linears quantised and LayerNorms / biases cast to ``dtype``."""
    from btlm.quant.quantize import _set_module, cast_unquantized

    for name, conv in [(n, m) for n, m in block.named_modules() if isinstance(m, Conv1D)]:
        _set_module(block, name, Int4Conv1D.from_conv1d(conv, group_size) if bits == 4 else Int8Conv1D.from_conv1d(conv))
    return cast_unquantized(block, dtype).state_dict()


def write_random_checkpoint(out_dir: str | os.PathLike, variant: str, preset: str = "3b", seed: int = 0,
                            group_size: int = 128, **overrides) -> Path:
    """Write a random-weight BTLM checkpoint as ``variant`` (fp32 / bf16 / int8 / int4) to ``out_dir``.

    Quantised variants are what ``btlm quantize --bits N`` writes (int8 embedding, fp32 LayerNorms and
    biases). An existing complete ``out_dir`` is kept (the directory only appears once complete).
    """
    from btlm.model import alibi_slopes, config_from_preset

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    config = config_from_preset(preset, **overrides)
    weight_dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    bits = {"int8": 8, "int4": 4}.get(variant)
    gen = torch.Generator().manual_seed(seed)
    from btlm.io import atomic_dir

    with atomic_dir(out) as tmp:  # renamed into place when complete
        n_shards = config.n_layer + 1
        weight_map: dict[str, str] = {}
        total = 0

        def write_shard(i: int, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        for i in tqdm(range(config.n_layer), desc=f"random {preset} {variant}"):
            block = _random_block(config, i, weight_dtype if bits is None else torch.bfloat16, gen)
            sd = block.state_dict() if bits is None else _quantise_block(block, bits, group_size, weight_dtype)
            write_shard(i, {f"transformer.h.{i}.{k}": v for k, v in sd.items()})
            del block, sd

        wte = torch.nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.randn(
            config.vocab_size, config.n_embd, generator=gen).mul_(config.initializer_range).to(weight_dtype))
        rest = {"transformer.ln_f.weight": torch.ones(config.n_embd, dtype=weight_dtype),
                "transformer.ln_f.bias": torch.zeros(config.n_embd, dtype=weight_dtype),
                "transformer.relative_pe.slopes": torch.tensor(alibi_slopes(config.n_head)).view(-1, 1).to(weight_dtype)}
        if bits is None:
            rest["transformer.wte.weight"] = wte.weight.data
        else:
            emb = Int8Embedding.from_embedding(wte)
            rest |= {f"transformer.wte.{k}": v for k, v in emb.state_dict().items()}
            config.quantization_config = BTLMQuantConfig(bits=bits, group_size=group_size).to_dict()
        write_shard(config.n_layer, rest)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config.dtype = weight_dtype
        config.save_pretrained(tmp)
    return out

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from btlm.tokenizer import load_tokenizer

    return load_tokenizer()


def make_model(attn="sdpa", seed=0, vocab_size=97, **overrides):
    """A tiny random BTLM with non-trivial biases and LayerNorm affine parameters (so every term matters)."""
    from btlm.model import BTLMLMHeadModel, config_from_preset

    cfg = config_from_preset("tiny", vocab_size=vocab_size, n_positions=256, **overrides)
    torch.manual_seed(seed)
    model = BTLMLMHeadModel._from_config(copy.deepcopy(cfg), attn_implementation=attn).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def with_attn(model, attn):
    """The same weights under another attention implementation."""
    other = type(model)._from_config(copy.deepcopy(model.config), attn_implementation=attn).eval()
    other.load_state_dict(model.state_dict())
    return other

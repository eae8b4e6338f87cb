"""Quantisation quality on a small *trained* model: KL and perplexity change on held-out text stay bounded.

A random model's next-token distributions are nearly flat, so almost any weight error looks harmless on
it; here a tiny BTLM (byte vocabulary, 2 layers × 64 wide) is trained for 150 steps on Python's own
docstrings (perplexity ~15 vs 256 for uniform) and compared with its int8 / int4 copies on the last 10 % of
the text, which it never saw. What this shows: the quantised layers compute what the trained weights
compute, to within the bounds below; it says nothing about a 3B model's benchmark scores.
"""

import copy

import pytest
import torch

from btlm.quant.quality import compare_models, quality_table, train_tiny_byte_model


@pytest.fixture(scope="module")
def trained():
    return train_tiny_byte_model(steps=150)


def test_quantised_quality_is_bounded(trained):
    model, batches = trained
    rows = {r["variant"]: r for r in quality_table(model, batches, variants=((8, None), (4, 32), (4, 64)))}
    assert rows["int8"]["ppl_ref"] < 30  # the model learned something, so the comparison means something
    assert rows["int8"]["kl"] < 5e-4 and abs(rows["int8"]["ppl_rel_diff"]) < 0.005
    for variant in ("int4 g32", "int4 g64"):
        assert rows[variant]["kl"] < 5e-3 and abs(rows[variant]["ppl_rel_diff"]) < 0.03
    assert rows["int8"]["kl"] < rows["int4 g32"]["kl"]  # more bits, closer to fp32


def test_quality_metric_detects_damage(trained):
    """The KL bound above can fail: a model with visibly perturbed weights exceeds it by far."""
    model, batches = trained
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in damaged.transformer.h.parameters():
            p.add_(torch.randn_like(p) * p.std())
    assert compare_models(model, damaged, batches)["kl"] > 5e-3
    assert compare_models(model, model, batches)["kl"] == pytest.approx(0, abs=1e-7)

"""Downstream evaluation goes through lm-eval's ``HFLM`` (an optional extra: ``pip install -e '.[eval]'``).

These tests run where ``lm_eval`` is installed and skip elsewhere (CI does not install it: it pulls
``datasets``, ``scikit-learn`` and more, and its tasks download data). They check what every lm-eval task
is built on: the log-likelihood of a continuation, against a direct computation with the model.
"""

import pytest
import torch

from btlm.inference import save_model
from btlm.tokenizer import load_tokenizer
from tests.conftest import make_model

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
from lm_eval.api.instance import Instance  # noqa: E402

PAIRS = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin"),
         ("def add(a, b):", "\n    return a + b")]


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx, cont = tokenizer(context).input_ids, tokenizer(continuation).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def requests(pairs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


@pytest.fixture(scope="module")
def model():
    return make_model(vocab_size=50257).eval()


def test_hflm_on_a_model_object_matches_direct_loglikelihood(model):
    tokenizer = load_tokenizer()
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=2)
    got = [ll for ll, _ in lm.loglikelihood(requests(PAIRS))]
    want = [direct_loglikelihood(model, tokenizer, *pair) for pair in PAIRS]
    assert got == pytest.approx(want, abs=1e-4)


def test_hflm_loads_a_btlm_directory_without_remote_code(model, tmp_path):
    """``lm_eval --model hf --model_args pretrained=DIR`` after ``import btlm``: no trust_remote_code."""
    import btlm  # noqa: F401  (registers the Auto classes, as a user's script or lm-eval wrapper would)

    path = save_model(model, tmp_path / "m")
    lm = lm_eval_hf.HFLM(pretrained=str(path), backend="causal", batch_size=1, device="cpu")
    got = [ll for ll, _ in lm.loglikelihood(requests(PAIRS[:1]))]
    assert got == pytest.approx([direct_loglikelihood(model, load_tokenizer(), *PAIRS[0])], abs=1e-4)

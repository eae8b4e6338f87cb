"""The torch engine without HTTP: continuous batching against ``generate`` on every compute path."""

import threading
import time

import pytest
import torch

from btlm.serve.engine import EngineError, SamplingParams, TorchEngine, wait_idle
from btlm.tokenizer import load_tokenizer
from tests.conftest import make_model

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog and then", "A",
           "Once upon a time, in a land far away", "1 2 3 4 5 6 7 8 9 10 11 12"]


def run(engine, prompt_ids, n=12, **kw):
    return "".join(c.text for c in engine.submit(prompt_ids, SamplingParams(max_tokens=n, temperature=0, **kw)))


def reference(model, tok, prompt_ids, n=12):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(prompt_ids):])


def concurrent(engine, prompt_ids, n=12):
    """All prompts submitted from threads at staggered times (later ones join a running batch)."""
    results = [None] * len(prompt_ids)

    def worker(i):
        time.sleep(0.003 * i)
        results[i] = run(engine, prompt_ids[i], n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompt_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("variant", ["alibi-sdpa", "alibi-eager", "learned-positions"])
def test_batched_greedy_equals_generate_alone(variant):
    """Left padding + joining/leaving a running batch changes no sequence's greedy tokens, for ALiBi (both
    attention paths) and for learned absolute positions (which need explicit position ids)."""
    tok = load_tokenizer()
    if variant == "learned-positions":
        model = make_model("sdpa", vocab_size=50257, position_embedding_type="learned")
    else:
        model = make_model(variant.split("-")[1], vocab_size=50257)
    engine = TorchEngine(model, tok, max_batch_size=4)  # 5 prompts, 4 slots: one waits for a free slot
    try:
        ids = [tok(p)["input_ids"] for p in PROMPTS]
        expected = [reference(model, tok, p) for p in ids]
        assert run(engine, ids[1]) == expected[1]  # alone
        assert concurrent(engine, ids) == expected
        assert engine.stats()["peak_batch"] > 1
    finally:
        engine.close()


def test_int4_model_is_served_like_generate(tmp_path, tiny_dir):
    from btlm.quant.quantize import quantize_dir

    qdir = quantize_dir(tiny_dir, tmp_path / "tiny-int4", bits=4, group_size=32)
    engine = TorchEngine.from_path(qdir, device="cpu")
    try:
        assert type(engine.model.transformer.h[0].mlp.c_fc).__name__ == "Int4Conv1D"
        ids = [engine.encode(p) for p in PROMPTS[:4]]
        expected = [reference(engine.model, engine.tokenizer, p) for p in ids]
        assert concurrent(engine, ids) == expected
    finally:
        engine.close()


def test_sampling_top_p_and_seeds(tiny_dir):
    engine = TorchEngine.from_path(tiny_dir, device="cpu")
    try:
        ids = engine.encode("BTLM is")
        greedy = run(engine, ids, 20)
        # a nucleus smaller than the top token's probability keeps only that token: greedy
        nucleus = SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, seed=7)
        assert "".join(c.text for c in engine.submit(ids, nucleus)) == greedy
        hot = SamplingParams(max_tokens=20, temperature=1.5, seed=7)
        a, b = ("".join(c.text for c in engine.submit(ids, hot)) for _ in range(2))
        assert a == b != greedy
    finally:
        engine.close()


def test_failed_step_fails_its_requests_and_the_engine_goes_on(tiny_dir, monkeypatch):
    engine = TorchEngine.from_path(tiny_dir, device="cpu")
    try:
        ids = engine.encode(PROMPTS[0])
        expected = run(engine, ids, 8)
        real_forward = engine._forward
        calls = {"n": 0}

        def failing_forward(*args, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated out of memory")
            return real_forward(*args, **kw)

        monkeypatch.setattr(engine, "_forward", failing_forward)
        with pytest.raises(EngineError, match="simulated out of memory"):
            run(engine, ids, 8)
        assert wait_idle(engine) and run(engine, ids, 8) == expected
    finally:
        engine.close()


def test_submit_checks_the_context(tiny_dir):
    engine = TorchEngine.from_path(tiny_dir, device="cpu")
    try:
        with pytest.raises(ValueError, match="longer than the context"):
            engine.submit([1, 2, 3], SamplingParams(max_tokens=8190))
        with pytest.raises(ValueError, match="no tokens"):
            engine.submit([], SamplingParams(max_tokens=1))
    finally:
        engine.close()

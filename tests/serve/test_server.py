"""``btlm serve`` with the torch engine, driven by the real ``openai`` client over HTTP.

One server (uvicorn in a thread, free port) serves a tiny random BTLM for the whole module; the expected
texts come from ``model.generate`` / a plain forward on the same weights.
"""

import json
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from btlm.serve.app import PLAIN_CHAT_STOP, plain_chat_prompt  # noqa: E402
from btlm.serve.engine import TorchEngine  # noqa: E402
from btlm.serve.protocol import ChatMessage  # noqa: E402
from tests.serve.conftest import running_server  # noqa: E402

MODEL = "tiny"
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog and then",
    "A",
    "Once upon a time, in a land far away, there lived",
    "x y z",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "BTLM is",
    "Albert Einstein was known for ",
]


@pytest.fixture(scope="module")
def server(tiny_dir):
    engine = TorchEngine.from_path(tiny_dir, device="cpu", max_batch_size=16)
    with running_server(engine, MODEL) as url:
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_greedy(engine, prompt: str, n: int) -> str:
    """What ``transformers``' generate() produces for the prompt alone (greedy)."""
    tok = engine.tokenizer
    inputs = tok(prompt, return_tensors="pt")
    out = engine.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:])


def complete(client, prompt, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def stream_text(client, prompt, **kw):
    chunks = list(complete(client, prompt, stream=True, **kw))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


# ------------------------------------------------------------------------------------------ basics


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_dump()
    assert card["max_model_len"] == 8192 and card["engine"] == "torch"
    assert card["chat_template"].startswith("plain template")  # BTLM's tokenizer has no chat template
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_equals_generate_greedy(server, client):
    _, engine = server
    res = complete(client, PROMPTS[1], max_tokens=20)
    assert res.choices[0].text == reference_greedy(engine, PROMPTS[1], 20)
    assert res.choices[0].finish_reason == "length" and res.object == "text_completion"
    n_prompt = len(engine.encode(PROMPTS[1]))
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (n_prompt, 20, n_prompt + 20)


def test_streaming_equals_non_streaming(client):
    full = complete(client, PROMPTS[3], max_tokens=24).choices[0].text
    text, chunks = stream_text(client, PROMPTS[3], max_tokens=24, stream_options={"include_usage": True})
    assert text == full and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_prompt_list_is_batched_like_single_prompts(client):
    res = complete(client, PROMPTS[:3], max_tokens=10)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert [c.text for c in res.choices] == [complete(client, p, max_tokens=10).choices[0].text for p in PROMPTS[:3]]
    ids = client.completions.create(model=MODEL, prompt=[15496, 995], max_tokens=10, temperature=0)  # "Hello world"
    assert ids.choices[0].text == res.choices[0].text


def test_chat_uses_documented_plain_template(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    prompt = plain_chat_prompt([ChatMessage(**m) for m in messages])
    assert prompt == "You are terse.\n\nUser: Say hi.\nAssistant:"
    expected = complete(client, prompt, max_tokens=20, stop=[PLAIN_CHAT_STOP])
    msg = res.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == expected.choices[0].text
    assert msg.finish_reason == expected.choices[0].finish_reason and res.object == "chat.completion"
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == msg.message.content
    assert stream[-1].choices[0].finish_reason == msg.finish_reason


# -------------------------------------------------------------------------------- sampling options


def test_stop_sequences_cut_the_text(client):
    full = complete(client, PROMPTS[0], max_tokens=40).choices[0].text
    stop = full[10:13]  # a piece of the greedy text (it may span tokens)
    expected = full[: full.find(stop)]
    res = complete(client, PROMPTS[0], max_tokens=40, stop=[stop, "\u2603never"])
    assert res.choices[0].text == expected and res.choices[0].finish_reason == "stop"
    text, chunks = stream_text(client, PROMPTS[0], max_tokens=40, stop=stop)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_same_seed_same_text(client):
    kw = dict(max_tokens=24, temperature=1.5, top_p=0.95)
    a = complete(client, PROMPTS[6], seed=1234, **kw).choices[0].text
    assert complete(client, PROMPTS[6], seed=1234, **kw).choices[0].text == a
    assert stream_text(client, PROMPTS[6], seed=1234, **kw)[0] == a
    others = {complete(client, PROMPTS[6], seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert others != {a}  # the seed matters: sampling is not greedy here


def test_logprobs_and_echo_match_a_plain_forward(server, client):
    _, engine = server
    res = complete(client, PROMPTS[4], max_tokens=6, logprobs=3, echo=True)
    choice = res.choices[0]
    ids = engine.encode(PROMPTS[4])
    lp = choice.logprobs
    assert choice.text.startswith(PROMPTS[4])
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # every token's log-probability under the model, from one forward over prompt + completion
    all_ids = ids + engine.encode(choice.text[len(PROMPTS[4]):])
    assert len(all_ids) == len(lp.tokens)
    with torch.no_grad():
        logits = engine.model(torch.tensor([all_ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(all_ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)
    for tok_lp, top in zip(lp.token_logprobs[len(ids):], lp.top_logprobs[len(ids):]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(tok_lp, abs=1e-5)  # greedy: the top one
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


# ------------------------------------------------------------------------------------------ batching


def test_eight_concurrent_greedy_clients_equal_each_prompt_alone(server, client):
    _, engine = server
    alone = [complete(client, p, max_tokens=24).choices[0].text for p in PROMPTS]
    engine._stats["peak_batch"] = 0
    results = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def worker(i):
        barrier.wait()
        time.sleep(0.002 * i)  # staggered: later ones join a batch that is already decoding
        stream = i % 2 == 1
        results[i] = stream_text(client, PROMPTS[i], max_tokens=24)[0] if stream else \
            complete(client, PROMPTS[i], max_tokens=24).choices[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert engine.stats()["peak_batch"] > 1  # they really shared forward passes


def test_client_dropping_mid_stream_does_not_stall_others(server, client):
    url, engine = server
    cancelled = engine.stats()["cancelled"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            events = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert events and "choices" in json.loads(events[0][6:])
        # the connection is closed here, long before 4000 tokens
    start = time.monotonic()
    text = complete(client, PROMPTS[2], max_tokens=12).choices[0].text
    assert text and time.monotonic() - start < 10
    deadline = time.monotonic() + 10
    while engine.stats()["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats["cancelled"] > cancelled and stats["running"] == 0


def test_non_streaming_client_timeout_cancels_generation(server):
    url, engine = server
    cancelled = engine.stats()["cancelled"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8000 - 8, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while engine.stats()["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["cancelled"] > cancelled and engine.stats()["running"] == 0


# ------------------------------------------------------------------------------------------- errors


def assert_openai_error(err, status, param=None, code=None):
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if param is not None:
        assert body["param"] == param
    if code is not None:
        assert body["code"] == code


@pytest.mark.parametrize("kwargs, status, param, code", [
    (dict(model="gpt-4"), 404, "model", "model_not_found"),
    (dict(temperature=3.0), 400, "temperature", None),
    (dict(top_p=-0.5), 400, "top_p", None),
    (dict(max_tokens=0), 400, "max_tokens", None),
    (dict(max_tokens=9000), 400, "max_tokens", "context_length_exceeded"),
    (dict(n=2), 400, "n", None),
    (dict(logprobs=50), 400, "logprobs", None),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (dict(extra_body={"frobnicate": 1}), 400, "frobnicate", None),
    (dict(prompt=[]), 400, "prompt", None),
    (dict(prompt=[[15496], [15496, 99999999]]), 400, "prompt", None),  # a bad prompt fails its request alone
])
def test_bad_completion_requests_get_openai_errors(client, kwargs, status, param, code):
    kwargs = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**kwargs)
    assert_openai_error(info.value, status, param, code)
    assert complete(client, "still serving", max_tokens=2).choices[0].text  # the server goes on


def test_bad_chat_and_http_requests(server, client):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert_openai_error(info.value, 400, "messages")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}], max_tokens=4)
    assert_openai_error(info.value, 400)
    long_prompt = "hello " * 8300
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert_openai_error(info.value, 400, "prompt", "context_length_exceeded")
    bad_json = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.get(url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}], max_tokens=2)


def test_generation_failure_is_a_500_and_the_server_goes_on(server, client, monkeypatch):
    _, engine = server
    real_forward = engine._forward

    def failing_forward(*args, **kw):
        monkeypatch.setattr(engine, "_forward", real_forward)  # fail once
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(engine, "_forward", failing_forward)
    with pytest.raises(openai.InternalServerError) as info:
        complete(client, PROMPTS[0], max_tokens=4)
    assert_openai_error(info.value, 500)
    assert "simulated out of memory" in info.value.response.json()["error"]["message"]
    assert complete(client, PROMPTS[0], max_tokens=4).choices[0].text


def test_tokenizer_chat_template_is_used_when_present(tiny_dir):
    from btlm.tokenizer import load_tokenizer

    engine = TorchEngine.from_path(tiny_dir, device="cpu")
    engine.tokenizer = load_tokenizer()
    engine.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    engine.chat_template = engine.tokenizer.chat_template
    with running_server(engine, MODEL) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.models.list().data[0].model_dump()["chat_template"] == "the tokenizer's chat template"
        messages = [{"role": "user", "content": "Say hi."}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        plain = complete(client, "<user>Say hi.\n<assistant>", max_tokens=12)
        assert chat.choices[0].message.content == plain.choices[0].text  # no plain-template stop added either

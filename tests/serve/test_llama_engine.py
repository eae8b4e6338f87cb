"""``btlm serve`` with the llama.cpp engine on a GGUF from ``btlm export-gguf`` (needs llama-cpp-python, the
optional extra ``.[llama]``; skipped where it is not installed)."""

import pytest

pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")

from btlm.quant.gguf import export_gguf  # noqa: E402
from btlm.serve import load_engine  # noqa: E402
from btlm.serve.engine import SamplingParams, TorchEngine  # noqa: E402
from tests.serve.conftest import running_server  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog and then"


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    gguf = export_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", outtype="f32")
    engine = load_engine(gguf, n_ctx=512)
    assert engine.name == "llama.cpp"
    with running_server(engine, "tiny") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_llama_engine_greedy_matches_the_torch_engine(served, tiny_dir):
    assert served.models.list().data[0].model_dump()["engine"] == "llama.cpp"
    text = served.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    torch_engine = TorchEngine.from_path(tiny_dir, device="cpu")
    try:
        ids = torch_engine.encode(PROMPT)
        expected = "".join(c.text for c in torch_engine.submit(ids, SamplingParams(max_tokens=12, temperature=0)))
    finally:
        torch_engine.close()
    assert text == expected  # f32 GGUF: llama.cpp's JAIS graph computes BTLM's logits
    stream = served.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_llama_engine_stop_seed_and_errors(served):
    full = served.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    cut = served.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.5, seed=5)
    assert served.completions.create(**kw).choices[0].text == served.completions.create(**kw).choices[0].text
    with pytest.raises(openai.BadRequestError):
        served.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, echo=True, logprobs=1)
    chat = served.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"

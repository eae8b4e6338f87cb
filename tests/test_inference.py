"""generate() with transformers Cache classes, the model card's two snippets, the CLI, and a 32k forward."""

import json
import resource
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from btlm import cli
from btlm.inference import init_model_dir, load_model
from btlm.tokenizer import load_tokenizer
from tests.conftest import make_model, with_attn


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return init_model_dir("tiny", tmp_path_factory.mktemp("m") / "tiny", seed=0)


def test_tokenizer_ids_match_gpt2(tokenizer):
    assert tokenizer("Hello")["input_ids"] == [15496]
    assert tokenizer("Albert Einstein was known for ")["input_ids"] == [42590, 24572, 373, 1900, 329, 220]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256 and len(tokenizer) == 50257


def test_model_card_snippets_run_as_written(model_dir):
    """The released model card's usage, minus trust_remote_code."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="auto")
    inputs = tokenizer("Albert Einstein was known for ", return_tensors="pt")
    outputs = model.generate(**inputs, num_beams=5, max_new_tokens=50, early_stopping=True, no_repeat_ngram_size=2)
    text = tokenizer.batch_decode(outputs, skip_special_tokens=True)[0]
    assert text.startswith("Albert Einstein was known for ") and outputs.shape[1] > inputs["input_ids"].shape[1]
    generated = outputs[0, inputs["input_ids"].shape[1]:].tolist()
    bigrams = list(zip(generated, generated[1:]))
    assert len(bigrams) == len(set(bigrams))  # no_repeat_ngram_size=2 held
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("Isaac Newton was a ", max_length=50, do_sample=False, no_repeat_ngram_size=2)[0]["generated_text"]
    assert out.startswith("Isaac Newton was a ")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_generation_equals_dynamic(attn):
    """``cache_implementation="static"`` (pre-allocated, the torch.compile route): same tokens and scores as the
    default dynamic cache, for greedy and beam search and with left padding."""
    model = make_model(attn, vocab_size=50257)
    tok = load_tokenizer()
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    batch = tok(["The quick brown fox jumps over", "Hi"], return_tensors="pt", padding=True)
    for kw in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
        kw.update(max_new_tokens=7, pad_token_id=50256, output_scores=True, return_dict_in_generate=True)
        dynamic = model.generate(**batch, **kw)
        static = model.generate(**batch, cache_implementation="static", **kw)
        assert torch.equal(static.sequences, dynamic.sequences)
        torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_greedy_equals_uncached(attn):
    model = make_model(attn, vocab_size=50257)
    x = torch.randint(0, 50257, (1, 9), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=50256)
    cached = model.generate(x, use_cache=True, **kw)
    uncached = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, with_attn(model, "eager" if attn == "sdpa" else "sdpa").generate(x, **kw))


def test_batched_left_padding_equals_unbatched(tokenizer):
    model = make_model("sdpa", vocab_size=50257)
    tok = load_tokenizer()
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    prompts = ["The quick brown fox jumps over", "Hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=50256)
    batched = model.generate(**batch, **kw)
    for i, p in enumerate(prompts):
        single = model.generate(**tok(p, return_tensors="pt"), **kw)
        n = single.shape[1]
        assert batched[i, -n:].tolist() == single[0].tolist()


def test_sampling_and_num_return_sequences_are_seeded():
    model = make_model("sdpa", vocab_size=50257)
    x = torch.tensor([[464, 2068, 7586]])
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=3, max_new_tokens=6, pad_token_id=50256)
    torch.manual_seed(5)
    a = model.generate(x, **kw)
    torch.manual_seed(5)
    b = model.generate(x, **kw)
    assert a.shape == (3, 9) and torch.equal(a, b)


def test_cli_init_and_generate(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli.main(["init", "--preset", "tiny", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "btlm"
    assert cli.main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    assert "Hello" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "4",
                     "--num-beams", "3", "--no-repeat-ngram-size", "2"]) == 0
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("init", "generate", "data", "run", "quantize", "eval-long"):
        assert name in text


def test_every_cli_command_has_a_parser_and_an_executor():
    """The dispatcher must not list a command whose module is missing, or lacks ``build_parser`` / ``execute``."""
    import importlib

    for name, command in cli.COMMANDS.items():
        module = importlib.import_module(command.module)
        assert callable(getattr(module, "execute", None)), name
        assert cli.build_parser(name).prog == f"btlm {name}"


def test_python_dash_m_btlm_runs_the_cli():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "btlm", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "eval-long" in res.stdout


def test_dynamic_interpolation_through_load_overrides(model_dir):
    model = load_model(model_dir, n_positions=16384, alibi_scaling={"type": "linear", "train_seq_len": 8192})
    assert model.config.n_positions == 16384 and model.config.alibi_scaling["train_seq_len"] == 8192


def test_32k_token_forward_fits_in_bounded_memory(tmp_path):
    """The default attention path runs 32,768 tokens of a small model without O(H·T²) memory."""
    code = f"""
import resource, torch
from btlm.model import BTLMModel, config_from_preset
torch.manual_seed(0)
cfg = config_from_preset("tiny", n_layer=1, n_positions=32768, alibi_scaling={{"type": "linear", "factor": 4.0}})
model = BTLMModel(cfg).eval()
with torch.no_grad():
    h = model(torch.randint(0, 50257, (1, 32768)), use_cache=False).last_hidden_state
assert h.shape == (1, 32768, 64) and torch.isfinite(h).all()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peak_mib = int(res.stdout.strip().splitlines()[-1])
    # A materialised fp32 [4, 32768, 32768] bias alone would be 16 GiB. The bound is loose on purpose: the chunk
    # loop allocates ever wider [chunk, keys] blocks, and whether glibc serves them from the heap (after its
    # dynamic mmap threshold has risen) or from mmap varies run to run: peak 0.85 or ~2.5 GiB for this model
    # (with MALLOC_MMAP_THRESHOLD_=1048576 it is 0.84 GiB every time).
    assert peak_mib < 4096, f"peak RSS {peak_mib} MiB"

"""``btlm generate`` for many prompts (--prompt-file / stdin, batched) and past the trained length
(--n-positions / --alibi-scaling)."""

import io
import json

import pytest

from btlm import cli
from btlm.inference import context_overrides, generate_batch, generate_text, init_model_dir, load_model
from btlm.tokenizer import load_tokenizer

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog and then", "A", "Once upon a time, there"]


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory):
    """A tiny BTLM trained (so to speak) for 64 positions."""
    return init_model_dir("tiny", tmp_path_factory.mktemp("gen") / "tiny64", seed=0, n_positions=64)


def test_batched_prompts_equal_each_prompt_alone(short_model_dir):
    model, tok = load_model(short_model_dir), load_tokenizer()
    alone = [generate_text(model, tok, p, max_new_tokens=8, do_sample=False)[len(p):] for p in PROMPTS]
    assert generate_batch(model, tok, PROMPTS, batch_size=3, max_new_tokens=8, do_sample=False) == alone


def test_cli_prompt_file_and_stdin(short_model_dir, tmp_path, capsys, monkeypatch):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:3]) + "\n\n")  # blank lines are skipped
    args = ["generate", "--model", str(short_model_dir), "--max-new-tokens", "6", "--batch-size", "2"]
    assert cli.main(args + ["--prompt-file", str(prompt_file)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    model, tok = load_model(short_model_dir), load_tokenizer()
    assert [r["completion"] for r in rows] == generate_batch(model, tok, PROMPTS[:3], max_new_tokens=6, do_sample=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(PROMPTS[:3])))
    assert cli.main(args) == 0  # no --prompt: prompts come from standard input
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    assert cli.main(args + ["--prompt-file", str(tmp_path / "missing.txt")]) == 1
    assert "prompt file" in capsys.readouterr().err


def test_generate_past_the_trained_length(short_model_dir, capsys):
    assert context_overrides(str(short_model_dir), 128, "dynamic") == {
        "n_positions": 128, "alibi_scaling": {"type": "linear", "train_seq_len": 64}}
    assert context_overrides(str(short_model_dir), None, "fixed:2.0") == {"alibi_scaling": {"type": "linear", "factor": 2.0}}
    prompt = " ".join(["word"] * 60)  # 60 tokens + 10 new > 64 positions
    args = ["generate", "--model", str(short_model_dir), "--prompt", prompt, "--max-new-tokens", "10", "--no-stream"]
    assert cli.main(args) == 1
    assert "longer than n_positions=64" in capsys.readouterr().err
    assert cli.main(args + ["--n-positions", "128", "--alibi-scaling", "dynamic"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    model = load_model(short_model_dir, n_positions=128, alibi_scaling={"type": "linear", "train_seq_len": 64})
    assert text == generate_text(model, load_tokenizer(), prompt, max_new_tokens=10, do_sample=False, num_beams=1,
                                 temperature=1.0, top_k=50, top_p=1.0, no_repeat_ngram_size=0)

"""btlm passkey: prompt construction, scorer, determinism, and the accuracy table / outputs."""

import json
import re

import numpy as np
import pytest
import torch

from btlm.cli import main as btlm_main
from btlm.eval import passkey
from btlm.eval.common import EvalError, parse_lengths

torch.set_num_threads(1)


@pytest.mark.parametrize("generated,key,expected", [
    (" 68048. Remember it.", 68048, True),
    ("68048", 68048, True),
    (" is 68048", 68048, True),
    (" 680481", 68048, False),   # a longer number is not the key
    (" 6804", 68048, False),     # a prefix is not the key
    (" 12 68048", 68048, False),  # only the first number counts
    (" the grass is green", 68048, False),
    ("", 68048, False),
])
def test_scorer_hand_made_cases(generated, key, expected):
    assert passkey.score(generated, key) is expected


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_needle_depth(tokenizer, depth):
    ids = passkey.build_prompt(tokenizer, 1024, depth, 31337)
    assert 1024 - len(tokenizer.encode(passkey.FILLER)) < len(ids) <= 1024
    text = tokenizer.decode(ids)
    assert text.startswith(passkey.INSTRUCTION) and text.endswith(passkey.QUESTION)
    assert text.count("31337") == 2
    where = text.index("The pass key is 31337")
    relative = (where - len(passkey.INSTRUCTION)) / (len(text) - len(passkey.INSTRUCTION) - len(passkey.QUESTION))
    assert relative == pytest.approx(depth, abs=0.05)
    with pytest.raises(EvalError, match="too short"):
        passkey.build_prompt(tokenizer, 40, depth, 31337)


def test_trials_are_deterministic_for_a_seed(tokenizer):
    a = passkey.make_trials(tokenizer, [256, 512], [0.0, 1.0], 3, seed=7)
    b = passkey.make_trials(tokenizer, [256, 512], [0.0, 1.0], 3, seed=7)
    c = passkey.make_trials(tokenizer, [256, 512], [0.0, 1.0], 3, seed=8)
    assert [(t.key, t.input_ids) for t in a] == [(t.key, t.input_ids) for t in b]
    assert [t.key for t in a] != [t.key for t in c]
    assert all(10000 <= t.key < 100000 for t in a) and len(a) == 12


def test_greedy_generation_is_deterministic(tokenizer):
    from btlm.model import BTLMLMHeadModel, config_from_preset

    torch.manual_seed(0)
    model = BTLMLMHeadModel(config_from_preset("tiny", n_layer=1, n_positions=512)).eval()
    trials = passkey.make_trials(tokenizer, [200], [0.5], 2, seed=0)
    first = passkey.run_trials(model, tokenizer, trials, progress=False)
    torch.manual_seed(123)  # greedy: the global RNG must not matter
    second = passkey.run_trials(model, tokenizer, trials, progress=False)
    assert first == second
    assert all(len(r["generated"]) > 0 and r["correct"] == passkey.score(r["generated"], r["key"]) for r in first)


def test_accuracy_table_and_outputs(tmp_path, tokenizer, monkeypatch):
    """An oracle that reads the key out of the prompt scores 100% except where it is told to fail."""
    def oracle(model, input_ids, max_new_tokens=8):
        key = re.search(r"pass key is (\d+)", tokenizer.decode(input_ids)).group(1)
        wrong = len(input_ids) > 300 and "Remember it" in tokenizer.decode(input_ids[-40:])  # fail: long & deep
        return tokenizer.encode(" 1." if wrong else f" {key}.")

    monkeypatch.setattr(passkey, "answer", oracle)
    trials = passkey.make_trials(tokenizer, [256, 512], [0.0, 1.0], 2, seed=0)
    rows = passkey.run_trials(None, tokenizer, trials, progress=False)
    lengths, depths, acc = passkey.accuracy_table(rows)
    assert lengths == [256, 512] and depths == [0.0, 1.0]
    np.testing.assert_array_equal(acc, [[1.0, 1.0], [1.0, 0.0]])
    table = passkey.markdown_table(lengths, depths, acc)
    assert "| 1.00 | 100% | 0% |" in table and "| **mean** | **100%** | **50%** |" in table
    passkey.write_results(tmp_path, rows, {"model": "m", "alibi_scaling": "none", "trials": 2, "seed": 0})
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "passkey.csv").read_text().splitlines()) == 1 + len(rows)


def test_lengths_parsing_and_cli_errors(tmp_path, capsys):
    assert parse_lengths("1k,2k,4096") == [1024, 2048, 4096]
    with pytest.raises(EvalError):
        parse_lengths("1k,-2")
    assert btlm_main(["passkey", "--model", str(tmp_path), "--depths", "0,2", "--out", str(tmp_path / "o")]) == 1
    assert "--depths" in capsys.readouterr().err
    assert btlm_main(["passkey", "--model", str(tmp_path / "none"), "--lengths", "256", "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_cli_several_scaling_settings_in_one_run(tmp_path, capsys):
    from btlm.io import save_model
    from btlm.model import BTLMLMHeadModel, config_from_preset

    torch.manual_seed(0)
    save_model(BTLMLMHeadModel(config_from_preset("tiny", n_positions=128)), tmp_path / "m")
    out = tmp_path / "out"
    assert btlm_main(["passkey", "--model", str(tmp_path / "m"), "--lengths", "128", "--depths", "0,1", "--trials",
                      "1", "--alibi-scaling", "none", "dynamic:64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "alibi-scaling none:" in printed and "alibi-scaling dynamic:64:" in printed
    for label in ("none", "dynamic_64"):
        summary = json.loads((out / label / "passkey.json").read_text())
        assert summary["alibi_scaling"] == label.replace("_", ":") and summary["lengths"] == [128]
    # the same trials (same keys) for every setting
    keys = [[t["key"] for t in json.loads((out / d / "passkey.json").read_text())["trials_detail"]]
            for d in ("none", "dynamic_64")]
    assert keys[0] == keys[1]

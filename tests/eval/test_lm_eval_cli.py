"""``btlm lm-eval``: lm-eval's command line on a btlm directory, offline, on a task defined from a local file.

The end-to-end test runs where lm-eval is installed (optional extra ``.[eval]``) and skips elsewhere; the
argument translation and the missing-extra error are checked everywhere.
"""

import glob
import importlib.util
import json
import sys

import pytest
import torch

from btlm import cli
from btlm.eval.lm_eval_cli import lm_eval_argv
from btlm.inference import init_model_dir, load_model
from btlm.tokenizer import load_tokenizer

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"question": "The capital of France is", "choices": ["Berlin", "Paris"], "answer": 1},
    {"question": "Water is", "choices": ["wet", "dry"], "answer": 0},
]


def test_model_directory_becomes_hf_pretrained(tmp_path):
    assert lm_eval_argv(["--model", str(tmp_path), "--tasks", "x"]) == [
        "run", "--model", "hf", "--model_args", f"pretrained={tmp_path}", "--tasks", "x"]
    assert lm_eval_argv([f"--model={tmp_path}", "--model_args", "dtype=float32"]) == [
        "run", "--model", "hf", "--model_args", f"pretrained={tmp_path}", "--model_args", "dtype=float32"]
    assert lm_eval_argv(["--model", "hf", "--tasks", "x"]) == ["run", "--model", "hf", "--tasks", "x"]  # not a dir
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]


def test_missing_lm_eval_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # import fails as if not installed
    assert cli.main(["lm-eval", "--model", "x", "--tasks", "y"]) == 1
    assert capsys.readouterr().err.strip() == "error: btlm lm-eval needs lm-eval: pip install 'btlm[eval]'"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval (extra .[eval]) is not installed")
def test_lm_eval_command_scores_a_local_task_like_a_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = init_model_dir("tiny", tmp_path / "tiny", seed=0)
    data = tmp_path / "task" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task" / "task.yaml").write_text(
        "task: btlm_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "out"
    assert cli.main(["lm-eval", "--model", str(model_dir), "--tasks", "btlm_local_mc", "--include_path",
                     str(tmp_path / "task"), "--device", "cpu", "--batch_size", "2", "--output_path", str(out),
                     "--log_samples"]) == 0
    samples = [json.loads(line) for line in open(glob.glob(str(out / "*" / "samples_btlm_local_mc_*.jsonl"))[0])]
    results = json.load(open(glob.glob(str(out / "*" / "results_*.json"))[0]))["results"]["btlm_local_mc"]

    model, tok = load_model(model_dir), load_tokenizer()
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        expected = []
        for choice in doc["choices"]:
            ctx, cont = tok(doc["question"])["input_ids"], tok(" " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].float()
            expected.append(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()))
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(expected, abs=1e-4)
        correct += int(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert results["acc,none"] == pytest.approx(correct / len(DOCS))

"""``btlm data Summarization``: prompt/completion pairs -> Model Zoo rows with the loss on the completion only."""

import json

import numpy as np
import pytest
from conftest import read_rows

from btlm.cli import main as btlm_main
from btlm.data import DataError
from btlm.data.create_hdf5_dataset import run
from btlm.data.options import load_config
from btlm.tokenizer import EOS_ID, tiktoken_encoding

ENC = tiktoken_encoding()


def model_zoo_row(prompt_ids, completion_ids, msl, eos_id, sep_id, pad_id, min_len=10):
    """The Cerebras Model Zoo R2.0.2 ``create_features_summarization`` (utils.py), transcribed line by
    line (lists, no dtype handling): the reference the rows must equal."""
    total_len = len(prompt_ids) + len(completion_ids) + 1
    if sep_id is not None:
        total_len += 1
    if total_len > msl or total_len < min_len:
        return []
    token_ids = prompt_ids
    if sep_id is not None:
        token_ids = token_ids + [sep_id]
    token_ids = token_ids + completion_ids + [eos_id]
    token_mask = [0] * (len(prompt_ids))
    if sep_id is not None:
        token_mask += [1]
    else:
        token_mask[-1] = 1
    token_mask += [1] * len(completion_ids)
    token_mask += [0]
    token_ids.extend([pad_id] * (msl + 1 - len(token_ids)))
    token_mask.extend([0] * (msl - len(token_mask)))
    return np.stack([np.int32(token_ids[:-1]), np.int32(token_mask), np.int32(token_ids[1:])])


PAIRS = [
    ("Summarize: the cat sat on the mat.", " A cat sat."),
    ("Translate to French: good morning", " bonjour"),
    ("Q: what is two plus two?\nA:", " four"),
    ("x" * 3, " " + "word " * 40),  # too long for msl 32
    ("a", " b"),  # too short (4 tokens < 10)
]


def write_pairs(path, pairs, prompt_key="source", completion_key="target"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({prompt_key: p, completion_key: c}) + "\n" for p, c in pairs))


def summarize(input_dir, output_dir, **kw):
    settings = dict(input_dir=str(input_dir), output_dir=str(output_dir), processes=1, max_seq_length=32,
                    files_per_record=2, prompt_key="source", completion_key="target", display_pbar=False)
    cfg = load_config(None, {**settings, **kw}, "Summarization")
    return run(cfg, batch_chars=100, log=lambda *a: None)


@pytest.mark.parametrize("sep_token", [None, "<|endoftext|>"])
def test_rows_are_model_zoo_summarization_rows(tmp_path, sep_token):
    write_pairs(tmp_path / "in" / "pairs.jsonl", PAIRS)
    params = summarize(tmp_path / "in", tmp_path / "out", sep_token=sep_token)
    sep = None if sep_token is None else EOS_ID
    expected = [model_zoo_row(ENC.encode_ordinary(p), ENC.encode_ordinary(c), 32, EOS_ID, sep, EOS_ID)
                for p, c in PAIRS]
    expected = np.stack([e for e in expected if len(e)])
    rows = read_rows(tmp_path / "out")
    np.testing.assert_array_equal(rows, expected)
    pp = params["post-process"]
    assert pp["n_examples"] == 3 and pp["discarded"] == {"too_long": 1, "too_short": 1}
    assert pp["sep_id"] == sep and params["setup"]["dataset_processor"] == "SummarizationPreprocessor"
    assert params["h5_dataset_stats"]["loss_valid_tokens"] == int(rows[:, 1].sum())


def test_mask_covers_the_completion_and_eos_label_only(tmp_path):
    """Written out by hand for one pair: prompt "a b c" (64, 275, 269), completion " d e" (288, 304)."""
    write_pairs(tmp_path / "in" / "p.jsonl", [("a b c", " d e")])
    summarize(tmp_path / "in", tmp_path / "plain", min_sequence_len=1)
    summarize(tmp_path / "in", tmp_path / "sep", min_sequence_len=1, sep_token="<sep>")
    E = EOS_ID
    plain = read_rows(tmp_path / "plain")[0][:, :7]
    np.testing.assert_array_equal(plain, [[64, 275, 269, 288, 304, E, E],   # inputs
                                          [0, 0, 1, 1, 1, 0, 0],            # loss on labels d, e, EOS
                                          [275, 269, 288, 304, E, E, E]])   # labels
    sep = read_rows(tmp_path / "sep")[0][:, :7]
    S = 50257  # "<sep>" is not a GPT-2 token: the next id, as the Model Zoo adds it
    np.testing.assert_array_equal(sep, [[64, 275, 269, S, 288, 304, E],
                                        [0, 0, 0, 1, 1, 1, 0],
                                        [275, 269, S, 288, 304, E, E]])
    params = json.loads((tmp_path / "sep" / "data_params.json").read_text())
    assert params["post-process"]["sep_id"] == S and params["post-process"]["vocab_size"] == 50258


def test_too_long_pairs_are_skipped_never_truncated(tmp_path):
    # 31 tokens + EOS = 32 = msl fits exactly; one more token does not
    fits, over = ("a" + " a" * 29, " b"), ("a" + " a" * 30, " b")
    write_pairs(tmp_path / "in" / "p.jsonl", [fits, over])
    params = summarize(tmp_path / "in", tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 1 and params["post-process"]["discarded"] == {"too_long": 1}
    # the last pair token (EOS) is the label of position 30, and the input of position 31 (no loss there)
    assert rows[0, 0, 31] == EOS_ID and rows[0, 2, 30] == EOS_ID
    assert rows[0, 1, 30] == 1 and rows[0, 1, 31] == 0


def test_bad_records_are_counted_and_strict_stops(tmp_path):
    p = tmp_path / "in" / "p.jsonl"
    write_pairs(p, PAIRS[:2])
    with open(p, "a") as f:
        f.write('{"source": "only a prompt"}\n{"source": "x", "target": 3}\nnot json\n')
    params = summarize(tmp_path / "in", tmp_path / "out")
    assert params["post-process"]["discarded"] == {"missing_key": 1, "bad_value": 1, "malformed_json": 1}
    assert any("p.jsonl:line 3" in m and "'target'" in m for m in params["problems"])
    assert len(read_rows(tmp_path / "out")) == 2
    with pytest.raises(DataError, match=r"p\.jsonl:line 3: missing_key.*strict"):
        summarize(tmp_path / "in", tmp_path / "strict", strict=True)


def test_interrupted_run_resumes_to_identical_shards(tmp_path, monkeypatch):
    import btlm.data.create_hdf5_dataset as chd

    pairs = [(f"Question {i}: what comes after {i}?", f" {i + 1}, then {i + 2}") for i in range(30)]
    write_pairs(tmp_path / "in" / "p.jsonl", pairs)
    summarize(tmp_path / "in", tmp_path / "ref")
    real, calls = chd.write_shard, []

    def dies_at_the_fourth(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(chd, "write_shard", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        summarize(tmp_path / "in", tmp_path / "out")
    monkeypatch.setattr(chd, "write_shard", real)
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["shards_written"] == 3
    with pytest.raises(DataError, match="already holds"):
        summarize(tmp_path / "in", tmp_path / "out")
    summarize(tmp_path / "in", tmp_path / "out", resume_from_checkpoint=True)
    np.testing.assert_array_equal(read_rows(tmp_path / "out"), read_rows(tmp_path / "ref"))
    assert len(read_rows(tmp_path / "ref")) == 30


def test_cli_flags_and_training_loader(tmp_path, capsys):
    """The Model Zoo command line, and the rows as the training loader and loss see them."""
    from types import SimpleNamespace

    import torch

    from btlm.data.loader import H5SampleDataset, collate_rows
    from btlm.train.zoo_model import lm_loss

    write_pairs(tmp_path / "in" / "p.jsonl", PAIRS[:3], "prompt", "completion")
    assert btlm_main(["data", "Summarization", "--input_dir", str(tmp_path / "in"), "--output_dir",
                      str(tmp_path / "out"), "--prompt_key", "prompt", "--completion_key", "completion",
                      "--max_seq_length", "32", "--processes", "1", "--display_pbar", "False"]) == 0
    assert "3 pairs" in capsys.readouterr().out
    assert btlm_main(["data", "Summarization", "--input_dir", str(tmp_path / "in"), "--output_dir",
                      str(tmp_path / "o2")]) != 0
    assert "--prompt_key" in capsys.readouterr().err
    batch = collate_rows(H5SampleDataset(str(tmp_path / "out")).read([0, 1, 2]))
    logits = torch.randn(3, 32, 64)
    labels = batch["labels"] % 64
    mask = batch["attention_mask"]
    loss = lm_loss(logits, labels, mask, SimpleNamespace(loss_scaling="num_tokens", loss_weight=1.0))
    ce = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()].long())
    torch.testing.assert_close(loss, ce)  # only completion positions carry loss


def test_processes_parquet_and_yaml_give_the_same_rows(tmp_path):
    """Worker processes, parquet input and a Model Zoo YAML change nothing in the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_pairs(tmp_path / "in" / "pairs.jsonl", PAIRS)
    summarize(tmp_path / "in", tmp_path / "ref", sep_token="<|endoftext|>")
    ref = read_rows(tmp_path / "ref")
    summarize(tmp_path / "in", tmp_path / "procs", sep_token="<|endoftext|>", processes=2)
    np.testing.assert_array_equal(read_rows(tmp_path / "procs"), ref)

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"source": [p for p, _ in PAIRS], "target": [c for _, c in PAIRS]}),
                   tmp_path / "pq" / "pairs.parquet")
    summarize(tmp_path / "pq", tmp_path / "parquet", sep_token="<|endoftext|>")
    np.testing.assert_array_equal(read_rows(tmp_path / "parquet"), ref)

    yaml_path = tmp_path / "summ.yaml"  # the Model Zoo summarization_preprocessing.yaml sections
    yaml_path.write_text(f"""
setup:
    input_dir: {tmp_path / 'in'}
    output_dir: {tmp_path / 'yaml'}
    processes: 1
    dataset_processor: "SummarizationPreprocessor"
processing:
    max_seq_length: 32
    files_per_record: 2
    write_in_batch: True
dataset:
    use_ftfy: False
    sep_token: "<|endoftext|>"
    prompt_key: "source"
    completion_key: "target"
""")
    run(load_config(str(yaml_path), {"display_pbar": False}, "Summarization"), log=lambda *a: None)
    np.testing.assert_array_equal(read_rows(tmp_path / "yaml"), ref)
    with pytest.raises(DataError, match="dataset_processor = 'SummarizationPreprocessor' is not supported here"):
        load_config(str(yaml_path), {}, "LMData")


def test_sep_token_lookup_uses_the_vocabulary_spelling():
    """As the Model Zoo's ``token in encoder``: GPT-2 vocabulary strings spell a leading space as "Ġ"."""
    from btlm.data.preprocess import BatchTokenizer, TokenizerSpec

    tok = BatchTokenizer(TokenizerSpec())
    assert tok.token_id("<|endoftext|>") == EOS_ID
    assert tok.token_id("ĠTL") == ENC.encode_ordinary(" TL")[0] and tok.token_id(" TL") is None
    assert tok.token_id("<sep>") is None and tok.token_id("TL;DR:") is None

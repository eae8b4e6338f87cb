"""LMData preparation: formats, packing, label shift, remainder, bad input, determinism, kill-and-resume."""

import json
import os
import signal
import time

import numpy as np
import pytest
from conftest import cfg, expected_stream, make_docs, prepare, read_rows, stream_of, write_jsonl

from btlm.data import DataError
from btlm.cli import main as btlm_main
from btlm.tokenizer import EOS_ID


def test_round_trip_every_format_is_lossless(prepared, corpus):
    out, params = prepared
    rows = read_rows(out)
    assert rows.shape[1:] == (3, 32)
    # the packed stream is exactly the documents (all five formats, sorted file order) joined by EOS
    assert stream_of(rows) == expected_stream(corpus[1])
    pp = params["post-process"]
    assert pp["documents"] == 160 and pp["files_read"] == 5 and pp["tokens_dropped"] == 0
    assert pp["tokens"] == len(expected_stream(corpus[1]))
    assert params["h5_dataset_stats"]["num_sequences"] == len(rows) == pp["n_examples"]
    # a literal "<|endoftext|>" inside a document is text, not a forged boundary
    assert params["h5_dataset_stats"]["eos_tokens"] == 159  # the 160th EOS is the last label


def test_label_shift_and_mask(prepared):
    rows = read_rows(prepared[0])
    ids, mask, labels = rows[:, 0], rows[:, 1], rows[:, 2]
    full = mask.all(axis=1)
    assert full[:-1].all()  # every row but the stream's last one is full
    np.testing.assert_array_equal(labels[:, :-1][mask[:, 1:] == 1], ids[:, 1:][mask[:, 1:] == 1])
    # consecutive windows share one token: a row's last label is the next row's first input
    np.testing.assert_array_equal(labels[:-1, -1], ids[1:, 0])


def test_remainder_window_is_padded_and_counted(corpus, tmp_path):
    rows = read_rows(prepare(corpus[0], tmp_path / "a") and tmp_path / "a")
    last = rows[-1]
    n = int(last[1].sum())
    assert 0 < n < 32
    assert (last[0][n:] == EOS_ID).all() and (last[2][n:] == EOS_ID).all()  # padded with pad = eos
    # files_per_record counts rows; write_remainder False drops the last partial shard and says so
    p = prepare(corpus[0], tmp_path / "b", write_remainder=False)
    assert len(read_rows(tmp_path / "b")) == len(rows) // 20 * 20
    assert p["post-process"]["rows_not_written_remainder"] == len(rows) % 20


def test_process_count_does_not_change_output(corpus, prepared, tmp_path):
    prepare(corpus[0], tmp_path, processes=2, batch_chars=1500)
    np.testing.assert_array_equal(read_rows(tmp_path), read_rows(prepared[0]))
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(prepared[0]))
    for f in prepared[0].glob("*.h5"):  # byte for byte, gzip chunks included
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_short_seq_prob_keeps_every_token(corpus, tmp_path):
    prepare(corpus[0], tmp_path, short_seq_prob=0.5, seed=3)
    rows = read_rows(tmp_path)
    assert (rows[:, 1].sum(axis=1) < 31).mean() > 0.3  # many rows were shortened ...
    assert stream_of(rows) == expected_stream(corpus[1])  # ... yet no token was lost


def test_no_packing_pads_each_document_and_counts_short_ones(tmp_path):
    docs = ["one two", "alpha " * 50, "a b c d e f g h"]
    write_jsonl(tmp_path / "in.jsonl", docs)
    (tmp_path / "list.txt").write_text(str(tmp_path / "in.jsonl") + "\n")
    p = prepare(None, tmp_path / "o", metadata_files=str(tmp_path / "list.txt"), pack_sequences=False,
                min_sequence_len=6)
    rows = read_rows(tmp_path / "o")
    # "one two" + EOS is 3 tokens < min_sequence_len: dropped and counted
    assert p["post-process"]["discarded"] == {"short_document": 1}
    assert p["post-process"]["tokens_dropped"] == 3
    starts = [r[0][0] for r in rows]
    assert starts[0] == 26591  # "alpha" starts the first row: documents are not packed together
    assert rows[-1][0][0] == 64 and rows[-1][1].sum() == 8  # "a b c ..." alone, padded


def test_bad_records_are_counted_with_location(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    with open(d / "a.jsonl", "wb") as f:
        f.write(b'{"text": "good one"}\n{"text": broken\n{"other": "x"}\n{"text": "bad \xff utf8"}\n{"text": 5}\n'
                b'"a bare string line"\n{"text": "lone \\ud800 surrogate"}\n')
    import zstandard

    lines = "".join(json.dumps({"text": t}) + "\n" for t in make_docs(3000, seed=5)).encode()
    good = zstandard.ZstdCompressor().compress(lines)
    (d / "b.jsonl.zst").write_bytes(good[: len(good) // 2])  # a truncated download
    p = prepare(d, tmp_path / "o")
    disc = p["post-process"]["discarded"]
    # a lone surrogate escape is not text the tokenizer can encode: counted as malformed, not a crash
    assert disc == {"malformed_json": 2, "missing_key": 1, "invalid_utf8": 1, "bad_value": 1, "corrupt_file": 1}
    probs = "\n".join(p["problems"])
    assert f"{d / 'a.jsonl'}:line 2: malformed_json" in probs
    assert f"{d / 'a.jsonl'}:line 3: missing_key" in probs
    assert f"{d / 'a.jsonl'}:line 4: invalid_utf8" in probs
    assert f"{d / 'a.jsonl'}:line 7: malformed_json" in probs
    assert f"{d / 'b.jsonl.zst'}:line" in probs and "corrupt_file" in probs
    # the good line, the bare string and the zst lines before the damage are kept
    assert 2 + 100 < p["post-process"]["documents"] < 2 + 3000
    with pytest.raises(DataError, match=r"a\.jsonl:line 2: malformed_json"):
        prepare(d, tmp_path / "strict", strict=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = lmdata_main(["LMData", "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")])
    assert rc == 1 and capsys.readouterr().err.startswith("error: input_dir")
    (tmp_path / "p.yaml").write_text("processing:\n  max_seq_lenght: 128\n")
    rc = lmdata_main(["LMData", "--params", str(tmp_path / "p.yaml")])
    assert rc == 1 and "unknown key processing.max_seq_lenght" in capsys.readouterr().err
    assert lmdata_main(["LMData", "--max_seq_length", "abc"]) == 2  # usage error, argparse's convention


def test_yaml_params_and_cli_override(corpus, tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(f"setup:\n  input_dir: {corpus[0]}\n  output_dir: {tmp_path / 'o'}\n  processes: 1\n"
                 "processing:\n  tokenizer_type: GPT2Tokenizer\n  max_seq_length: 64\n  files_per_record: 1000\n"
                 "  write_in_batch: True\ndataset:\n  use_ftfy: False\n  input_ids_dtype: int32\n")
    assert lmdata_main(["LMData", "--params", str(y), "--max_seq_length", "48"]) == 0
    params = json.loads((tmp_path / "o" / "data_params.json").read_text())
    assert params["processing"]["max_seq_length"] == 48 and params["processing"]["files_per_record"] == 1000
    assert read_rows(tmp_path / "o").shape[1:] == (3, 48)
    # a second run into a non-empty directory refuses instead of mixing shards
    assert lmdata_main(["LMData", "--params", str(y)]) == 1


def test_ftfy_is_off_by_default_and_fixes_mojibake(tmp_path):
    # Model Zoo's code defaults use_ftfy to True but its README documents False: we follow the README
    write_jsonl(tmp_path / "m.jsonl", ["cafÃ© latte"])
    (tmp_path / "l.txt").write_text(str(tmp_path / "m.jsonl"))
    raw = prepare(None, tmp_path / "a", metadata_files=str(tmp_path / "l.txt"))
    assert raw["dataset"]["use_ftfy"] is False
    assert stream_of(read_rows(tmp_path / "a")) == expected_stream(["cafÃ© latte"])
    prepare(None, tmp_path / "b", metadata_files=str(tmp_path / "l.txt"), use_ftfy=True)
    assert stream_of(read_rows(tmp_path / "b")) == expected_stream(["café latte"])


def test_split_text_to_tokenize_gives_the_same_ids(corpus, prepared, tmp_path):
    prepare(corpus[0], tmp_path, split_text_to_tokenize=True, chunk_len_to_split=50)
    np.testing.assert_array_equal(read_rows(tmp_path), read_rows(prepared[0]))


def test_huggingface_tokenizer_matches_gpt2(corpus, prepared, tmp_path):
    from btlm.tokenizer import save_tokenizer

    save_tokenizer(tmp_path / "tok")
    prepare(corpus[0], tmp_path / "o", tokenizer_type="HuggingFaceTokenizer", huggingface_tokenizer=str(tmp_path / "tok"))
    np.testing.assert_array_equal(read_rows(tmp_path / "o"), read_rows(prepared[0]))


def _resume_corpus(tmp_path):
    """Input files large enough to kill a run between shards, and the settings the resume tests use."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        write_jsonl(d / f"part{i}.jsonl", make_docs(200, seed=10 + i, max_words=300))
    return d, dict(max_seq_length=64, files_per_record=64, compression="none")


def _killed_run(d, out, common):
    """``prepare(d, out)`` killed (SIGKILL) after its first checkpoint."""
    # a forked child (starts instantly, no re-import) running the real thing with 2 worker processes
    import multiprocessing as mp

    proc = mp.get_context("fork").Process(target=prepare, args=(d, out), kwargs=dict(batch_chars=20000, processes=2,
                                                                                     **common))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "checkpoint.json").exists() and proc.is_alive():
        time.sleep(0.002)
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.join()
    assert (out / "checkpoint.json").exists()
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert not ckpt["complete"], "the run finished before it could be killed; make the corpus larger"


def test_resume_keeps_h5_files_btlm_did_not_write(tmp_path):
    d, common = _resume_corpus(tmp_path)
    out = tmp_path / "killed"
    _killed_run(d, out, common)
    (out / "mine.h5").write_bytes(b"the user's own file")
    (out / ".my_notes.tmp").write_bytes(b"the user's own hidden file")
    prepare(d, out, batch_chars=20000, resume_from_checkpoint=True, **common)
    assert (out / "mine.h5").read_bytes() == b"the user's own file"
    assert (out / ".my_notes.tmp").read_bytes() == b"the user's own hidden file"


def test_kill_and_resume_gives_identical_shards(tmp_path):
    d, common = _resume_corpus(tmp_path)
    prepare(d, tmp_path / "ref", batch_chars=20000, **common)
    out = tmp_path / "killed"
    _killed_run(d, out, common)
    # a half-written shard never carries a finished name
    (out / ".examples_00099.h5.k3_x9q.tmp").write_bytes(b"partial")  # btlm.io.atomic_path's temporary name
    assert not (out / "data_params.json").exists()
    with pytest.raises(DataError, match="already holds"):
        prepare(d, out, batch_chars=20000, **common)
    with pytest.raises(DataError, match="different settings"):
        prepare(d, out, batch_chars=20000, resume_from_checkpoint=True, **{**common, "max_seq_length": 32})
    p = prepare(d, out, batch_chars=20000, resume_from_checkpoint=True, **common)
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))
    np.testing.assert_array_equal(read_rows(out), read_rows(tmp_path / "ref"))
    ref = json.loads((tmp_path / "ref" / "data_params.json").read_text())
    for k in ("documents", "tokens", "n_examples", "records_read"):
        assert p["post-process"][k] == ref["post-process"][k]
    assert p["h5_dataset_stats"] == ref["h5_dataset_stats"]


def test_gzip_shards_are_plain_deflate_chunks(prepared):
    """Rows are compressed by ISA-L, not HDF5: each chunk must still be a standard zlib stream of one row."""
    import zlib

    import h5py

    with h5py.File(sorted(prepared[0].glob("*.h5"))[0], "r") as f:
        ds = f["data"]
        assert ds.compression == "gzip" and ds.chunks == (1, 3, 32)
        for i in (0, len(ds) - 1):
            mask, raw = ds.id.read_direct_chunk((i, 0, 0))
            assert mask == 0 and len(raw) < ds[i].nbytes
            np.testing.assert_array_equal(np.frombuffer(zlib.decompress(raw), dtype="<i4").reshape(3, 32), ds[i])


def test_gpt2_vocab_files_load_like_tiktoken(tmp_path):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from btlm.data.preprocess import gpt2_mergeable_ranks
    from btlm.tokenizer import bpe_files

    encoder, merges = (str(p) for p in bpe_files())
    ranks, eos = gpt2_mergeable_ranks(merges, encoder)  # the fast loader, with the merge check
    assert eos == EOS_ID and ranks == data_gym_to_mergeable_bpe_ranks(merges, encoder)
    # Model Zoo style --vocab_file/--encoder_file give the same rows as the shipped tokenizer
    d = tmp_path / "in"
    d.mkdir()
    docs = make_docs(30, seed=7)
    write_jsonl(d / "a.jsonl", docs)
    prepare(d, tmp_path / "o", vocab_file=merges, encoder_file=encoder, min_sequence_len=2)
    assert stream_of(read_rows(tmp_path / "o")) == expected_stream(docs)
    # merges that disagree with the encoder ids are refused with the file names
    lines = open(merges, encoding="utf-8").read().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "bad.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.bpe.*merge 1 .* does not match encoder id 256"):
        prepare(d, tmp_path / "o2", vocab_file=str(tmp_path / "bad.bpe"), encoder_file=encoder)


def lmdata_main(argv: list[str]) -> int:
    """``btlm data ARGV`` in this process."""
    return btlm_main(["data", *argv])


def test_empty_and_whitespace_documents_follow_model_zoo(tmp_path):
    """The Model Zoo's LMData tokenizes every document and appends EOS: "" is a lone EOS, " " is 220 + EOS,
    "\\n" is 198 + EOS. The streams here are written out by hand (GPT-2 ids: "a" = 64, EOS = 50256)."""
    E = EOS_ID
    assert E == 50256
    docs = ["a", "", " ", "\n", "a", "", ""]
    write_jsonl(tmp_path / "in.jsonl", docs)
    p = prepare(tmp_path, tmp_path / "o", max_seq_length=4, min_sequence_len=2)
    stream = [64, E, E, 220, E, 198, E, 64, E, E, E]
    rows = read_rows(tmp_path / "o")
    # windows of msl+1 = 5 tokens with stride 4; the last, partial window [E, E, E] is kept and padded
    assert rows[:, 0].tolist() == [[64, E, E, 220], [E, 198, E, 64], [E, E, E, E]]
    assert rows[:, 2].tolist() == [[E, E, 220, E], [198, E, 64, E], [E, E, E, E]]
    assert rows[:, 1].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert stream_of(rows) == stream
    pp = p["post-process"]
    assert pp["documents"] == 7 and pp["empty_or_whitespace_documents"] == 5 and pp["discarded"] == {}
    assert pp["tokens"] == len(stream) and pp["tokens_dropped"] == 0

    # Without packing each document is its own row; a lone EOS has no label and is dropped (as in the
    # Model Zoo, which counts it as a discarded file): only "a" rows and the " " / "\n" rows remain.
    p = prepare(tmp_path, tmp_path / "nopack", max_seq_length=4, pack_sequences=False, min_sequence_len=2)
    rows = read_rows(tmp_path / "nopack")
    assert rows[:, 0, 0].tolist() == [64, 220, 198, 64] and rows[:, 1].sum(axis=1).tolist() == [1, 1, 1, 1]
    assert p["post-process"]["discarded"] == {"short_document": 3}


def _model_zoo_lmdata_rows(docs: list[str], msl: int, min_len: int) -> tuple[np.ndarray, list[int]]:
    """Model Zoo R2.0.2 ``LMData`` in one process with short_seq_prob 0 (``tokenize_text_auto_lm`` +
    ``create_features_auto_lm``): per document ``prefix + encode(text) + [eos]`` cut into msl+1 windows
    with stride msl; the last window, if short, is the next prefix; the final prefix is dropped (returned
    as the second value)."""
    from btlm.tokenizer import tiktoken_encoding

    enc, prefix, rows = tiktoken_encoding(), [], []
    for text in docs:
        all_text = prefix + enc.encode_ordinary(text) + [EOS_ID]
        chunks = [all_text[i: i + msl + 1] for i in range(0, len(all_text), msl)]
        prefix = chunks.pop(-1) if len(chunks[-1]) < msl + 1 else []
        for c in chunks:
            if len(c) < min_len:
                continue
            rows.append(np.stack([c[:-1], [1] * msl, c[1:]]))
    return np.array(rows, dtype=np.int32), prefix


@pytest.mark.parametrize("msl", [7, 9, 32])
def test_rows_are_model_zoo_rows_plus_the_tail_it_drops(tmp_path, msl):
    """Document for document the Model Zoo's stream, empty and whitespace-only documents included: btlm's
    rows are exactly its rows, followed by the one padded row of the final partial window it drops."""
    docs = make_docs(60, seed=4, max_words=30)
    for i, odd in zip((3, 10, 11, 25, 40), ("", " ", "\n", "", "\n\n  \t")):
        docs.insert(i, odd)
    write_jsonl(tmp_path / "in.jsonl", docs)
    prepare(tmp_path, tmp_path / "o", max_seq_length=msl)
    ours = read_rows(tmp_path / "o")
    zoo, dropped_tail = _model_zoo_lmdata_rows(docs, msl, min_len=6)
    np.testing.assert_array_equal(ours[: len(zoo)], zoo)
    if len(dropped_tail) >= 6:  # btlm keeps it as one padded row (when not shorter than min_sequence_len)
        assert len(ours) == len(zoo) + 1
        n = len(dropped_tail) - 1
        assert ours[-1][0][:n].tolist() == dropped_tail[:-1] and ours[-1][2][:n].tolist() == dropped_tail[1:]
        assert ours[-1][1].tolist() == [1] * n + [0] * (msl - n)
    else:
        assert len(ours) == len(zoo)

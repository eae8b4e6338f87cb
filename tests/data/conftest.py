import gzip
import json
import random

import h5py
import numpy as np
import pytest

from btlm.data.create_hdf5_dataset import OPTIONS, run
from btlm.tokenizer import EOS_ID, tiktoken_encoding

WORDS = ("the model reads tokens from shards while workers pack documents into rows of fixed length; "
         "naïve café déjà vu — numbers 12345 and symbols {}[]() appear too").split()


def make_docs(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, max_words))) for _ in range(n)]


def cfg(input_dir, output_dir, **kw) -> dict:
    c = {k: v[2] for k, v in OPTIONS.items()}
    c.update(input_dir=str(input_dir), output_dir=str(output_dir), processes=1, max_seq_length=32,
             files_per_record=20)
    c.update(kw)
    return c


def prepare(input_dir, output_dir, batch_chars=4000, **kw) -> dict:
    return run(cfg(input_dir, output_dir, **kw), batch_chars=batch_chars, log=lambda *a: None)


def read_rows(output_dir) -> np.ndarray:
    """All rows of all shards, in sorted file order."""
    from pathlib import Path

    parts = []
    for f in sorted(Path(output_dir).glob("*.h5")):
        with h5py.File(f, "r") as h:
            assert h["data"].dtype == np.int32 and h.attrs["n_examples"] == h["data"].shape[0]
            parts.append(h["data"][:])
    return np.concatenate(parts)


def stream_of(rows: np.ndarray) -> list[int]:
    """Undo packing: every row's real inputs, then the final label (windows overlap by one token)."""
    out = []
    for r in rows:
        out += r[0][r[1] == 1].tolist()
    last = rows[-1]
    out.append(int(last[2][last[1] == 1][-1]))
    return out


def expected_stream(docs: list[str]) -> list[int]:
    enc = tiktoken_encoding()
    out = []
    for d in docs:
        out += enc.encode_ordinary(d) + [EOS_ID]
    return out


def write_jsonl(path, docs, key="text", compress=None):
    data = "".join(json.dumps({key: d, "meta": {"redpajama_set_name": "RedPajamaBook"}}) + "\n" for d in docs).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory with every input format; returns (dir, documents in the order they are packed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(160, seed=1)
    docs[5] = "a document that mentions <|endoftext|> literally must stay one document"
    (d / "sub").mkdir()
    # sorted path order: a.jsonl, b.jsonl.gz, c.jsonl.zst, d.parquet, sub/e.txt
    write_jsonl(d / "a.jsonl", docs[:40])
    write_jsonl(d / "b.jsonl.gz", docs[40:80], compress="gz")
    write_jsonl(d / "c.jsonl.zst", docs[80:120], compress="zst")
    pq.write_table(pa.table({"text": docs[120:159]}), d / "d.parquet", row_group_size=7)
    (d / "sub" / "e.txt").write_text(docs[159], encoding="utf-8")
    return d, docs


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    """The corpus prepared once with msl 32, 20 rows per shard."""
    out = tmp_path_factory.mktemp("prepared")
    params = prepare(corpus[0], out)
    return out, params

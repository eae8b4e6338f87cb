"""``btlm data inspect DIR`` and ``btlm data shuffle IN OUT --seed S`` for HDF5 shard directories."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from btlm.data.readers import DataError

BLOCK = 4096  # rows read at a time: bounds memory for any dataset size


def _shards(data_dir: str, recursive: bool = False) -> list[str]:
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir!r} is not a directory")
    pattern = "**/*.h5" if recursive else "*.h5"
    files = sorted(str(p) for p in Path(data_dir).glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"{data_dir!r} holds no .h5 shards")
    return files


def _iter_blocks(files: list[str]):
    """Yield (file, first row, rows ``[k, C, msl]``) blocks over all shards."""
    import h5py

    for f in files:
        try:
            h = h5py.File(f, "r")
        except OSError as e:
            raise DataError(f"{f}: not a readable HDF5 file ({e})") from e
        with h:
            if "data" not in h or h["data"].ndim != 3:
                raise DataError(f"{f}: expected a dataset 'data' of shape (n, C, msl)")
            if h["data"].dtype != np.int32:
                raise DataError(f"{f}: dataset 'data' has dtype {h['data'].dtype}; expected int32 token ids")
            ds = h["data"]
            for s in range(0, ds.shape[0], BLOCK):
                yield f, s, ds[s: s + BLOCK]


def _decoder(data_dir: str):
    """``(decode(ids), vocab_size)`` of the tokenizer named in data_params.json (GPT-2 BPE by default)."""
    tok_type, hf = "GPT2Tokenizer", None
    p = os.path.join(data_dir, "data_params.json")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            proc = json.load(f).get("processing", {})
        tok_type, hf = proc.get("tokenizer_type", tok_type), proc.get("huggingface_tokenizer")
    from btlm.data.preprocess import BatchTokenizer, TokenizerSpec

    tok = BatchTokenizer(TokenizerSpec(tok_type, hf))
    return tok.decode, tok.vocab_size


def inspect_dir(data_dir: str, row: int = 0, top: int = 10) -> dict:
    """Counts, token statistics and one decoded row of a shard directory (reads every row once)."""
    files = _shards(data_dir)
    rows = tokens = valid = 0
    counts: Counter = Counter()
    sample, msl, feats, n_examples_ok = None, None, None, True
    for f, s, block in _iter_blocks(files):
        feats, msl = block.shape[1], block.shape[2]
        mask = block[:, 1].astype(bool)
        ids = block[:, 0][mask]
        counts.update(dict(zip(*np.unique(ids, return_counts=True))))
        if sample is None and rows <= row < rows + len(block):
            sample = block[row - rows]
        rows += len(block)
        tokens += block.shape[0] * msl
        valid += int(mask.sum())
    import h5py

    for f in files:
        with h5py.File(f, "r") as h:
            n_examples_ok &= int(h.attrs.get("n_examples", -1)) == h["data"].shape[0]
    decode, vocab_size = _decoder(data_dir)
    if counts and max(counts) >= vocab_size:
        raise DataError(f"{data_dir}: token id {int(max(counts))} is outside the tokenizer's vocab_size {vocab_size} "
                        "(data prepared with another tokenizer?)")
    params = {}
    if os.path.isfile(os.path.join(data_dir, "data_params.json")):
        with open(os.path.join(data_dir, "data_params.json"), encoding="utf-8") as f:
            params = json.load(f).get("post-process", {})
    eos = params.get("eos_id", 50256)
    out = {
        "data_dir": data_dir, "files": len(files), "sequences": rows, "max_seq_length": msl, "features": feats,
        "n_examples_attr_matches": bool(n_examples_ok), "tokens": tokens, "loss_valid_tokens": valid,
        "padding_fraction": round(1 - valid / tokens, 6) if tokens else 0.0,
        "eos_tokens": int(counts.get(eos, 0)), "distinct_token_ids": len(counts),
        "top_tokens": [[int(t), decode([int(t)]), int(c)] for t, c in counts.most_common(top)],
    }
    if sample is not None:
        m = sample[1].astype(bool)
        out["sample_row"] = row
        out["sample_text"] = decode(sample[0][m].tolist())
    return out


def format_inspect(info: dict) -> str:
    lines = [f"{info['data_dir']}: {info['files']} files, {info['sequences']} sequences x {info['max_seq_length']} "
             f"tokens ({info['features']} features per row)",
             f"tokens {info['tokens']}, loss-valid {info['loss_valid_tokens']}, padding {info['padding_fraction']:.2%}, "
             f"EOS {info['eos_tokens']}, distinct ids {info['distinct_token_ids']}, "
             f"n_examples attrs {'ok' if info['n_examples_attr_matches'] else 'MISMATCH'}",
             "top tokens: " + ", ".join(f"{t!r}={c}" for _, t, c in info["top_tokens"])]
    if "sample_text" in info:
        lines += [f"--- row {info['sample_row']} decoded ---", info["sample_text"]]
    return "\n".join(lines)


def _write_shard_file(path: str, data: np.ndarray, compression: str | None) -> None:
    """Write ``data`` as one whole shard file at ``path``, atomically (temp name, rename)."""
    import h5py

    from btlm.io import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h:
        h.create_dataset("data", data=data, dtype="i4", chunks=(1,) + data.shape[1:],
                         compression=None if compression == "none" else compression)
        h.attrs["n_examples"] = data.shape[0]


def shuffle_dir(in_dir: str, out_dir: str, seed: int, num_output_chunks: int | None = None,
                compression: str = "gzip", progress: bool = False, overwrite: bool = False) -> dict:
    """Globally shuffle every row of ``in_dir``'s shards (recursively) into ``out_dir/data-XXXXX.h5``.

    Like the Model Zoo's ``h5_dataset_shuffle.py``, two passes with bounded memory: each row goes to a
    uniformly random output chunk (``np.random.default_rng(seed)``), then each chunk is permuted in memory
    (``default_rng([seed, chunk])``) and written. The temporary split files are removed afterwards.
    ``out_dir`` must be new or empty unless ``overwrite``; it may never hold ``.h5`` files already (they
    would mix with the shuffled ones).
    """
    import h5py
    from tqdm.auto import tqdm

    from btlm.io import atomic_write, check_output_dir

    files = _shards(in_dir, recursive=True)
    if os.path.isdir(out_dir) and any(f.endswith(".h5") for f in os.listdir(out_dir)):
        raise DataError(f"output directory {out_dir!r} already holds .h5 files")
    check_output_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    k = int(num_output_chunks or len(files))
    if k < 1:
        raise DataError(f"num_output_chunks = {k}: expected >= 1")
    tmp_dir = os.path.join(out_dir, ".shuffle_tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    rng = np.random.default_rng(seed)
    parts: list = [None] * k
    total = 0
    try:
        for f, s, block in tqdm(_iter_blocks(files), disable=not progress, desc="split", unit="block"):
            if parts[0] is None:
                shape = block.shape[1:]
                parts = [h5py.File(os.path.join(tmp_dir, f"{i}.h5"), "w") for i in range(k)]
                for h in parts:
                    h.create_dataset("data", shape=(0, *shape), maxshape=(None, *shape), dtype="i4",
                                     chunks=(min(BLOCK, 256), *shape))
            elif block.shape[1:] != shape:
                raise DataError(f"{f}: rows of shape {block.shape[1:]} differ from {shape}")
            dest = rng.integers(0, k, size=len(block))
            for i in np.unique(dest):
                rows = block[dest == i]
                ds = parts[i]["data"]
                ds.resize(ds.shape[0] + len(rows), axis=0)
                ds[-len(rows):] = rows
            total += len(block)
        for h in parts:
            h.close()
        for i in tqdm(range(k), disable=not progress, desc="shuffle", unit="chunk"):
            with h5py.File(os.path.join(tmp_dir, f"{i}.h5"), "r") as h:
                data = h["data"][:]
            data = data[np.random.default_rng([seed, i]).permutation(len(data))]
            _write_shard_file(os.path.join(out_dir, f"data-{i:05d}.h5"), data, compression)
    finally:
        for h in parts:
            if h is not None and h.id.valid:
                h.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    src_params = os.path.join(in_dir, "data_params.json")
    if os.path.isfile(src_params):  # same tokenizer and settings: inspect and users still find them
        with open(src_params, "rb") as f:
            atomic_write(os.path.join(out_dir, "data_params.json"), f.read())
    info = {"input_dir": in_dir, "input_files": len(files), "seed": seed, "num_output_chunks": k, "rows": total}
    atomic_write(os.path.join(out_dir, "shuffle_params.json"), json.dumps(info, indent=2))
    return info

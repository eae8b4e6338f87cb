"""Data-preparation throughput: ``btlm data LMData`` end to end vs the raw batched tokenizer.

Generates an English corpus offline from the docstrings of the Python standard library (module,
class and function docstrings, one document per module), writes it as ``.jsonl`` files, then measures
in the same run:

1. raw ``tiktoken`` ``encode_ordinary_batch`` over all documents with ``--processes`` threads (the
   roofline: data preparation is tokenizer-bound);
2. the full pipeline (read JSON → tokenize in worker processes → pack → write gzip HDF5 shards).

    python benchmarks/data_prep.py --mb 16 --processes 2 [--out benchmarks/results/data_prep.md]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sysconfig
import tempfile
import time
from pathlib import Path


def stdlib_docstrings(target_bytes: int) -> list[str]:
    """One document per stdlib module: all its docstrings joined by blank lines (repeated to reach the size)."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [ast.get_docstring(n) for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if len(text) > 200:
            docs.append(text)
    if not docs:
        raise SystemExit("no stdlib sources found to build the corpus from")
    out, size, i = [], 0, 0
    while size < target_bytes:
        d = docs[i % len(docs)]
        out.append(d)
        size += len(d.encode("utf-8"))
        i += 1
    return out


def write_corpus(docs: list[str], d: str, n_files: int = 8) -> None:
    for k in range(n_files):
        with open(os.path.join(d, f"part_{k:02d}.jsonl"), "w", encoding="utf-8") as f:
            for doc in docs[k::n_files]:
                f.write(json.dumps({"text": doc, "meta": {"redpajama_set_name": "stdlib"}}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16, help="corpus size in MB of UTF-8 text")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--max_seq_length", type=int, default=2048)
    ap.add_argument("--files_per_record", type=int, default=200, help="rows per shard (shards are written while "
                    "later documents are tokenized)")
    ap.add_argument("--out", help="also write the markdown result here")
    args = ap.parse_args(argv)

    from btlm.data.create_hdf5_dataset import OPTIONS, run
    from btlm.tokenizer import tiktoken_encoding

    docs = stdlib_docstrings(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    enc = tiktoken_encoding()
    results = []
    for threads in sorted({1, args.processes}):
        t0 = time.perf_counter()
        ids = enc.encode_ordinary_batch(docs, num_threads=threads)
        dt = time.perf_counter() - t0
        n_tok = sum(map(len, ids)) + len(docs)  # + one EOS per document, as the pipeline counts
        results.append((f"raw tiktoken encode_ordinary_batch, {threads} thread(s)", dt, n_tok))
    roof = results[-1]
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(docs, os.path.join(tmp))
        for compression in ("gzip", "none"):
            cfg = {k: v[2] for k, v in OPTIONS.items()}
            cfg.update(input_dir=tmp, output_dir=os.path.join(tmp, f"out_{compression}"), processes=args.processes,
                       max_seq_length=args.max_seq_length, compression=compression,
                       files_per_record=args.files_per_record)
            t0 = time.perf_counter()
            params = run(cfg, log=lambda *a: None)
            dt = time.perf_counter() - t0
            results.append((f"`btlm data LMData`, {args.processes} processes, {compression} shards", dt,
                            params["post-process"]["tokens"]))
    lines = [f"Corpus: {len(docs)} documents, {n_bytes / 1e6:.1f} MB of stdlib docstrings as 8 .jsonl files; "
             f"msl {args.max_seq_length}, {args.files_per_record} rows per shard; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.",
             "", "| what | seconds | MB/s | M tokens/s | vs roofline |", "|---|---|---|---|---|"]
    for name, dt, n_tok in results:
        lines.append(f"| {name} | {dt:.2f} | {n_bytes / 1e6 / dt:.2f} | {n_tok / 1e6 / dt:.2f} | "
                     f"{(n_tok / dt) / (roof[2] / roof[1]):.0%} |")
    lines += ["", f"Roofline = raw batched tokenizer with {args.processes} thread(s), measured in the same run."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Data preparation throughput\n\nCommand: `.venv/bin/python benchmarks/data_prep.py "
                    f"--mb {args.mb:g} --processes {args.processes} --files_per_record {args.files_per_record} --out {args.out}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data-preparation throughput: ``btlm data LMData`` end to end vs the raw batched tokenizer.

Generates an English corpus offline from the docstrings of the Python standard library (module,
class and function docstrings, one document per module), writes it as ``.jsonl`` files, then measures
in the same run:

1. raw ``tiktoken`` ``encode_ordinary_batch`` over all documents with ``--processes`` threads (the
   roofline: data preparation is tokenizer-bound);
2. the full pipeline (read JSON → tokenize in worker processes → pack → write gzip / uncompressed HDF5
   shards), building its tokenizer each run like a fresh process does.

Rows run in interleaved rounds and the best round of each is reported.

    python benchmarks/data_prep.py --mb 16 --processes 2 --repeats 3 [--out benchmarks/results/data_prep.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def stdlib_docstrings(target_bytes: int) -> list[str]:
    """One document per stdlib module (:func:`btlm.data.corpus.module_docstrings`, every docstring kept),
    repeated to reach the size."""
    from btlm.data.corpus import module_docstrings

    docs = [text for _, text in module_docstrings(min_chars=0) if len(text) > 200]
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


def raw_tokenizer(enc, docs: list[str], threads: int) -> tuple[float, int]:
    """Seconds and tokens (+ one EOS per document, as the pipeline counts) of the raw batched tokenizer."""
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(docs, num_threads=threads)
    return time.perf_counter() - t0, sum(map(len, ids)) + len(docs)


def raw_tokenizer_numpy(enc, docs: list[str], threads: int) -> tuple[float, int]:
    """Like :func:`raw_tokenizer` but through ``encode_to_numpy`` (the buffer API the pipeline's workers use)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        ids = list(ex.map(lambda d: enc.encode_to_numpy(d, disallowed_special=()), docs))
    return time.perf_counter() - t0, sum(map(len, ids)) + len(docs)


def pipeline(corpus_dir: str, out_dir: str, compression: str, args) -> tuple[float, int]:
    """Seconds and tokens of one full ``btlm data LMData`` run, tokenizer construction included."""
    from btlm.data.create_hdf5_dataset import run
    from btlm.data.options import load_config
    from btlm.data.preprocess import _gpt2_encoding

    _gpt2_encoding.cache_clear()  # every run builds its tokenizer, as a fresh `btlm data` process does
    cfg = load_config(None, dict(input_dir=corpus_dir, output_dir=out_dir, processes=args.processes,
                                 max_seq_length=args.max_seq_length, compression=compression,
                                 files_per_record=args.files_per_record))
    t0 = time.perf_counter()
    params = run(cfg, log=lambda *a: None)
    return time.perf_counter() - t0, params["post-process"]["tokens"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16, help="corpus size in MB of UTF-8 text")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--max_seq_length", type=int, default=2048)
    ap.add_argument("--files_per_record", type=int, default=200, help="rows per shard (shards are written while "
                    "later documents are tokenized)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every row once, the best "
                    "round of each row is reported (other jobs on a shared machine only ever slow a run down)")
    ap.add_argument("--out", help="also write the markdown result here")
    args = ap.parse_args(argv)

    from btlm.tokenizer import tiktoken_encoding

    docs = stdlib_docstrings(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    enc = tiktoken_encoding()
    raw_names = [f"raw tiktoken encode_ordinary_batch, {t} thread(s)" for t in sorted({1, args.processes})]
    numpy_name = f"(info) raw tiktoken encode_to_numpy, {args.processes} thread(s)"
    times: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir = os.path.join(tmp, "corpus")
        os.makedirs(corpus_dir)
        write_corpus(docs, corpus_dir)
        # interleaved rounds, so a burst of load from other jobs hits the roofline and the pipeline alike
        for r in range(args.repeats):
            rows = [(name, lambda t=t: raw_tokenizer(enc, docs, t)) for name, t in zip(raw_names, sorted({1, args.processes}))]
            rows.append((numpy_name, lambda: raw_tokenizer_numpy(enc, docs, args.processes)))
            for comp in ("none", "gzip"):
                rows.append((f"`btlm data LMData`, {args.processes} processes, {comp} shards",
                             lambda c=comp: pipeline(corpus_dir, os.path.join(tmp, f"out_{c}_{r}"), c, args)))
            for name, fn in rows:
                dt, tokens[name] = fn()
                times.setdefault(name, []).append(dt)
    load_after = os.getloadavg()
    # roofline: the fastest raw-tokenizer row (normally the --processes threads one)
    best = {n: min(t) for n, t in times.items()}
    median = {n: statistics.median(t) for n, t in times.items()}
    roof = max(tokens[n] / best[n] for n in raw_names)
    # paired: each run against the roofline of its own round (rows of a round run back to back)
    round_roof = [max(tokens[n] / times[n][r] for n in raw_names) for r in range(args.repeats)]
    paired = {n: statistics.median(tokens[n] / times[n][r] / round_roof[r] for r in range(args.repeats)) for n in times}
    lines = [f"Corpus: {len(docs)} documents, {n_bytes / 1e6:.1f} MB of stdlib docstrings as 8 .jsonl files; "
             f"msl {args.max_seq_length}, {args.files_per_record} rows per shard; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; best of {args.repeats} interleaved rounds; load average (1/5/15 min) "
             f"{'/'.join(f'{x:.1f}' for x in load_before)} before, {'/'.join(f'{x:.1f}' for x in load_after)} after.",
             "", "| what | best s | median s | MB/s | M tokens/s | vs roofline | vs roofline, median of rounds |",
             "|---|---|---|---|---|---|---|"]
    for name, dt in best.items():
        n_tok = tokens[name]
        lines.append(f"| {name} | {dt:.2f} | {median[name]:.2f} | {n_bytes / 1e6 / dt:.2f} | {n_tok / 1e6 / dt:.2f} | "
                     f"{(n_tok / dt) / roof:.0%} | {paired[name]:.0%} |")
    lines += ["", "MB/s, tokens/s and 'vs roofline' use each row's best round (best against best); the last column "
              "is the median over rounds of each run against the roofline of its own round (paired, so a burst "
              "of load from other jobs affects both sides of a ratio).",
              "Roofline = the fastest `encode_ordinary_batch` row (the raw batched tokenizer, Python lists out; "
              "no reading, packing or writing), measured in the same run. The (info) row tokenizes through the "
              "numpy-buffer API the pipeline's workers use, for comparison; it is not the roofline."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Data preparation throughput\n\nCommand: `.venv/bin/python benchmarks/data_prep.py "
                    f"--mb {args.mb:g} --processes {args.processes} --files_per_record {args.files_per_record} "
                    f"--repeats {args.repeats} --out {args.out}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

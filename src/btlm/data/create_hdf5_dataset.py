"""``btlm data LMData …``: raw text → HDF5 shards (the settings and their checks are in :mod:`btlm.data.options`).

A re-implementation of the Cerebras Model Zoo ``create_hdf5_dataset.py LMData`` (same flags, YAML
``--params`` sections and ``[n, 3, msl]`` int32 output), with these differences, all deliberate:

* **Lossless and process-count independent.** The corpus is read in one deterministic order (sorted
  files, or the ``--metadata_files`` order) and packed as one token stream; ``--processes`` workers only
  tokenize batches of documents (results are consumed in submission order) and write shards. The
  shards are therefore byte-for-byte the same for any number of processes, and no tokens are lost at
  worker boundaries (the Model Zoo dropped each worker's last partial window).
* **Robust.** Malformed JSON, missing keys, invalid UTF-8 and corrupt compressed files are counted and
  reported with file and line (``--strict True`` makes them an error). Shards are written under a
  hidden temporary name and renamed when complete.
* **Exact resume.** After each shard the small ``checkpoint.json`` records where the rows of the next
  shard begin in the input (a file/record position, the packer's leftover tokens and rng); a
  resumed run replays from there and produces exactly the shards of an uninterrupted run.
* **Model Zoo's token stream.** Every document read, empty and whitespace-only ones included, is
  tokenized and followed by EOS exactly as ``LMData`` does (``""`` → ``[EOS]``, ``" "`` → ``[220, EOS]``),
  so the packed stream is the Model Zoo's, plus the final partial window it drops.
* ``btlm data Summarization`` runs through the same reader, worker pool, shard writer and resume
  checkpoints: records are (prompt, completion) pairs, workers turn each into one row
  (:func:`btlm.data.preprocess.pair_row`, the Model Zoo SummarizationPreprocessor layout) and
  :class:`PairRows` stands in for the packer; each row carries where its loss mask starts.
* ``--use_ftfy`` defaults to False (the Model Zoo README's documented default; its code said True,
  so the two disagree). Shard names are zero-padded (``examples_00000.h5``) so the
  loader's sorted file order is the corpus order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from btlm.data.preprocess import (BatchTokenizer, CleanSpec, Packer, PairSpec, TokenizerSpec, init_worker,
                                  tokenize_batch, tokenize_pairs, write_shard)
from btlm.data.readers import DataError, discover_files, iter_records, where

CHECKPOINT = "checkpoint.json"
MAX_PROBLEMS_LISTED = 100


from btlm.data.options import (NOT_IN_FINGERPRINT, OPTIONS, PROCESSORS, DataConfig, LMDataConfig,  # noqa: F401
                               SummarizationConfig, mode_of, options_for, validate_config)

# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class Batch:
    """Documents read between two corpus positions, with the counter changes reading them caused."""

    start: tuple[int, int]
    texts: list[str] = field(default_factory=list)
    delta: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    bytes_done: int = 0


def read_batches(files: list[str], start: tuple[int, int], key: str | tuple[str, ...], strict: bool,
                 batch_chars: int):
    """Yield :class:`Batch` es of about ``batch_chars`` characters from corpus position ``start`` on.

    ``key`` a tuple: the batch texts are tuples (prompt, completion), see :func:`~btlm.data.readers.iter_records`.

    Batch boundaries fall only after a document, and depend on the text alone, never on timing.
    The per-record work is kept to plain local counting: it runs in the main process for every record.
    """
    sizes = [os.path.getsize(f) for f in files]
    done = sum(sizes[: start[0]])
    batch, chars, records = Batch(start), 0, 0

    def close(b: Batch, bytes_done: int) -> Batch:
        b.delta["records_read"] += records
        b.delta["documents"] += len(b.texts)
        b.delta["raw_chars"] += chars
        b.bytes_done = bytes_done
        return b

    for fi in range(start[0], len(files)):
        path, first, pos = files[fi], (start[1] if fi == start[0] else 0), [None]
        if first == 0:
            batch.delta["files_read"] += 1
        for rec in iter_records(path, key, first, pos):
            records += 1
            text = rec.text
            if rec.problem:
                msg = f"{where(path, rec)}: {rec.problem}: {rec.detail}"
                if strict:
                    raise DataError(msg + " (strict mode)")
                batch.delta[f"discarded_{rec.problem}"] += 1
                batch.problems.append(msg)
                continue
            if type(text) is tuple:
                batch.texts.append(text)
                chars += sum(map(len, text))
            elif not text or text.isspace():
                # Kept, as the Model Zoo keeps them: "" becomes a lone EOS and " " / "\n" their own
                # tokens + EOS. Dropping them would shift the token stream from there on.
                batch.delta["empty_or_whitespace_documents"] += 1
            if type(text) is str:
                batch.texts.append(text)
                chars += len(text)
            if chars >= batch_chars:
                yield close(batch, done + pos[0]())
                batch, chars, records = Batch((fi, rec.record_no + 1)), 0, 0
        done += sizes[fi]
    yield close(batch, done)


# ---------------------------------------------------------------------------------------------
# executing: worker pool or in-process


class _Done:
    """An already computed result with the AsyncResult interface (used when processes == 1)."""

    def __init__(self, fn, *args):
        self._v = fn(*args)

    def ready(self):
        return True

    def get(self):
        return self._v


class _Executor:
    def __init__(self, processes: int, initargs: tuple):
        self.pool = None
        init_worker(*initargs)  # in-process work, and forked workers inherit the built tokenizer
        if processes > 1:
            import multiprocessing as mp

            # fork: workers start at once with the parent's tokenizer; spawn (no fork) rebuilds it per worker.
            if "fork" in mp.get_all_start_methods():
                self.pool = mp.get_context("fork").Pool(processes)
            else:
                self.pool = mp.get_context("spawn").Pool(processes, initializer=init_worker, initargs=initargs)

    def submit(self, fn, *args):
        return self.pool.apply_async(fn, args) if self.pool else _Done(fn, *args)

    def close(self, ok: bool):
        if self.pool:
            (self.pool.close if ok else self.pool.terminate)()
            self.pool.join()


# ---------------------------------------------------------------------------------------------
# the run


def shard_name(cfg: DataConfig, idx: int) -> str:
    return f"{cfg.output_name}_{idx:05d}.h5"


def _atomic_json(path: str, obj, indent: int | None = 2) -> None:
    """Write JSON atomically (a killed run never leaves half a file); one write: json.dump's many small
    writes were slow, and no fsync: checkpoint.json is rewritten after every shard."""
    from btlm.io import atomic_write

    atomic_write(path, json.dumps(obj, indent=indent), fsync=False)


def _fingerprint(cfg: DataConfig, files: list[str]) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    return {"settings": settings, "files": [[f, os.path.getsize(f)] for f in files]}


def _prepare_output(cfg: DataConfig, fingerprint: dict) -> dict | None:
    """Create the output dir; return the checkpoint to resume from (None: fresh run)."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"output_dir {out!r} is a file; expected a directory")
    os.makedirs(out, exist_ok=True)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".h5"))
    ckpt_path = os.path.join(out, CHECKPOINT)
    if not cfg.resume_from_checkpoint:
        if shards:
            raise DataError(f"output_dir {out!r} already holds {len(shards)} .h5 files; pass "
                            "--resume_from_checkpoint True to continue a killed run, or use an empty directory")
        return None
    if not os.path.isfile(ckpt_path):
        if shards:
            raise DataError(f"--resume_from_checkpoint: {ckpt_path} is missing but {out!r} holds .h5 files")
        return None
    with open(ckpt_path, encoding="utf-8") as f:
        ckpt = json.load(f)
    if ckpt.get("fingerprint") != fingerprint:
        old = ckpt.get("fingerprint", {})
        diff = sorted(k for k in set(old.get("settings", {})) | set(fingerprint["settings"])
                      if old.get("settings", {}).get(k) != fingerprint["settings"].get(k))
        what = f"settings {diff}" if diff else "the input files (names or sizes)"
        raise DataError(f"--resume_from_checkpoint: {ckpt_path} was written with different {what}; "
                        "resume needs the same inputs and settings")
    keep = {shard_name(cfg, i) for i in range(ckpt["shards_written"])}
    shard = re.escape(cfg.output_name) + r"_\d{5}\.h5"  # only names btlm gives its shards
    ours = re.compile(shard)
    # btlm.io.atomic_path's temporaries (".<name>.<random>.tmp") of the files btlm writes here
    temporary = re.compile(rf"\.(?:{shard}|{re.escape(CHECKPOINT)}|data_params\.json)\.\w+\.tmp")
    for f in os.listdir(out):  # shards after the checkpoint and half-written temporaries are redone
        if (ours.fullmatch(f) and f not in keep) or temporary.fullmatch(f):
            os.remove(os.path.join(out, f))
    missing = sorted(keep - set(os.listdir(out)))
    if missing:
        raise DataError(f"--resume_from_checkpoint: shards {missing[:3]} recorded in {ckpt_path} are missing")
    return ckpt


def run(cfg: DataConfig | dict, batch_chars: int = 1 << 18, log=print) -> dict:
    """Prepare the dataset described by ``cfg`` (an :class:`LMDataConfig` / :class:`SummarizationConfig`, or a
    mapping of their settings, checked here); return the data_params dict."""
    return Preprocessor(validate_config(cfg), log).run(batch_chars)


class Preprocessor:
    """One ``btlm data LMData`` / ``Summarization`` run over the files of ``cfg``.

    Documents are read in corpus order, tokenized by the worker pool (results consumed in submission
    order), packed into rows (or, for pairs, taken one row each) and written as shards of
    ``files_per_record`` rows, strictly in order, with the resume checkpoint rewritten after every shard.
    The run's state (rows waiting for a full shard, shards submitted and written, the packer snapshots a
    checkpoint needs) lives on the object; :meth:`run` is the orchestration.
    """

    def __init__(self, cfg: DataConfig, log=print):
        self.cfg, self.log = cfg, log
        self.files = discover_files(cfg.input_dir, cfg.metadata_files)
        self.tok_spec = TokenizerSpec(cfg.tokenizer_type, cfg.huggingface_tokenizer, cfg.vocab_file,
                                      cfg.encoder_file)
        self.tok = BatchTokenizer(self.tok_spec)
        self.eos, self.pad = self._special_ids()
        self.pairs = isinstance(cfg, SummarizationConfig)
        self.sep_id = _sep_id(self.tok, cfg.sep_token, log) if self.pairs else None
        self.fingerprint = _fingerprint(cfg, self.files)
        self.msl, self.fpr = cfg.max_seq_length, cfg.files_per_record

    def _special_ids(self) -> tuple[int, int]:
        """The eos and pad ids: the flags', else the tokenizer's (pad defaults to the eos id given)."""
        cfg, tok = self.cfg, self.tok
        eos = cfg.eos_id if cfg.eos_id is not None else tok.eos_id
        pad = cfg.pad_id if cfg.pad_id is not None else (cfg.eos_id if cfg.eos_id is not None else tok.pad_id)
        if eos is None or pad is None:
            raise DataError(f"tokenizer {cfg.huggingface_tokenizer!r} has no eos token: pass --eos_id")
        for key, value in (("eos_id", eos), ("pad_id", pad)):
            if not 0 <= value < tok.vocab_size:
                raise DataError(f"{key} = {value}: expected an id in [0, {tok.vocab_size}) (the tokenizer's vocab_size)")
        return eos, pad

    def run(self, batch_chars: int = 1 << 18) -> dict:
        """Write the shards, data_params.json and the final checkpoint; return the data_params dict."""
        ckpt = _prepare_output(self.cfg, self.fingerprint)
        if ckpt and ckpt.get("complete"):
            self.log(f"{self.cfg.output_dir} is already complete ({ckpt['shards_written']} shards); nothing to resume")
            with open(os.path.join(self.cfg.output_dir, "data_params.json"), encoding="utf-8") as f:
                return json.load(f)
        start = self._restore(ckpt)
        self._process(start, batch_chars)
        return self._dump_result()

    def _restore(self, ckpt: dict | None) -> tuple[int, int]:
        """Set up the packer and counters, from the checkpoint when resuming; return the corpus position
        (file index, record) to read from."""
        cfg = self.cfg
        self.pair_spec = PairSpec(self.msl, self.pad, self.sep_id, cfg.min_sequence_len) if self.pairs else None
        self.packer = PairRows() if self.pairs else Packer(self.msl, self.pad, cfg.pack_sequences,
                                                           cfg.short_seq_prob, cfg.min_sequence_len, cfg.seed)
        self.counters, self.problems, self.shard_stats = Counter(), [], Counter()
        self.shards_written, start, self.skip_rows = 0, (0, 0), 0
        if ckpt:
            snap = ckpt["snapshot"]
            self.packer.load_state(snap["packer"])
            self.counters, self.problems = Counter(snap["counters"]), list(snap["problems"])
            self.shard_stats, self.shards_written = Counter(ckpt["shard_stats"]), ckpt["shards_written"]
            start = tuple(snap["position"])
            # rows already in shards written before the resume point
            self.skip_rows = self.shards_written * self.fpr - self.packer.rows_emitted
            self.log(f"resuming after {self.shards_written} shards from {self.files[start[0]]} record {start[1]}")
        self.next_shard = self.shards_written
        self.snapshots: deque = deque()  # (rows_emitted, snapshot) at the start of every packed batch
        self.writes: deque = deque()  # (index, async result), committed strictly in order
        self.pending: list = []  # (windows, lengths, starts) not yet in a submitted shard
        self.pending_n = 0
        return start

    def _process(self, start: tuple[int, int], batch_chars: int) -> None:
        """Read, tokenize, pack and write everything from corpus position ``start`` on."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        processes = cfg.processes or os.cpu_count() or 1
        clean_spec = CleanSpec(cfg.use_ftfy, cfg.ftfy_normalizer, cfg.wikitext_detokenize,
                               getattr(cfg, "split_text_to_tokenize", False), getattr(cfg, "chunk_len_to_split", 2000))
        self.ex = _Executor(processes, (self.tok_spec, clean_spec, self.eos, self.pair_spec))
        total_bytes = sum(os.path.getsize(f) for f in self.files)
        self.pbar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not cfg.display_pbar,
                         desc="Summarization" if self.pairs else "LMData")
        self.t0 = time.perf_counter()
        ok = False
        try:
            inflight: deque = deque()
            key = (cfg.prompt_key, cfg.completion_key) if self.pairs else cfg.jsonl_key
            for batch in read_batches(self.files, start, key, cfg.strict, batch_chars):
                inflight.append((batch, self.ex.submit(tokenize_pairs if self.pairs else tokenize_batch, batch.texts)))
                if len(inflight) > 2 * processes:
                    self._pack(*inflight.popleft())
                    self._commit_ready(block=len(self.writes) > processes)
            while inflight:
                self._pack(*inflight.popleft())
                self._commit_ready(block=False)
            self._add_rows(*self.packer.finish())
            if self.pending and cfg.write_remainder:
                self._submit_shard(*self._pending_rows())
            elif self.pending:
                self.counters["rows_not_written_remainder"] += self.pending_n
            self._commit_ready(block=True)
            ok = True
        finally:
            self.ex.close(ok)
            self.pbar.close()

    def _pack(self, batch: Batch, res) -> None:
        """Pack one tokenized batch (remembering the state before it for the checkpoints) and queue its rows."""
        out = res.get()
        counters = self.counters
        self.snapshots.append((self.packer.rows_emitted, {
            "position": list(batch.start), "counters": dict(counters), "problems": list(self.problems),
            "packer": self.packer.state()}))
        counters.update(batch.delta)
        self.problems.extend(batch.problems[: MAX_PROBLEMS_LISTED - len(self.problems)])
        if self.pairs:
            windows, lengths, starts, skipped, tokens = out
            counters.update({f"discarded_{k}": v for k, v in skipped.items()})
            counters["tokens"] += tokens
            self._add_rows(*self.packer.add(windows, lengths), starts)
        else:
            counters["tokens"] += len(out[0])
            self._add_rows(*self.packer.add(*out))
        self.pbar.update(batch.bytes_done - self.pbar.n)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.pbar.set_postfix(docs_per_s=f"{counters['documents'] / dt:.0f}", tok_per_s=f"{counters['tokens'] / dt:.3g}")

    def _add_rows(self, windows, lengths, starts=None) -> None:
        """Queue rows (``starts``: where each row's loss mask begins, None = 0) and submit full shards."""
        fpr = self.fpr
        starts = np.zeros(len(lengths), dtype=np.int32) if starts is None else starts
        if self.skip_rows:  # rows already in shards written before the resume point
            k = min(self.skip_rows, len(lengths))
            windows, lengths, starts, self.skip_rows = windows[k:], lengths[k:], starts[k:], self.skip_rows - k
        if len(lengths):
            self.pending.append((windows, lengths, starts))
            self.pending_n += len(lengths)
        if self.pending_n >= fpr:
            w, n, st = self._pending_rows()
            full = len(n) // fpr * fpr
            for s in range(0, full, fpr):
                self._submit_shard(w[s: s + fpr], n[s: s + fpr], st[s: s + fpr])
            self.pending = [(w[full:], n[full:], st[full:])] if full < len(n) else []
            self.pending_n = len(n) - full

    def _pending_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The queued rows as one (windows, lengths, starts)."""
        return tuple(np.concatenate([p[j] for p in self.pending]) for j in range(3))

    def _submit_shard(self, windows, lengths, starts) -> None:
        cfg = self.cfg
        path = os.path.join(cfg.output_dir, shard_name(cfg, self.next_shard))
        self.writes.append((self.next_shard, self.ex.submit(write_shard, path, windows, lengths, self.pad, self.eos,
                                                            cfg.compression, cfg.inverted_mask,
                                                            starts if self.pairs else None)))
        self.next_shard += 1

    def _commit_ready(self, block: bool) -> None:
        """Record finished shards (in order) and write the resume checkpoint after each."""
        writes, snapshots = self.writes, self.snapshots
        while writes and (block or writes[0][1].ready()):
            idx, res = writes.popleft()
            self.shard_stats.update(res.get())
            self.shards_written = idx + 1
            rows_done = (idx + 1) * self.fpr
            while len(snapshots) > 1 and snapshots[1][0] <= rows_done:
                snapshots.popleft()
            _atomic_json(os.path.join(self.cfg.output_dir, CHECKPOINT), {
                "fingerprint": self.fingerprint, "shards_written": idx + 1, "shard_stats": dict(self.shard_stats),
                "snapshot": snapshots[0][1], "complete": False}, indent=None)  # compact: written per shard

    def _dump_result(self) -> dict:
        """Write data_params.json and the final (complete) checkpoint; return the data_params dict."""
        cfg, tok, counters = self.cfg, self.tok, self.counters
        counters["tokens_dropped"] = self.packer.dropped_tokens
        counters["discarded_short_document"] = self.packer.short_documents
        params = _data_params(cfg, self.files, counters, self.problems, self.shard_stats, self.shards_written,
                              self.eos, self.pad, tok.vocab_size + (self.sep_id == tok.vocab_size),
                              time.perf_counter() - self.t0)
        if self.pairs:
            params["post-process"]["sep_id"] = self.sep_id
        _atomic_json(os.path.join(cfg.output_dir, "data_params.json"), params)
        _atomic_json(os.path.join(cfg.output_dir, CHECKPOINT), {
            "fingerprint": self.fingerprint, "shards_written": self.shards_written,
            "shard_stats": dict(self.shard_stats), "complete": True})
        return params


class PairRows:
    """The :class:`~btlm.data.preprocess.Packer` interface for prompt/completion rows: each pair is its
    own row (built by the workers), so the only state a resume needs is how many rows were emitted."""

    def __init__(self):
        self.rows_emitted = self.dropped_tokens = self.short_documents = 0

    def state(self) -> dict:
        return {"rows_emitted": self.rows_emitted}

    def load_state(self, st: dict) -> None:
        self.rows_emitted = st["rows_emitted"]

    def add(self, windows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows_emitted += len(lengths)
        return windows, lengths

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, 0), dtype=np.int32), np.empty(0, dtype=np.int32)


def _sep_id(tok: BatchTokenizer, sep_token: str | None, log) -> int | None:
    """The id of ``--sep_token``: its id if the tokenizer has it as one token, else the next id past the
    vocabulary (the Model Zoo adds it to the tokenizer; a pretrained model's embedding lacks that row)."""
    if not sep_token:
        return None
    known = tok.token_id(sep_token)
    if known is not None:
        return known
    log(f"warning: sep_token {sep_token!r} is not a token of the tokenizer; it gets the new id {tok.vocab_size} "
        f"(vocab size {tok.vocab_size + 1}): a pretrained model needs its embedding resized for it")
    return tok.vocab_size


def _data_params(cfg, files, counters, problems, shard_stats, n_shards, eos, pad, vocab_size, seconds) -> dict:
    """data_params.json: the settings by Model Zoo section, then what the run read, dropped and wrote."""
    out: dict = {s: {} for s in ("setup", "processing", "dataset")}
    mode = mode_of(cfg)
    out["setup"]["dataset_processor"] = PROCESSORS[mode]
    for k, setting in options_for(mode).items():
        out[setting.section][k] = getattr(cfg, k)
    n = shard_stats.get("num_sequences", 0)
    total = shard_stats.get("num_tokens", 0)
    discarded = {k[len("discarded_"):]: v for k, v in sorted(counters.items()) if k.startswith("discarded_") and v}
    out["post-process"] = {
        "input_files": len(files), "files_read": counters["files_read"], "records_read": counters["records_read"],
        "documents": counters["documents"],
        "empty_or_whitespace_documents": counters["empty_or_whitespace_documents"],  # included in documents
        "discarded": discarded, "raw_chars_count": counters["raw_chars"],
        "tokens": counters["tokens"], "tokens_dropped": counters["tokens_dropped"],
        "rows_not_written_remainder": counters["rows_not_written_remainder"],
        "n_examples": n, "n_shards": n_shards, "eos_id": eos, "pad_id": pad, "vocab_size": vocab_size,
        "seconds": round(seconds, 3),
    }
    out["h5_dataset_stats"] = {**{k: shard_stats.get(k, 0) for k in ("num_sequences", "num_tokens", "loss_valid_tokens",
                                                                     "non_pad_tokens", "eos_tokens")},
                               "padding_fraction": round(1 - shard_stats.get("loss_valid_tokens", 0) / total, 6) if total else 0.0}
    out["problems"] = problems
    return out

"""Input discovery and streaming record readers for data preparation.

Every reader yields one :class:`Record` per input record (a JSON line, a parquet row, a whole ``.txt``
file), in file order, so a position ``(file_index, record_no)`` identifies a point in the corpus and a
resumed run can skip straight to it. Bad records are yielded as problems (never raised here): the
caller counts them, or raises with ``--strict``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from btlm.errors import BTLMError

# Longest first, so ".jsonl.zst" is not mistaken for something ending in ".zst" only.
SUPPORTED_SUFFIXES = (".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz", ".jsonl", ".parquet", ".txt")


class DataError(BTLMError, ValueError):
    """Bad input or settings for data preparation / loading (message names the file, key or value)."""


@dataclass
class Record:
    """One input record: ``text`` for a usable document, else ``problem`` (a kind such as ``malformed_json``)."""

    record_no: int
    text: str | None = None
    problem: str | None = None
    detail: str = ""


def input_format(path: str | os.PathLike) -> str | None:
    """Return the supported suffix ``path`` ends with, or None."""
    name = str(path).lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def discover_files(input_dir: str | None = None, metadata_files: str | list[str] | None = None) -> list[str]:
    """List the input files: ``metadata_files`` (one path a line, listed order kept) or ``input_dir``.

    ``input_dir`` is searched recursively and the result sorted, so the same corpus packs into the
    same shards on every file system (the Model Zoo used directory-listing order).
    """
    if metadata_files:
        lists = metadata_files.split(",") if isinstance(metadata_files, str) else list(metadata_files)
        files: list[str] = []
        for lst in lists:
            lst = lst.strip()
            if not os.path.isfile(lst):
                raise DataError(f"metadata file {lst!r} does not exist")
            with open(lst, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    p = line.strip()
                    if not p:
                        continue
                    if not os.path.isfile(p):
                        raise DataError(f"{lst}:{n}: listed input file {p!r} does not exist")
                    if input_format(p) is None:
                        raise DataError(f"{lst}:{n}: {p!r} is not one of the supported formats {SUPPORTED_SUFFIXES}")
                    files.append(p)
    elif input_dir:
        if not os.path.isdir(input_dir):
            raise DataError(f"input_dir {input_dir!r} is not a directory")
        files = sorted(str(p) for p in Path(input_dir).rglob("*") if p.is_file() and input_format(p))
    else:
        raise DataError("give --input_dir or --metadata_files")
    if not files:
        raise DataError(f"no input files with suffixes {SUPPORTED_SUFFIXES} in {input_dir or metadata_files!r}")
    return files


def _text_from_json(obj, key: str) -> Record:
    """Pull the document text out of one decoded JSON value (a bare string line is a document too)."""
    if isinstance(obj, str):
        return Record(0, text=obj)
    if not isinstance(obj, dict):
        return Record(0, problem="malformed_json", detail=f"expected an object or a string, got {type(obj).__name__}")
    if key not in obj:
        return Record(0, problem="missing_key", detail=f"no key {key!r} (keys: {sorted(obj)[:8]})")
    val = obj[key]
    if isinstance(val, list) and all(isinstance(v, str) for v in val):
        return Record(0, text="\n\n".join(val))  # Model Zoo joins list values with a blank line
    if not isinstance(val, str):
        return Record(0, problem="bad_value", detail=f"{key!r} is a {type(val).__name__}, expected a string")
    return Record(0, text=val)


def _fields_from_json(obj, key: str | tuple[str, ...]) -> Record:
    """A document (``key`` a string), or a tuple of texts, one per key (``key`` a tuple: prompt/completion)."""
    if isinstance(key, str):
        return _text_from_json(obj, key)
    if not isinstance(obj, dict):
        return Record(0, problem="malformed_json", detail=f"expected an object, got {type(obj).__name__}")
    texts = []
    for k in key:
        rec = _text_from_json(obj, k)
        if rec.problem:
            return rec
        texts.append(rec.text)
    return Record(0, text=tuple(texts))


class _ZstdRaw(io.RawIOBase):
    """Decompress a (multi-frame) zstd stream, raising at a truncated frame.

    ``ZstdDecompressor.stream_reader`` silently ends at a truncated frame, which would let a damaged
    download pass unnoticed; the decompressobj API tells whether the frame was complete.
    """

    def __init__(self, raw):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        # max_window_size: SlimPajama files are written with long windows
        self._dobj = zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj()
        self._buf, self._in_frame = b"", False

    def readable(self):
        return True

    def _feed(self, data: bytes) -> None:
        while data:
            self._in_frame = True
            self._buf += self._dobj.decompress(data)
            data = b""
            if self._dobj.eof:  # frame complete: the rest starts the next frame
                data, self._in_frame = self._dobj.unused_data, False
                self._dobj = self._zstd.ZstdDecompressor(max_window_size=2**31).decompressobj()

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame (truncated file)")
                return 0
            self._feed(chunk)
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def _open_binary(path: str, raw) -> io.BufferedReader:
    """Wrap the raw file in the decompressor its suffix names."""
    fmt = input_format(path)
    if fmt.endswith(".zst"):
        return io.BufferedReader(_ZstdRaw(raw), buffer_size=1 << 20)
    if fmt.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), buffer_size=1 << 20)
    return io.BufferedReader(raw, buffer_size=1 << 20)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (zstandard.ZstdError, EOFError, OSError, zlib.error)


def _bad_line(n: int, line: bytes, err: Exception) -> Record:
    """Classify a line orjson rejected: not UTF-8, or not JSON (orjson reports both the same way)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(n, problem="invalid_utf8", detail=str(e))
    return Record(n, problem="malformed_json", detail=str(err))


def _iter_jsonl(path: str, raw, key: str, start: int) -> Iterator[Record]:
    import orjson  # ~4x faster than json, and it rejects lone surrogates the tokenizer could not encode

    stream = _open_binary(path, raw)
    n = -1
    try:
        for n, line in enumerate(stream):
            if n < start:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                if line.strip():  # blank lines are skipped silently
                    yield _bad_line(n, line, e)
                continue
            if type(key) is str and type(obj) is dict and type(obj.get(key)) is str:  # the common case
                yield Record(n, text=obj[key])
                continue
            rec = _fields_from_json(obj, key)
            rec.record_no = n
            yield rec
    except _corrupt_errors() as e:
        yield Record(n + 1, problem="corrupt_file", detail=f"{type(e).__name__}: {e}")


def _iter_parquet(path: str, key: str, start: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield Record(0, problem="corrupt_file", detail=f"{type(e).__name__}: {e}")
        return
    keys = [key] if isinstance(key, str) else list(key)
    missing = [k for k in keys if k not in pf.schema_arrow.names]
    if missing:
        yield Record(0, problem="missing_key", detail=f"no column {missing[0]!r} (columns: {pf.schema_arrow.names[:8]})")
        return
    n = 0
    try:
        for batch in pf.iter_batches(columns=keys, batch_size=1024):
            for vals in zip(*(c.to_pylist() for c in batch.columns)):
                if n >= start:
                    bad = next(((k, v) for k, v in zip(keys, vals) if not isinstance(v, str)), None)
                    if bad is None:
                        yield Record(n, text=vals[0] if isinstance(key, str) else tuple(vals))
                    else:
                        yield Record(n, problem="bad_value" if bad[1] is not None else "missing_key",
                                     detail=f"column {bad[0]!r} holds {type(bad[1]).__name__}, expected a string")
                n += 1
    except (pa.ArrowException, OSError) as e:
        yield Record(n, problem="corrupt_file", detail=f"{type(e).__name__}: {e}")


def iter_records(path: str, key: str | tuple[str, ...] = "text", start: int = 0,
                 pos: list | None = None) -> Iterator[Record]:
    """Yield the records of one input file from record number ``start`` on.

    ``key`` names the field holding the text; a tuple of keys yields a tuple of texts per record
    (prompt/completion pairs), which a ``.txt`` file cannot hold.

    ``pos``, if given, is a one-element list whose item, called, gives the bytes of ``path`` consumed so
    far (compressed bytes for compressed inputs), for progress reporting; asked for once a batch, not
    once a record.
    """
    fmt = input_format(path)
    if fmt is None:
        raise DataError(f"{path}: unsupported input format (expected one of {SUPPORTED_SUFFIXES})")
    size = os.path.getsize(path)
    if pos is not None:
        pos[0] = lambda: 0
    if fmt == ".parquet":
        yield from _iter_parquet(path, key, start)
    else:
        with open(path, "rb") as raw:
            if pos is not None:
                pos[0] = raw.tell
            if fmt == ".txt":
                if not isinstance(key, str):
                    raise DataError(f"{path}: a .txt file is one document; prompt/completion pairs need "
                                    f"jsonl or parquet records with keys {list(key)}")
                if start == 0:  # the whole file is one document
                    data = raw.read()
                    try:
                        yield Record(0, text=data.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        yield Record(0, problem="invalid_utf8", detail=str(e))
            else:
                yield from _iter_jsonl(path, raw, key, start)
    if pos is not None:
        pos[0] = lambda: size


def where(path: str, rec: Record) -> str:
    """Human location of a record: ``file:line N`` (jsonl), ``file:row N`` (parquet) or the file."""
    fmt = input_format(path)
    if fmt == ".txt":
        return path
    return f"{path}:{'row' if fmt == '.parquet' else 'line'} {rec.record_no + (fmt != '.parquet')}"

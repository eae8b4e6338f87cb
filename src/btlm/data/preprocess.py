"""The LMData transformation: clean → tokenize (+EOS) → pack into msl+1 windows → ``[n, 3, msl]`` rows.

Functions here run in worker processes (tokenization, shard writing) or in the main process
(packing); they are pure functions of their inputs so the output never depends on timing.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache

# h5py and isal at module level: workers forked from the main process then find them imported
# (imported lazily, each worker paid ~0.1 s per run for them)
import h5py
import numpy as np
from isal import isal_zlib

from btlm.data.readers import DataError

# ---------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class TokenizerSpec:
    """Everything a worker needs to rebuild the tokenizer (picklable)."""

    tokenizer_type: str = "GPT2Tokenizer"
    huggingface_tokenizer: str | None = None
    vocab_file: str | None = None
    encoder_file: str | None = None


class BatchTokenizer:
    """Batched tokenization without special-token handling (a literal ``<|endoftext|>`` is plain text).

    GPT2Tokenizer uses ``tiktoken`` (Rust, identical ids to GPT-2's BPE, ~3.5x faster than the HF fast
    tokenizer); HuggingFaceTokenizer uses ``AutoTokenizer`` (Rust ``tokenizers`` backend).
    """

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.tokenizer_type == "GPT2Tokenizer":
            self._enc = _gpt2_encoding(spec.vocab_file, spec.encoder_file)
            self.eos_id = self._enc.eot_token
            self.pad_id = self.eos_id  # GPT-2 has no pad token: Model Zoo pads with eos
            self.vocab_size = self._enc.n_vocab
        elif spec.tokenizer_type == "HuggingFaceTokenizer":
            if not spec.huggingface_tokenizer:
                raise DataError("tokenizer_type HuggingFaceTokenizer needs --huggingface_tokenizer (a local directory)")
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(spec.huggingface_tokenizer)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot load huggingface_tokenizer {spec.huggingface_tokenizer!r}: {e}") from e
            self.eos_id = self._hf.eos_token_id
            self.pad_id = self._hf.pad_token_id if self._hf.pad_token_id is not None else self.eos_id
            self.vocab_size = len(self._hf)
        else:
            raise DataError(
                f"tokenizer_type {spec.tokenizer_type!r} is not supported (expected GPT2Tokenizer or HuggingFaceTokenizer)"
            )

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no EOS, no BOS) as integer arrays.

        tiktoken's ``encode_to_numpy`` hands back the Rust token buffer as it is, which skips building a
        Python int per token (the list path costs ~10% of the tokenization time again to convert).
        ``disallowed_special=()`` with no allowed specials encodes ``<|endoftext|>`` as ordinary text.
        """
        if self.spec.tokenizer_type == "GPT2Tokenizer":
            enc = self._enc
            return [enc.encode_to_numpy(t, disallowed_special=()) for t in texts]
        # split_special_tokens: a document's literal "<|endoftext|>" must not forge a boundary
        ids = self._hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [np.asarray(i, dtype=np.int32) for i in ids]

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` as one vocabulary entry (spelled as in the tokenizer's vocabulary file:
        GPT-2's byte-level characters, e.g. "Ġ" for a leading space), or None."""
        if self.spec.tokenizer_type != "GPT2Tokenizer":
            return self._hf.get_vocab().get(token)
        table = _data_gym_byte_table()
        if any(ord(c) not in table for c in token):
            return None
        try:
            return self._enc.encode_single_token(bytes(table[ord(c)] for c in token))
        except KeyError:
            return None

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.spec.tokenizer_type == "GPT2Tokenizer":
            return self._enc.decode(ids)
        return self._hf.decode(ids)


@lru_cache(maxsize=4)
def _gpt2_encoding(vocab_file: str | None, encoder_file: str | None):
    """GPT-2's BPE as tiktoken: the shipped files, or the Model Zoo ``--vocab_file``/``--encoder_file`` pair.

    Cached: forked workers inherit the parent's copy.
    """
    import tiktoken

    from btlm.tokenizer import EOS_TOKEN, bpe_files

    shipped = not vocab_file and not encoder_file
    if shipped:
        encoder_file, vocab_file = (str(p) for p in bpe_files())
    elif not (vocab_file and encoder_file):
        raise DataError("GPT2Tokenizer needs both --vocab_file (merges .bpe) and --encoder_file (encoder .json)")
    # the shipped pair is known to be consistent (tests/data compares it with tiktoken's own loader)
    ranks, eos = gpt2_mergeable_ranks(vocab_file, encoder_file, check_merges=not shipped)
    # GPT-2's pre-tokenizer pattern (tiktoken's "gpt2" encoding)
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="gpt2-files", pat_str=pat, mergeable_ranks=ranks, special_tokens={EOS_TOKEN: eos})


def _data_gym_byte_table() -> dict[int, int]:
    """``str.translate`` table from GPT-2's printable stand-in characters back to the raw bytes they encode.

    GPT-2's files spell bytes as characters: printable Latin-1 bytes (not space) as themselves, the
    other 68 bytes, in order, as chr(256), chr(257), ... (``bytes_to_unicode`` in GPT-2's encoder.py).
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    table = {b: b for b in printable}
    table.update({256 + n: b for n, b in enumerate(others)})
    return table


def gpt2_mergeable_ranks(vocab_file: str, encoder_file: str, check_merges: bool = True) -> tuple[dict[bytes, int], int]:
    """tiktoken ranks and the ``<|endoftext|>`` id from GPT-2's ``vocab.bpe`` (merges) and ``encoder.json``.

    Gives the same ranks as ``tiktoken.load.data_gym_to_mergeable_bpe_ranks`` in ~1/10 of its time (it
    decodes every token byte by byte, ~0.7 s, paid on every run): tokens are mapped to bytes with one
    ``str.translate``, and (``check_merges``) the merges are checked against the encoder ids (merge n
    makes token 256+n), the same consistency tiktoken asserts.
    """
    import orjson

    for name, f in (("vocab_file", vocab_file), ("encoder_file", encoder_file)):
        if not os.path.isfile(f):
            raise DataError(f"--{name} {f!r} does not exist")
    bad = f"--vocab_file {vocab_file!r} / --encoder_file {encoder_file!r} are not GPT-2 BPE files"
    try:
        with open(encoder_file, "rb") as f:
            encoder = orjson.loads(f.read())
        eos = encoder.pop("<|endoftext|>")
        encoder.pop("<|startoftext|>", None)
        table = _data_gym_byte_table()
        ranks = {tok.translate(table).encode("latin-1"): rank for tok, rank in encoder.items()}
    except (ValueError, KeyError, UnicodeError, AttributeError) as e:
        raise DataError(f"{bad}: {e}") from e
    singles = [bytes([b]) for b in table.values()]  # rank order: printable bytes, then the others
    if [ranks.get(b) for b in singles] != list(range(256)):
        raise DataError(f"{bad}: the encoder does not start with the 256 single bytes in GPT-2 order")
    if not check_merges:
        return ranks, eos
    try:
        with open(vocab_file, encoding="utf-8") as f:
            merges = [line.split() for line in f.read().split("\n")[1:] if line]  # line 1: "#version"
    except UnicodeError as e:
        raise DataError(f"{bad}: {e}") from e
    if len(ranks) != 256 + len(merges):
        raise DataError(f"{bad}: {len(merges)} merges for {len(ranks)} encoder tokens (expected 256 + merges)")
    for n, pair in enumerate(merges):
        if len(pair) != 2 or encoder.get(pair[0] + pair[1]) != 256 + n:
            raise DataError(f"{bad}: merge {n + 1} {pair} does not match encoder id {256 + n}")
    return ranks, eos


# ---------------------------------------------------------------------------------------------
# text cleaning


def wikitext_detokenize(s: str) -> str:
    """Undo WikiText's tokenization artefacts (the Megatron/Model Zoo ``wikitext_detokenizer``)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


@dataclass
class CleanSpec:
    use_ftfy: bool = False
    ftfy_normalizer: str | None = "NFC"
    wikitext_detokenize: bool = False
    split_text_to_tokenize: bool = False
    chunk_len_to_split: int = 2000


def clean(text: str, spec: CleanSpec) -> str:
    if spec.use_ftfy:
        import ftfy

        text = ftfy.fix_text(text, normalization=spec.ftfy_normalizer)
    if spec.wikitext_detokenize:
        text = wikitext_detokenize(text)
    return text


def split_for_tokenizing(text: str, chunk_len: int) -> list[str]:
    """Cut a long text into pieces of about ``chunk_len`` characters, each cut placed just before a space.

    GPT-2's pre-tokenizer starts words at a space (" word"), so cutting before a space yields the same
    ids as encoding the whole text; a run without spaces longer than ``chunk_len`` is cut hard.
    """
    pieces, start = [], 0
    while len(text) - start > chunk_len:
        cut = text.rfind(" ", start + 1, start + chunk_len)
        cut = cut if cut > start else start + chunk_len
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# ---------------------------------------------------------------------------------------------
# worker side: tokenization

_WORKER: dict = {}


@dataclass
class PairSpec:
    """How prompt/completion pairs become rows (``btlm data Summarization``)."""

    max_seq_length: int
    pad_id: int
    sep_id: int | None = None
    min_sequence_len: int = 10


def init_worker(tok_spec: TokenizerSpec, clean_spec: CleanSpec, eos_id: int, pairs: PairSpec | None = None) -> None:
    """Pool initializer: build the tokenizer once per worker process."""
    _WORKER.update(tok=BatchTokenizer(tok_spec), clean=clean_spec, eos=eos_id, pairs=pairs)


def tokenize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Clean and tokenize documents; return (flat int32 ids with EOS after each document, per-doc lengths).

    Returning one flat array instead of per-document lists keeps the result cheap to pickle back to
    the main process (a single buffer).
    """
    tok, cs, eos = _WORKER["tok"], _WORKER["clean"], _WORKER["eos"]
    if cs.use_ftfy or cs.wikitext_detokenize:
        texts = [clean(t, cs) for t in texts]
    if cs.split_text_to_tokenize:
        pieces = [split_for_tokenizing(t, cs.chunk_len_to_split) for t in texts]
        ids = iter(tok.encode_arrays([p for doc in pieces for p in doc]))
        docs = [[next(ids) for _ in doc] for doc in pieces]
    else:
        docs = [[a] for a in tok.encode_arrays(texts)]
    eos_arr = np.array([eos], dtype=np.int32)
    lengths = np.fromiter((sum(len(a) for a in d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    if not docs:
        return np.empty(0, dtype=np.int32), lengths
    # ids < 2**31, so the cast from tiktoken's uint32 is exact
    flat = np.concatenate([a for d in docs for a in (*d, eos_arr)], dtype=np.int32, casting="unsafe")
    return flat, lengths


def pair_row(prompt: np.ndarray, completion: np.ndarray, eos_id: int, spec: PairSpec):
    """One prompt/completion pair as ``(window, length, loss_start)``, or the reason it is skipped.

    The layout is the Cerebras Model Zoo R2.0.2 ``SummarizationPreprocessor`` (its
    ``create_features_summarization``): tokens ``prompt [sep] completion EOS`` padded to ``msl + 1``;
    inputs are tokens[:-1], labels tokens[1:]; the loss mask is 1 on the positions whose label is a
    completion token or the final EOS, i.e. from the sep position (with a sep token) or the last
    prompt token (without one) up to, not including, the EOS input. A pair of more than ``msl`` tokens
    (EOS and sep counted) is skipped as "too_long", one of fewer than ``min_sequence_len`` as
    "too_short" (the Model Zoo skips both; nothing is truncated). An empty prompt without a sep token
    has no position to predict the first completion token from (the Model Zoo crashes there): skipped
    as "empty_prompt".
    """
    sep = [] if spec.sep_id is None else [spec.sep_id]
    length = len(prompt) + len(sep) + len(completion) + 1
    if length > spec.max_seq_length:
        return "too_long"
    if length < spec.min_sequence_len:
        return "too_short"
    if not sep and not len(prompt):
        return "empty_prompt"
    window = np.full(spec.max_seq_length + 1, spec.pad_id, dtype=np.int32)
    window[:length] = np.concatenate([prompt, sep, completion, [eos_id]]).astype(np.int32)
    return window, length, len(prompt) - (0 if sep else 1)


def tokenize_pairs(pairs: list[tuple[str, str]]):
    """Clean and tokenize prompt/completion pairs into rows (see :func:`pair_row`).

    Returns ``(windows [n, msl+1], lengths [n], loss_starts [n], skipped {reason: count}, tokens)``.
    """
    tok, cs, eos, spec = _WORKER["tok"], _WORKER["clean"], _WORKER["eos"], _WORKER["pairs"]
    texts = [t for pair in pairs for t in pair]
    if cs.use_ftfy or cs.wikitext_detokenize:
        texts = [clean(t, cs) for t in texts]
    ids = tok.encode_arrays(texts)
    rows, skipped, tokens = [], {}, 0
    for i in range(0, len(ids), 2):
        out = pair_row(ids[i], ids[i + 1], eos, spec)
        if isinstance(out, str):
            skipped[out] = skipped.get(out, 0) + 1
        else:
            rows.append(out)
            tokens += out[1]
    msl = spec.max_seq_length
    windows = np.stack([r[0] for r in rows]) if rows else np.empty((0, msl + 1), dtype=np.int32)
    lengths = np.array([r[1] for r in rows], dtype=np.int32)
    starts = np.array([r[2] for r in rows], dtype=np.int32)
    return windows, lengths, starts, skipped, tokens


# ---------------------------------------------------------------------------------------------
# main-process side: packing


class Packer:
    """Cut the token stream into windows of ``msl+1`` tokens with stride ``msl`` (labels = next token).

    Packing (``pack_sequences=True``) treats the whole corpus as one stream, so no token is lost at file
    or worker boundaries (the Model Zoo dropped each worker's last partial window); the stream's final
    partial window becomes one padded row. Without packing each document is cut on its own and its
    last window padded. ``short_seq_prob`` shortens a window to a random length in [2, msl-1] like
    the Model Zoo, but the cut-off tokens start the next window instead of being thrown away.

    The state (leftover tokens, rng, rows emitted) is small and JSON-able: :meth:`state` /
    :meth:`from_state` are what resume checkpoints store.
    """

    def __init__(self, msl: int, pad_id: int, pack: bool = True, short_seq_prob: float = 0.0,
                 min_sequence_len: int = 6, seed: int = 0):
        self.msl, self.pad_id, self.pack = msl, pad_id, pack
        self.short_seq_prob, self.min_len = short_seq_prob, min_sequence_len
        self.rng = random.Random(seed)
        self.buf = np.empty(0, dtype=np.int32)
        self.rows_emitted = 0
        self.dropped_tokens = 0
        self.short_documents = 0

    # --- resume state
    def state(self) -> dict:
        v, internal, g = self.rng.getstate()
        return {"buf": self.buf.tolist(), "rng": [v, list(internal), g], "rows_emitted": self.rows_emitted,
                "dropped_tokens": self.dropped_tokens, "short_documents": self.short_documents}

    def load_state(self, st: dict) -> None:
        self.buf = np.asarray(st["buf"], dtype=np.int32)
        v, internal, g = st["rng"]
        self.rng.setstate((v, tuple(internal), g))
        self.rows_emitted, self.dropped_tokens = st["rows_emitted"], st["dropped_tokens"]
        self.short_documents = st["short_documents"]

    # --- packing
    def _window_bounds(self, n: int, final: bool, shared_first: bool = False) -> tuple[list[tuple[int, int]], int]:
        """(start, length) of each window over a stream of n tokens, and where the unconsumed tail starts."""
        msl, out, pos = self.msl, [], 0
        if self.short_seq_prob == 0.0:
            k = (n - 1) // msl if n > msl else 0
            out = [(i * msl, msl + 1) for i in range(k)]
            pos = k * msl
        else:
            while n - pos >= msl + 1:
                length = msl + 1
                if self.rng.random() < self.short_seq_prob:
                    length = self.rng.randint(2, msl - 1)
                out.append((pos, length))
                pos += length - 1  # the window's last token starts the next window: nothing is lost
        if final:
            tail = n - pos
            if tail >= 2 and tail >= self.min_len:
                out.append((pos, tail))
            elif tail > 0:
                # the tail's first token already served as the previous window's last label
                self.dropped_tokens += tail - (1 if (pos > 0 or shared_first) else 0)
                if not out and not self.pack:
                    self.short_documents += 1
            pos = n
        return out, pos

    def _rows(self, stream: np.ndarray, bounds: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.full((len(bounds), self.msl + 1), self.pad_id, dtype=np.int32)
        lengths = np.empty(len(bounds), dtype=np.int32)
        full = [i for i, (_, L) in enumerate(bounds) if L == self.msl + 1]
        if len(full) == len(bounds) and bounds and self.short_seq_prob == 0.0:
            view = np.lib.stride_tricks.sliding_window_view(stream, self.msl + 1)
            rows[:] = view[bounds[0][0]: bounds[-1][0] + 1: self.msl]
            lengths[:] = self.msl + 1
        else:
            for i, (s, L) in enumerate(bounds):
                rows[i, :L] = stream[s: s + L]
                lengths[i] = L
        self.rows_emitted += len(bounds)
        return rows, lengths

    def add(self, flat: np.ndarray, doc_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed the tokens of a batch of documents; return the completed windows and their lengths."""
        if self.pack:
            stream = np.concatenate([self.buf, flat]) if len(self.buf) else flat
            bounds, pos = self._window_bounds(len(stream), final=False)
            out = self._rows(stream, bounds)
            self.buf = stream[pos:].copy()
            return out
        parts, start = [], 0
        for L in doc_lengths:
            doc = flat[start: start + int(L)]
            start += int(L)
            bounds, _ = self._window_bounds(len(doc), final=True)
            if bounds:
                parts.append(self._rows(doc, bounds))
        return _concat_rows(parts, self.msl)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """End of input: the stream's last partial window (packing mode) as a padded row."""
        if not self.pack or not len(self.buf):
            return _concat_rows([], self.msl)
        stream, self.buf = self.buf, np.empty(0, dtype=np.int32)
        bounds, _ = self._window_bounds(len(stream), final=True, shared_first=self.rows_emitted > 0)
        return self._rows(stream, bounds) if bounds else _concat_rows([], self.msl)


def _concat_rows(parts, msl):
    if not parts:
        return np.empty((0, msl + 1), dtype=np.int32), np.empty(0, dtype=np.int32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# shard writing (worker side)


def rows_to_features(windows: np.ndarray, lengths: np.ndarray, pad_id: int, inverted_mask: bool = False,
                     loss_starts: np.ndarray | None = None) -> np.ndarray:
    """Windows ``[n, msl+1]`` → Model Zoo rows ``[n, 3, msl]`` = input_ids, attention_mask (loss mask), labels.

    The loss mask of row i is 1 on positions ``[loss_starts[i], lengths[i] - 1)`` (``loss_starts``
    None: from 0, every real token; prompt/completion rows start it at the completion).

    Rows are copied whole and only the (few) short rows are padded afterwards: a masked ``np.where``
    over every token cost more than the HDF5 write itself.
    """
    n, msl = windows.shape[0], windows.shape[1] - 1
    data = np.empty((n, 3, msl), dtype=np.int32)
    data[:, 0] = windows[:, :-1]
    data[:, 1] = 1
    data[:, 2] = windows[:, 1:]
    for i in np.flatnonzero(lengths < msl + 1):
        k = int(lengths[i]) - 1  # tokens with a label
        data[i, 0, k:] = pad_id
        data[i, 1, k:] = 0
        data[i, 2, k:] = pad_id
    if loss_starts is not None:
        for i in np.flatnonzero(loss_starts):
            data[i, 1, : int(loss_starts[i])] = 0
    if inverted_mask:
        data[:, 1] ^= 1
    return data


# ISA-L level 2 gives about zlib level 4's ratio (h5py's gzip default, what the Model Zoo wrote) at ~6x
# the speed; the chunks are plain zlib streams, read back by any HDF5 gzip (deflate) filter.
ISAL_LEVEL = 2


def _write_rows(f, data: np.ndarray, compression: str | None) -> None:
    """Create dataset ``data`` (chunks of one row, like the Model Zoo) in the open h5py file ``f``."""
    n, msl = data.shape[0], data.shape[2]
    if compression != "gzip" or n == 0:
        f.create_dataset("data", data=data, dtype="i4", chunks=(1, 3, msl),
                         compression=None if compression in (None, "none") else compression)
        return
    # Compress each row-chunk ourselves and store it as is: HDF5's own deflate (zlib) was a third of
    # the whole run. The filter pipeline still says gzip, so readers decompress it the usual way.
    ds = f.create_dataset("data", shape=data.shape, dtype="i4", chunks=(1, 3, msl), compression="gzip")
    for i in range(n):
        ds.id.write_direct_chunk((i, 0, 0), isal_zlib.compress(data[i], ISAL_LEVEL))


def _count_valid(inputs: np.ndarray, value: int, n_padded: int, pad_id: int) -> int:
    """How often ``value`` occurs among the real (unpadded) inputs."""
    c = int(np.count_nonzero(inputs == value))
    return c - n_padded if value == pad_id else c


def write_shard(path: str, windows: np.ndarray, lengths: np.ndarray, pad_id: int, eos_id: int,
                compression: str | None, inverted_mask: bool = False, loss_starts: np.ndarray | None = None) -> dict:
    """Write one ``.h5`` shard atomically (temp name, then rename) and return its row statistics."""
    data = rows_to_features(windows, lengths, pad_id, inverted_mask, loss_starts)
    n, msl = data.shape[0], data.shape[2]
    from btlm.io import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        _write_rows(f, data, compression)
        f.attrs["n_examples"] = n
    # statistics from the lengths: padded positions hold pad_id in input_ids
    real = int((lengths.astype(np.int64) - 1).sum())  # positions holding a real input and label
    n_padded = n * msl - real
    loss_valid = real - (int(loss_starts.astype(np.int64).sum()) if loss_starts is not None else 0)
    eos_tokens = _count_valid(data[:, 0], eos_id, n_padded, pad_id)
    pad_tokens = _count_valid(data[:, 0], pad_id, n_padded, pad_id) if pad_id != eos_id else 0
    return {
        "num_sequences": n,
        "num_tokens": n * msl,
        "loss_valid_tokens": loss_valid,
        "non_pad_tokens": real - eos_tokens - pad_tokens,
        "eos_tokens": eos_tokens,
    }

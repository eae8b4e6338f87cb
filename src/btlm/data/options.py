"""The settings of ``btlm data LMData`` and ``btlm data Summarization`` (the Model Zoo
``create_hdf5_dataset.py`` flags and YAML keys), their defaults, and the merge and checks of a configuration.
Light to import: no numpy, h5py or torch.
"""

from __future__ import annotations

import os

from btlm.data.readers import DataError

def str2bool(v) -> bool:
    """Model Zoo passes booleans as the strings True/False."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {v!r}")


def _optional_str(v):
    return None if v is None or str(v) == "None" else str(v)


def _optional_int(v):
    return None if v is None or str(v) == "None" else int(v)


# name -> (section, type, default, help). Section is where data_params.json / the YAML puts the key.
OPTIONS: dict[str, tuple[str, object, object, str]] = {
    "input_dir": ("setup", _optional_str, None, "directory searched recursively for .txt/.jsonl/.jsonl.zst/.jsonl.gz/.parquet"),
    "metadata_files": ("setup", _optional_str, None, "comma-separated list files, one input path a line (order kept; overrides --input_dir)"),
    "output_dir": ("setup", str, "./data_dir/", "where the .h5 shards, data_params.json and checkpoint.json go"),
    "processes": ("setup", int, 0, "worker processes for tokenization and shard writing (0 = all CPUs)"),
    "tokenizer_type": ("processing", str, "GPT2Tokenizer", "GPT2Tokenizer (offline GPT-2 BPE) or HuggingFaceTokenizer"),
    "huggingface_tokenizer": ("processing", _optional_str, None, "local tokenizer directory for HuggingFaceTokenizer"),
    "vocab_file": ("processing", _optional_str, None, "GPT-2 merges file (gpt2-vocab.bpe); default: the shipped GPT-2 BPE"),
    "encoder_file": ("processing", _optional_str, None, "GPT-2 encoder file (gpt2-encoder.json)"),
    "eos_id": ("processing", _optional_int, None, "end-of-document id appended to every document (sets pad too)"),
    "pad_id": ("processing", _optional_int, None, "padding id (default: the eos id)"),
    "max_seq_length": ("processing", int, 2048, "sequence length msl of every row"),
    "short_seq_prob": ("processing", float, 0.0, "probability that a row is shortened to a random length in [2, msl-1]"),
    "output_name": ("processing", str, "examples", "shard name prefix: <output_name>_<index>.h5"),
    "files_per_record": ("processing", int, 50000, "sequences (rows) per .h5 shard"),
    "write_remainder": ("processing", str2bool, True, "write the last, partly filled shard"),
    "resume_from_checkpoint": ("processing", str2bool, False, "continue a killed run in --output_dir"),
    "display_pbar": ("processing", str2bool, None, "show a progress bar (bytes, documents/s, tokens/s, ETA)"),
    "seed": ("processing", int, 0, "seed for short_seq_prob"),
    "strict": ("processing", str2bool, False, "stop at the first bad record instead of counting it"),
    "compression": ("processing", str, "gzip", "HDF5 compression of the shards: gzip (Model Zoo), lzf or none"),
    "use_ftfy": ("dataset", str2bool, False, "fix mojibake with ftfy before tokenizing"),
    "ftfy_normalizer": ("dataset", _optional_str, "NFC", "unicode normalization for ftfy: NFC or None"),
    "wikitext_detokenize": ("dataset", str2bool, False, "undo WikiText tokenization artefacts"),
    "jsonl_key": ("dataset", str, "text", "JSON key (or parquet column) holding the document text"),
    "pack_sequences": ("dataset", str2bool, True, "pack documents into one stream (False: each document padded on its own)"),
    "min_sequence_len": ("dataset", int, 6, "rows with fewer tokens are dropped (counted)"),
    "split_text_to_tokenize": ("dataset", str2bool, False, "tokenize long documents in pieces (bounds tokenizer memory)"),
    "chunk_len_to_split": ("dataset", int, 2000, "piece length in characters for split_text_to_tokenize"),
    "inverted_mask": ("dataset", str2bool, False, "store 1 - mask (Model Zoo option)"),
}
# ``btlm data Summarization``: prompt/completion pairs, one row each (Model Zoo's SummarizationPreprocessor).
SUMMARIZATION_OPTIONS: dict[str, tuple[str, object, object, str]] = {
    "prompt_key": ("dataset", _optional_str, None, "JSON key (or parquet column) holding the prompt"),
    "completion_key": ("dataset", _optional_str, None, "JSON key (or parquet column) holding the completion"),
    "sep_token": ("dataset", _optional_str, None, "token put between prompt and completion; one the tokenizer "
                  "lacks gets the next id past its vocabulary, as in the Model Zoo (a pretrained model then "
                  "needs a larger embedding)"),
}
# LMData settings that mean nothing for pairs (each pair is one row, never packed, split or shortened).
NOT_FOR_SUMMARIZATION = ("short_seq_prob", "pack_sequences", "jsonl_key", "split_text_to_tokenize",
                         "chunk_len_to_split")
PROCESSORS = {"LMData": "LMDataPreprocessor", "Summarization": "SummarizationPreprocessor"}


def options_for(mode: str = "LMData") -> dict[str, tuple[str, object, object, str]]:
    """The settings of ``btlm data MODE`` (name -> (section, type, default, help))."""
    if mode == "LMData":
        return OPTIONS
    opts = {k: v for k, v in OPTIONS.items() if k not in NOT_FOR_SUMMARIZATION}
    sec, typ, _, help_ = opts["min_sequence_len"]
    opts["min_sequence_len"] = (sec, typ, 10, "pairs with fewer tokens (sep and EOS counted) are skipped (counted)")
    return {**opts, **SUMMARIZATION_OPTIONS}


# YAML keys of Model Zoo configs that are accepted with the only value this implementation supports
# (dataset_processor: the one of the mode run).
YAML_ONLY = {"dataset_processor": tuple(PROCESSORS.values()), "write_in_batch": (True, False),
             "input_ids_dtype": ("int32",), "input_mask_dtype": ("int32",), "remove_bos_in_chunks": (True, False)}
# Settings that do not change the shards (may differ between a killed run and its resume).
NOT_IN_FINGERPRINT = {"processes", "display_pbar", "resume_from_checkpoint", "strict"}


def load_config(params: str | None = None, overrides: dict | None = None, mode: str = "LMData") -> dict:
    """Merge defaults < YAML ``params`` < ``overrides`` (command-line values; None = not given),
    validating every value. ``mode``: LMData or Summarization."""
    opts = options_for(mode)
    cfg = {k: v[2] for k, v in opts.items()}
    if params:
        cfg.update(_yaml_options(params, opts, PROCESSORS[mode]))
    cfg.update({k: v for k, v in (overrides or {}).items() if k in opts and v is not None})
    if mode != "LMData":
        cfg["dataset_processor"] = PROCESSORS[mode]
    _validate(cfg)
    return cfg


def _yaml_options(path: str, opts: dict = OPTIONS, processor: str = "LMDataPreprocessor") -> dict:
    import yaml

    if not os.path.isfile(path):
        raise DataError(f"--params {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with setup / processing / dataset sections")
    out = {}
    for section, values in doc.items():
        if section not in ("setup", "processing", "dataset") or not isinstance(values, dict):
            raise DataError(f"{path}: unknown section {section!r} (expected setup, processing, dataset mappings)")
        for k, v in values.items():
            allowed = (processor,) if k == "dataset_processor" else YAML_ONLY.get(k)
            if allowed:
                if v not in allowed:
                    raise DataError(f"{path}: {section}.{k} = {v!r} is not supported here (expected one of {allowed})")
                continue
            if k not in opts:
                raise DataError(f"{path}: unknown key {section}.{k}")
            try:
                out[k] = None if v is None else opts[k][1](v)
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}: {section}.{k} = {v!r}: {e}") from e
    return out


def _validate(cfg: dict) -> None:
    def bad(key, expected):
        raise DataError(f"{key} = {cfg[key]!r}: expected {expected}")

    if cfg.get("dataset_processor") == PROCESSORS["Summarization"]:
        for key in ("prompt_key", "completion_key"):
            if not cfg[key]:
                raise DataError(f"Summarization needs --{key} (the JSON key of the {key.split('_')[0]})")
    if cfg["max_seq_length"] < 2:
        bad("max_seq_length", "an integer >= 2")
    if cfg["files_per_record"] < 1:
        bad("files_per_record", "an integer >= 1")
    if not 0.0 <= cfg.get("short_seq_prob", 0.0) <= 1.0:
        bad("short_seq_prob", "a probability in [0, 1]")
    if cfg.get("short_seq_prob", 0) > 0 and cfg["max_seq_length"] < 4:
        bad("max_seq_length", "at least 4 when short_seq_prob > 0")
    if cfg["processes"] < 0:
        bad("processes", "0 (all CPUs) or a positive count")
    if cfg["compression"] not in ("gzip", "lzf", "none"):
        bad("compression", "gzip, lzf or none")
    if cfg["ftfy_normalizer"] not in ("NFC", "NFKC", None):
        bad("ftfy_normalizer", "NFC, NFKC or None")
    if cfg.get("chunk_len_to_split", 1) < 1:
        bad("chunk_len_to_split", "a positive number of characters")
    if cfg["tokenizer_type"] not in ("GPT2Tokenizer", "HuggingFaceTokenizer"):
        bad("tokenizer_type", "GPT2Tokenizer or HuggingFaceTokenizer (NeoXTokenizer: use HuggingFaceTokenizer)")

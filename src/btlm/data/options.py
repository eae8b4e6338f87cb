"""The settings of ``btlm data LMData`` and ``btlm data Summarization`` (the Model Zoo
``create_hdf5_dataset.py`` flags and YAML keys), declared once as typed configs: the dataclasses
:class:`LMDataConfig` and :class:`SummarizationConfig`. The command-line flags, the ``--params`` YAML keys,
the sections of ``data_params.json`` and the checks all come from them.

Values are checked by pydantic (a model built from the dataclass's fields, with the constraints its
settings declare) when a config is made from flags, YAML or a mapping. pydantic is imported only then:
building the command-line parser from the plain declaration keeps ``btlm data --help`` and the start-up of
``btlm data`` fast. Light to import: no pydantic, numpy, h5py or torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

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


def setting(section: str, default, help: str, expected: str | None = None, **checks):
    """A setting: its default, the Model Zoo section it belongs to (``setup`` / ``processing`` /
    ``dataset``), its help text and, for a checked value, the pydantic constraints (``ge``, ``le``) and
    what the error says is expected."""
    return dataclasses.field(default=default, metadata={"section": section, "help": help, "expected": expected,
                                                          "checks": checks})


@dataclass
class _ShardConfig:
    """The settings both modes share: inputs, tokenizer, row length, shards and text cleaning."""

    input_dir: Optional[str] = setting(
        "setup", None, "directory searched recursively for .txt/.jsonl/.jsonl.zst/.jsonl.gz/.parquet")
    metadata_files: Optional[str] = setting(
        "setup", None, "comma-separated list files, one input path a line (order kept; overrides --input_dir)")
    output_dir: str = setting("setup", "./data_dir/", "where the .h5 shards, data_params.json and checkpoint.json go")
    processes: int = setting("setup", 0, "worker processes for tokenization and shard writing (0 = all CPUs)",
                             "0 (all CPUs) or a positive count", ge=0)
    tokenizer_type: Literal["GPT2Tokenizer", "HuggingFaceTokenizer"] = setting(
        "processing", "GPT2Tokenizer", "GPT2Tokenizer (offline GPT-2 BPE) or HuggingFaceTokenizer",
        "GPT2Tokenizer or HuggingFaceTokenizer (NeoXTokenizer: use HuggingFaceTokenizer)")
    huggingface_tokenizer: Optional[str] = setting(
        "processing", None, "local tokenizer directory for HuggingFaceTokenizer")
    vocab_file: Optional[str] = setting(
        "processing", None, "GPT-2 merges file (gpt2-vocab.bpe); default: the shipped GPT-2 BPE")
    encoder_file: Optional[str] = setting("processing", None, "GPT-2 encoder file (gpt2-encoder.json)")
    eos_id: Optional[int] = setting("processing", None, "end-of-document id appended to every document (sets pad too)")
    pad_id: Optional[int] = setting("processing", None, "padding id (default: the eos id)")
    max_seq_length: int = setting("processing", 2048, "sequence length msl of every row", "an integer >= 2", ge=2)
    output_name: str = setting("processing", "examples", "shard name prefix: <output_name>_<index>.h5")
    files_per_record: int = setting("processing", 50000, "sequences (rows) per .h5 shard", "an integer >= 1", ge=1)
    write_remainder: bool = setting("processing", True, "write the last, partly filled shard")
    resume_from_checkpoint: bool = setting("processing", False, "continue a killed run in --output_dir")
    display_pbar: Optional[bool] = setting(
        "processing", None, "show a progress bar (bytes, documents/s, tokens/s, ETA)")
    seed: int = setting("processing", 0, "seed for short_seq_prob")
    strict: bool = setting("processing", False, "stop at the first bad record instead of counting it")
    compression: Literal["gzip", "lzf", "none"] = setting(
        "processing", "gzip", "HDF5 compression of the shards: gzip (Model Zoo), lzf or none", "gzip, lzf or none")
    use_ftfy: bool = setting("dataset", False, "fix mojibake with ftfy before tokenizing")
    ftfy_normalizer: Optional[Literal["NFC", "NFKC"]] = setting(
        "dataset", "NFC", "unicode normalization for ftfy: NFC or None", "NFC, NFKC or None")
    wikitext_detokenize: bool = setting("dataset", False, "undo WikiText tokenization artefacts")
    min_sequence_len: int = setting("dataset", 6, "rows with fewer tokens are dropped (counted)")
    inverted_mask: bool = setting("dataset", False, "store 1 - mask (Model Zoo option)")

    def problem(self) -> tuple[str | None, str] | None:
        """A check across settings: (the setting to name, what is expected), or None."""
        return None


@dataclass
class LMDataConfig(_ShardConfig):
    """``btlm data LMData``: documents packed into one token stream cut into rows of ``max_seq_length``."""

    short_seq_prob: float = setting(
        "processing", 0.0, "probability that a row is shortened to a random length in [2, msl-1]",
        "a probability in [0, 1]", ge=0.0, le=1.0)
    jsonl_key: str = setting("dataset", "text", "JSON key (or parquet column) holding the document text")
    pack_sequences: bool = setting(
        "dataset", True, "pack documents into one stream (False: each document padded on its own)")
    split_text_to_tokenize: bool = setting(
        "dataset", False, "tokenize long documents in pieces (bounds tokenizer memory)")
    chunk_len_to_split: int = setting("dataset", 2000, "piece length in characters for split_text_to_tokenize",
                                      "a positive number of characters", ge=1)

    def problem(self):
        if self.short_seq_prob > 0 and self.max_seq_length < 4:
            return "max_seq_length", "expected at least 4 when short_seq_prob > 0"
        return None


@dataclass
class SummarizationConfig(_ShardConfig):
    """``btlm data Summarization``: prompt/completion pairs, one row each (Model Zoo's
    SummarizationPreprocessor); the LMData settings for packing, splitting and shortening do not apply."""

    dataset_processor: Literal["SummarizationPreprocessor"] = setting("setup", "SummarizationPreprocessor", "")
    min_sequence_len: int = setting("dataset", 10, "pairs with fewer tokens (sep and EOS counted) are skipped (counted)")
    prompt_key: Optional[str] = setting("dataset", None, "JSON key (or parquet column) holding the prompt")
    completion_key: Optional[str] = setting("dataset", None, "JSON key (or parquet column) holding the completion")
    sep_token: Optional[str] = setting(
        "dataset", None, "token put between prompt and completion; one the tokenizer lacks gets the next id past "
        "its vocabulary, as in the Model Zoo (a pretrained model then needs a larger embedding)")

    def problem(self):
        for key in ("prompt_key", "completion_key"):
            if not getattr(self, key):
                return None, f"Summarization needs --{key} (the JSON key of the {key.split('_')[0]})"
        return None


DataConfig = typing.Union[LMDataConfig, SummarizationConfig]
CONFIGS: dict[str, type[_ShardConfig]] = {"LMData": LMDataConfig, "Summarization": SummarizationConfig}
PROCESSORS = {"LMData": "LMDataPreprocessor", "Summarization": "SummarizationPreprocessor"}
# YAML keys of Model Zoo configs that are accepted with the only value this implementation supports
# (dataset_processor: the one of the mode run).
YAML_ONLY = {"dataset_processor": tuple(PROCESSORS.values()), "write_in_batch": (True, False),
             "input_ids_dtype": ("int32",), "input_mask_dtype": ("int32",), "remove_bos_in_chunks": (True, False)}
# Settings that do not change the shards (may differ between a killed run and its resume).
NOT_IN_FINGERPRINT = {"processes", "display_pbar", "resume_from_checkpoint", "strict"}


class Setting(NamedTuple):
    """How a setting appears as a flag and a YAML key. ``type`` converts a command-line string (argparse
    refuses what it cannot convert); the config checks the value."""

    section: str
    type: object
    default: object
    help: str


def _optional_int(v):
    return None if v == "None" else int(v)


_CLI_TYPES = {bool: str2bool, Optional[bool]: str2bool, int: int, Optional[int]: _optional_int, float: float}


@functools.cache
def _types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def options_for(mode: str = "LMData") -> dict[str, Setting]:
    """The flags / YAML keys of ``btlm data MODE``, from its config class (name -> :class:`Setting`)."""
    cls = CONFIGS[mode]
    return {f.name: Setting(f.metadata["section"], _CLI_TYPES.get(_types(cls)[f.name], str), f.default,
                            f.metadata["help"])
            for f in dataclasses.fields(cls) if f.name != "dataset_processor"}  # the mode's, never a flag


OPTIONS = options_for("LMData")


def mode_of(cfg: _ShardConfig | dict) -> str:
    if isinstance(cfg, dict):
        return "Summarization" if cfg.get("dataset_processor") == PROCESSORS["Summarization"] else "LMData"
    return "Summarization" if isinstance(cfg, SummarizationConfig) else "LMData"


def load_config(params: str | None = None, overrides: dict | None = None, mode: str = "LMData") -> DataConfig:
    """The config of ``btlm data MODE``: defaults < YAML ``params`` < ``overrides`` (command-line values;
    None = not given). A bad value raises one :class:`DataError` naming the flag or the YAML key."""
    cls = CONFIGS[mode]
    names = {f.name for f in dataclasses.fields(cls)}
    values, origin = {}, {}
    if params:
        for section, key, value in _yaml_settings(params, names, PROCESSORS[mode]):
            values[key], origin[key] = value, f"{params}: {section}.{key}"
    for key, value in (overrides or {}).items():
        if key in names and value is not None:
            values[key], origin[key] = value, f"--{key}"
    return validate_config(values, mode, origin)


def validate_config(values: _ShardConfig | dict, mode: str | None = None, origin: dict | None = None) -> DataConfig:
    """``values`` (a config, or a mapping of settings) checked as the config of ``mode`` (default: the mode
    its ``dataset_processor`` names). ``origin``: where each value came from (a flag, a YAML key), for the
    one-line :class:`DataError` a bad value raises."""
    from pydantic import ValidationError

    if isinstance(values, _ShardConfig):
        values, mode = dataclasses.asdict(values), mode_of(values)
    cls = CONFIGS[mode or mode_of(values)]
    origin = origin or {}
    try:
        cfg = cls(**dict(_checker(cls).model_validate(values)))
    except ValidationError as e:
        raise DataError(_one_line(e.errors()[0], values, origin, cls)) from None
    problem = cfg.problem()
    if problem:
        key, expected = problem
        if key is None:
            raise DataError(expected)
        raise DataError(f"{origin.get(key, key)} = {getattr(cfg, key)!r}: {expected}")
    return cfg


@functools.cache
def _checker(cls):
    """The pydantic model that checks the settings of ``cls``: each field's type and declared constraints;
    booleans spelled as the Model Zoo does (True/False strings), and the word None for an optional value."""
    from pydantic import BeforeValidator, ConfigDict, Field, create_model

    def bool_or_none(v):
        return v if v is None else str2bool(v)

    def none_word(v):  # Model Zoo YAML files write a missing value as None (a string to YAML)
        return None if isinstance(v, str) and v == "None" else v

    fields = {}
    for f in dataclasses.fields(cls):
        typ = _types(cls)[f.name]
        if typ in (bool, Optional[bool]):
            typ = typing.Annotated[typ, BeforeValidator(bool_or_none)]
        elif type(None) in typing.get_args(typ):
            typ = typing.Annotated[typ, BeforeValidator(none_word)]
        fields[f.name] = (typ, Field(f.default, **f.metadata["checks"]))
    # coerce_numbers_to_str: a YAML ``output_name: 2024`` is the name "2024", as in the Model Zoo
    return create_model(cls.__name__, __config__=ConfigDict(extra="forbid", coerce_numbers_to_str=True), **fields)


def _one_line(err: dict, values: dict, origin: dict, cls) -> str:
    key = err["loc"][0] if err["loc"] else None
    where = origin.get(key, key)
    if err["type"] == "extra_forbidden":
        return f"unknown setting {where!r} for {cls.__name__}"
    expected = next((f.metadata["expected"] for f in dataclasses.fields(cls) if f.name == key), None)
    if expected is None:
        msg = err["msg"].removeprefix("Value error, ")
        expected = msg[0].lower() + msg[1:]
    else:
        expected = f"expected {expected}"
    return f"{where} = {values.get(key, err.get('input'))!r}: {expected}"


def _yaml_settings(path: str, names: set[str], processor: str):
    """(section, key, value) of every setting in a Model Zoo ``--params`` YAML (setup / processing / dataset)."""
    import yaml

    if not os.path.isfile(path):
        raise DataError(f"--params {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with setup / processing / dataset sections")
    for section, values in doc.items():
        if section not in ("setup", "processing", "dataset") or not isinstance(values, dict):
            raise DataError(f"{path}: unknown section {section!r} (expected setup, processing, dataset mappings)")
        for k, v in values.items():
            allowed = (processor,) if k == "dataset_processor" else YAML_ONLY.get(k)
            if allowed:
                if v not in allowed:
                    raise DataError(f"{path}: {section}.{k} = {v!r} is not supported here (expected one of {allowed})")
                continue
            if k not in names:
                raise DataError(f"{path}: unknown key {section}.{k}")
            yield section, k, v

"""The typed configs of ``btlm data LMData`` / ``Summarization``: flags and ``--params`` YAML map onto one
declaration, bad values give one error naming the flag or YAML key, and pydantic is imported only to check."""

import dataclasses
import subprocess
import sys

import pytest

from btlm.cli import build_parser
from btlm.data import DataError
from btlm.data.options import LMDataConfig, SummarizationConfig, load_config, options_for


def _flags(mode: str) -> set[str]:
    sub = build_parser("data")._subparsers._group_actions[0].choices[mode]
    return {a.dest for a in sub._actions if a.option_strings and a.dest not in ("help", "params", "progress")}


@pytest.mark.parametrize("mode, cls", [("LMData", LMDataConfig), ("Summarization", SummarizationConfig)])
def test_every_flag_is_a_field_of_the_config(mode, cls):
    fields = {f.name for f in dataclasses.fields(cls)} - {"dataset_processor"}
    assert _flags(mode) | {"display_pbar"} == fields == set(options_for(mode))


def test_yaml_and_flags_map_onto_lmdataconfig(tmp_path):
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text("setup:\n  processes: 2\nprocessing:\n  max_seq_length: 128\n  eos_id: None\n"
                         "  write_remainder: 'False'\ndataset:\n  use_ftfy: True\n  ftfy_normalizer: None\n")
    cfg = load_config(str(yaml_path), {"max_seq_length": 64, "output_dir": "out", "seed": None})
    assert isinstance(cfg, LMDataConfig)
    assert (cfg.processes, cfg.max_seq_length, cfg.output_dir, cfg.eos_id) == (2, 64, "out", None)
    assert cfg.write_remainder is False and cfg.use_ftfy is True and cfg.ftfy_normalizer is None
    assert cfg.seed == 0 and cfg.jsonl_key == "text"  # defaults where neither says


def test_summarization_extends_the_shared_settings():
    cfg = load_config(None, {"prompt_key": "q", "completion_key": "a"}, "Summarization")
    assert isinstance(cfg, SummarizationConfig) and cfg.min_sequence_len == 10
    assert not hasattr(cfg, "pack_sequences") and not hasattr(cfg, "short_seq_prob")


@pytest.mark.parametrize("overrides, yaml, message", [
    ({"max_seq_length": 1}, None, "--max_seq_length = 1: expected an integer >= 2"),
    ({"short_seq_prob": 1.5}, None, "--short_seq_prob = 1.5: expected a probability in [0, 1]"),
    ({"short_seq_prob": 0.5, "max_seq_length": 3}, None,
     "--max_seq_length = 3: expected at least 4 when short_seq_prob > 0"),
    ({"compression": "zip"}, None, "--compression = 'zip': expected gzip, lzf or none"),
    ({}, "processing:\n  files_per_record: 0\n", "p.yaml: processing.files_per_record = 0: expected an integer >= 1"),
    ({}, "dataset:\n  use_ftfy: maybe\n", "p.yaml: dataset.use_ftfy = 'maybe': expected True or False"),
    ({}, "processing:\n  tokenizer_type: NeoXTokenizer\n",
     "p.yaml: processing.tokenizer_type = 'NeoXTokenizer': expected GPT2Tokenizer or HuggingFaceTokenizer"),
])
def test_a_bad_value_names_its_flag_or_yaml_key(tmp_path, overrides, yaml, message):
    params = None
    if yaml:
        params = str(tmp_path / "p.yaml")
        (tmp_path / "p.yaml").write_text(yaml)
    with pytest.raises(DataError) as e:
        load_config(params, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_flag_given_overrides_the_yaml_key_it_fixes(tmp_path):
    (tmp_path / "p.yaml").write_text("processing:\n  max_seq_length: 1\n")
    assert load_config(str(tmp_path / "p.yaml"), {"max_seq_length": 8}).max_seq_length == 8


def test_data_help_does_not_import_pydantic():
    code = ("import sys\nfrom btlm.cli import main\n"
            "try:\n    main(['data', 'LMData', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('pydantic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"

"""Params YAML schema: the shipped configs load unchanged; bad values stop with an error naming the key."""

from __future__ import annotations

import copy
import logging

import pytest
import yaml

from btlm.train.config import ConfigError, load_params, parse_params, report_extra_keys

from .conftest import CONFIGS, TINY


def _load_2k():
    return yaml.safe_load((CONFIGS / "params_btlm_2p7b_2k.yaml").read_text())


@pytest.mark.parametrize("name", ["params_btlm_2p7b_2k.yaml", "params_btlm_2p7b_8k.yaml",
                                  "params_btlm_tiny_cpu.yaml", "params_btlm_100m.yaml"])
def test_shipped_configs_validate(name):
    params, raw = load_params(CONFIGS / name)
    assert params.model.hidden_size == raw["model"]["hidden_size"]
    assert params.optimizer.schedule()(0) == 0.0 or name.startswith("params_btlm_tiny")


def test_published_values_2k_and_8k():
    p2, _ = load_params(CONFIGS / "params_btlm_2p7b_2k.yaml")
    p8, _ = load_params(CONFIGS / "params_btlm_2p7b_8k.yaml")
    assert (p2.train_input.batch_size, p8.train_input.batch_size) == (1920, 480)
    assert (p2.eval_input.batch_size, p8.eval_input.batch_size) == (60, 15)
    assert p2.train_input.batch_size * 2048 == p8.train_input.batch_size * 8192 == 3_932_160
    assert (p2.model.loss_weight, p8.model.loss_weight) == (1 / 2048, 1 / 8192)
    assert (p2.runconfig.max_steps, p8.runconfig.max_steps) == (119727, 159636)
    assert p2.optimizer.learning_rate[1].end_learning_rate == 1.0138e-4
    assert p8.optimizer.learning_rate[1].end_learning_rate == 1.0198e-4
    assert p2.model.half_dtype == "bfloat16"  # cbfloat16 maps to bfloat16 off Cerebras hardware
    assert p2.optimizer.adjust_learning_rate == {"decoder_kernel": 0.1}
    assert p2.model.initializer.bounds() == (-0.04616925383845833, 0.04616925383845833)


def test_release_2_0_2_variant_loads_and_reports_ignored_keys(caplog):
    raw = _load_2k()
    del raw["model"]["fp16_type"]
    raw["model"].update(use_bfloat16=True, use_position_embedding=True, attention_kernel="optimized_beta")
    raw["runconfig"].update(use_appliance_data=True, use_cs_grad_accum=True)
    del raw["optimizer"]["loss_scaling_factor"]
    params = parse_params(raw, "r202.yaml")
    assert params.model.half_dtype == "bfloat16"
    with caplog.at_level(logging.INFO, logger="btlm.train"):
        ignored, unknown = report_extra_keys(params)
    assert set(ignored) == {"model.alibi_implementation", "model.attention_kernel", "runconfig.precision_opt_level",
                            "runconfig.use_appliance_data", "runconfig.use_cs_grad_accum",
                            "train_input.use_worker_cache", "eval_input.use_worker_cache"}
    assert unknown == []
    assert sum("Ignoring Cerebras-hardware-only keys" in r.message for r in caplog.records) == 1


def test_unknown_key_warns_not_fails(caplog):
    raw = copy.deepcopy(TINY)
    raw["train_input"]["data_dir"] = raw["eval_input"]["data_dir"] = "x"
    raw["model"]["hiden_size"] = 3
    params = parse_params(raw)
    with caplog.at_level(logging.WARNING, logger="btlm.train"):
        _, unknown = report_extra_keys(params)
    assert unknown == ["model.hiden_size"]
    assert "hiden_size" in caplog.text


def _set(raw, dotted, value):
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    last = int(last) if last.isdigit() else last
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

BAD = [
    ("model.hidden_size", "big", "model.hidden_size"),
    ("model.num_heads", 7, "not divisible by num_heads"),
    ("model.nonlinearity", "swish2", "model.nonlinearity"),
    ("model.share_embedding_weights", False, "model.share_embedding_weights"),
    ("model.loss_scaling", "tokens", "model.loss_scaling"),
    ("model.fp16_type", "float8", "model.fp16_type"),
    ("model.embedding_initializer.name", "xavier", "model.embedding_initializer.name"),
    ("model.initializer.std", -1.0, "model.initializer.std"),
    ("model.dropout_rate", 1.5, "model.dropout_rate"),
    ("optimizer.betas", [0.9, 1.5], "optimizer.betas.1"),
    ("optimizer.optimizer_type", "Adafactor", "optimizer_type 'Adafactor' is not supported"),
    ("optimizer.weight_decay_rate", 0.1, "'weight_decay_rate' is no longer supported"),
    ("optimizer.learning_rate.0.scheduler", "Linearish", "unknown scheduler 'Linearish'"),
    ("optimizer.learning_rate.0.total_iters", _DELETE, "optimizer.learning_rate.0.total_iters: Field required"),
    ("optimizer.learning_rate.0", {"scheduler": "ConstantLR", "learning_rate": 0.01}, "learning_rate[0] needs total_iters"),
    ("optimizer.learning_rate.1.decay_steps", 5, "'decay_steps' is no longer supported"),
    ("optimizer.learning_rate.1.end_learning_rate", "low", "optimizer.learning_rate.1.end_learning_rate"),
    ("optimizer.adjust_learning_rate", {"decoder_kernal": 0.1}, "optimizer.adjust_learning_rate.decoder_kernal"),
    ("optimizer.max_gradient_value", 1.0, "mutually exclusive"),
    ("runconfig.max_steps", 0, "runconfig.max_steps"),
    ("runconfig.mode", "training", "runconfig.mode"),
    ("train_input.batch_size", "x", "train_input.batch_size"),
    ("train_input.data_processor", "GptTextDataProcessor", "train_input.data_processor"),
]


@pytest.mark.parametrize("key,value,expected", BAD, ids=[b[0] + "=" + repr(b[1]) for b in BAD])
def test_bad_yaml_names_the_key(tmp_path, key, value, expected):
    raw = copy.deepcopy(TINY)
    raw["train_input"]["data_dir"] = raw["eval_input"]["data_dir"] = "x"
    _set(raw, key, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "new.yaml").write_text("trainer:\n  init: {profiler: 1}\n")
    with pytest.raises(ConfigError, match="new.yaml: trainer.init.profiler: not supported"):
        load_params(tmp_path / "new.yaml")


def test_train_input_declares_the_loader_keys_once():
    """train_input / eval_input take the loader's keys and defaults from one declaration: every loader
    key is typed in the params (no 'unknown key' warning for data_subset or pin_memory), and a section
    with only the required keys hands the loader exactly its own defaults."""
    from btlm.data.loader_config import DEFAULTS, KNOWN_KEYS
    from btlm.train.config import InputConfig

    assert KNOWN_KEYS <= set(InputConfig.model_fields)
    section = InputConfig(data_dir="x", batch_size=2, data_subset="0.0-0.5", pin_memory=True, spelled_wrong=1)
    assert section.model_extra == {"spelled_wrong": 1}
    dumped = InputConfig(data_dir="x", batch_size=2).model_dump()
    assert {k: dumped[k] for k in DEFAULTS if k != "data_dir"} == {k: v for k, v in DEFAULTS.items() if k != "data_dir"}

"""LoRA in `btlm run` (``model.lora_params``): the adapters learn while the base stays bit-identical, resume is
exact, `btlm convert to-hf` writes the adapter in PEFT's format and the merged model, and bad params fail clearly."""

from __future__ import annotations

import copy
import json
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from btlm.cli import main as btlm_main
from btlm.errors import BTLMError
from btlm.train import checkpoint as ckpt
from btlm.train.config import ConfigError, load_params, parse_params
from btlm.train.lora import LoraGroup, apply_lora, assign_groups, require_peft
from btlm.train.zoo_model import build_model
from btlm.train.trainer import Runner

from .conftest import CONFIGS, TINY

COMPLETION = [5, 17, 33, 2, 71, 40, 11, 60, 8]  # the same answer after every prompt: a task an adapter can learn
LORA = [{"r": 4, "alpha": 8, "target_modules": ["MultiheadAttention"]}, {"r": 2, "alpha": 4}]


def write_pairs_dir(path, n_rows: int, seed: int, msl: int = 16, vocab: int = 97):
    """Summarization-style rows: a random 8-token prompt, then COMPLETION; the loss mask covers the completion."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_rows, 3, msl), dtype=np.int32)
    for i in range(n_rows):
        tokens = np.array([*rng.integers(0, vocab, msl + 1 - len(COMPLETION)), *COMPLETION], dtype=np.int32)
        rows[i, 0], rows[i, 2] = tokens[:-1], tokens[1:]
        rows[i, 1, msl - len(COMPLETION):] = 1
    with h5py.File(path / "examples_0_0.h5", "w") as h5:
        h5.create_dataset("data", data=rows)
        h5.attrs["n_examples"] = n_rows
    return str(path)


@pytest.fixture
def lora_raw(tiny_raw, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw["train_input"]["data_dir"] = write_pairs_dir(tmp_path / "pairs_train", 32, seed=0)
    raw["eval_input"]["data_dir"] = write_pairs_dir(tmp_path / "pairs_held_out", 8, seed=1)
    raw["model"]["loss_scaling"], raw["model"]["loss_weight"] = "num_tokens", 1.0  # mean over completion tokens
    raw["model"]["lora_params"] = copy.deepcopy(LORA)
    raw["optimizer"]["learning_rate"] = 0.02
    raw["model"]["output_logits_scale"] = 8.0  # logits of a random tiny base could not go past ~±1 otherwise
    return raw


def run(raw, model_dir, mode="train", **rc):
    raw = copy.deepcopy(raw)
    raw["runconfig"].update(rc)
    runner = Runner(parse_params(raw), raw, model_dir)
    return {"train": runner.train, "eval": runner.evaluate, "train_and_eval": runner.train_and_eval}[mode]()


@pytest.fixture
def base_ckpt(lora_raw, tmp_path):
    """A randomly initialised base model's checkpoint (the full run's step 0)."""
    raw = copy.deepcopy(lora_raw)
    del raw["model"]["lora_params"]
    run(raw, tmp_path / "base", max_steps=1, save_initial_checkpoint=True)
    return tmp_path / "base" / "checkpoint_0.mdl"


def base_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


def test_lora_run_lowers_held_out_completion_loss_and_keeps_the_base_bit_identical(lora_raw, base_ckpt, tmp_path):
    start = dict(checkpoint_path=str(base_ckpt), load_checkpoint_states="model")
    before = run(lora_raw, tmp_path / "before", mode="eval", **start)["loss"]  # adapters at init: B = 0
    res = run(lora_raw, tmp_path / "lora", mode="train_and_eval", max_steps=20, checkpoint_steps=0, **start)
    assert sorted(res["losses"]) == list(range(1, 21))  # from step 0: the base's own step / schedule do not apply
    after = run(lora_raw, tmp_path / "lora", mode="eval")["loss"]  # the newest checkpoint in model_dir
    assert after < 0.6 * before, (before, after)
    assert res["evals"][20]["loss"] == after  # train_and_eval's final eval: the trained model, not the start

    state = ckpt.load_checkpoint_file(tmp_path / "lora" / "checkpoint_20.mdl")
    base = ckpt.load_checkpoint_file(base_ckpt)["model"]
    frozen = {base_key(k): v for k, v in state["model"].items() if ".lora_" not in k}
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # every base weight, the ALiBi slopes included
    adapters = {k: v for k, v in state["model"].items() if ".lora_" in k}
    assert len(adapters) == 2 * 5 * 2  # A and B of 5 projections in each of 2 blocks
    assert all(v.any() for k, v in adapters.items() if ".lora_B." in k)  # B starts at 0: it trained
    # The optimizer holds the adapters only, in one group at lr x1 with weight decay (not the muP decoder lr).
    (group,) = state["optimizer"]["param_groups"]
    assert group["name"] == "lora" and group["adjust_learning_rate"] == 1.0 and group["weight_decay"] == 0.1
    assert sorted(group["params"]) == sorted(adapters) == sorted(state["optimizer"]["state"])


def test_adapter_ranks_alphas_and_the_model_zoo_order_rule(lora_raw):
    params = parse_params(lora_raw)
    model = apply_lora(build_model(params.model, params.optimizer, seed=1), params.model.lora_params)
    attn, mlp = model.transformer.h[1].attn, model.transformer.h[1].mlp
    # first matching entry wins: attention r=4 alpha=8, the rest (the FFN) r=2 alpha=4; scaling alpha / r
    assert (attn.c_attn.r["default"], attn.c_proj.r["default"], mlp.c_fc2.r["default"]) == (4, 4, 2)
    assert attn.c_attn.scaling["default"] == 2.0 and mlp.c_proj.scaling["default"] == 2.0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "slopes" in n)


@pytest.mark.parametrize("targets, expected", [
    (["MultiheadAttention"], {"attn.c_attn", "attn.c_proj"}),
    (["TransformerDecoderLayer", "Linear"], {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"}),
    (["FeedForwardNetwork"], {"mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"}),
    (["proj_q_dense_layer"], {"attn.c_attn"}),  # q, k and v are one fused projection in btlm
    (["proj_output_dense_layer"], {"attn.c_proj"}),
    (["c_proj"], {"attn.c_proj", "mlp.c_proj"}),
    (["attn", "c_proj"], {"attn.c_proj"}),
    (["c_attn", "c_proj"], {"attn.c_attn", "attn.c_proj", "mlp.c_proj"}),  # projection names: alternatives
    (["proj_q_dense_layer", "proj_k_dense_layer", "proj_v_dense_layer"], {"attn.c_attn"}),
    (["TransformerDecoderLayer", "c_fc", "c_fc2"], {"mlp.c_fc", "mlp.c_fc2"}),
    (["BTLMMLP", "Conv1D"], {"mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"}),
    (None, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"}),
])
def test_target_module_names_map_onto_the_released_layout(tiny_raw, targets, expected):
    params = parse_params(tiny_raw)
    model = build_model(params.model, params.optimizer)
    chosen = assign_groups(model, [LoraGroup(r=2, target_modules=targets)])
    assert {k.split(".", 3)[-1] for k in chosen} == expected
    assert {k.split(".")[2] for k in chosen} == {"0", "1"}  # every block


def test_a_lora_run_resumes_exactly(lora_raw, base_ckpt, tmp_path):
    """Stop at step 3 and resume to 6 = 6 straight, bit for bit (with adapter dropout drawing random numbers)."""
    raw = copy.deepcopy(lora_raw)
    for group in raw["model"]["lora_params"]:
        group["dropout"] = 0.1
    start = dict(checkpoint_path=str(base_ckpt), load_checkpoint_states="model", checkpoint_steps=0)
    straight = run(raw, tmp_path / "a", max_steps=6, **start)
    first = run(raw, tmp_path / "b", max_steps=3, **start)
    second = run(raw, tmp_path / "b", max_steps=6, checkpoint_steps=0)  # auto-resume from checkpoint_3
    assert second["checkpoint"].name == "checkpoint_6.mdl" and sorted(second["losses"]) == [4, 5, 6]
    assert {**first["losses"], **second["losses"]} == straight["losses"]
    a = ckpt.load_checkpoint_file(tmp_path / "a" / "checkpoint_6.mdl")
    b = ckpt.load_checkpoint_file(tmp_path / "b" / "checkpoint_6.mdl")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for k, st in a["optimizer"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][k][n])) for n, v in st.items())


def test_convert_writes_the_peft_adapter_and_the_merged_model_with_the_same_logits(lora_raw, base_ckpt, tmp_path,
                                                                                    capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from btlm.io import load_model

    run(lora_raw, tmp_path / "lora", max_steps=8, checkpoint_steps=0, checkpoint_path=str(base_ckpt),
        load_checkpoint_states="model")
    lora_ckpt = str(tmp_path / "lora" / "checkpoint_8.mdl")
    assert btlm_main(["convert", "to-hf", str(base_ckpt), str(tmp_path / "base_hf")]) == 0
    assert btlm_main(["convert", "to-hf", lora_ckpt, str(tmp_path / "adapter")]) == 0
    assert btlm_main(["convert", "to-hf", lora_ckpt, str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                       "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"]
    assert len(cfg["target_modules"]) == 10 and set(cfg["rank_pattern"].values()) == {2}

    # The training model (as btlm run eval builds it), the PEFT adapter on the base, the merged model.
    raw = copy.deepcopy(lora_raw)
    runner = Runner(parse_params(raw), raw, tmp_path / "lora")
    trained = runner._build_model().eval()
    runner.checkpointer.read(tmp_path / "lora" / "checkpoint_8.mdl", trained, None)
    adapter = PeftModel.from_pretrained(load_model(tmp_path / "base_hf"), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())  # the released layout
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = trained(input_ids=x).logits
        torch.testing.assert_close(adapter(input_ids=x).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(merged(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
        base = load_model(tmp_path / "base_hf").eval()(input_ids=x).logits
    assert (base - ref).abs().max() > 1e-3  # the adapter changed the model

    # Atomic, never over what btlm did not write; --merge-lora needs a LoRA checkpoint.
    capsys.readouterr()
    assert btlm_main(["convert", "to-hf", lora_ckpt, str(tmp_path / "adapter")]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert btlm_main(["convert", "to-hf", lora_ckpt, str(tmp_path / "adapter"), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".adapter.tmp-*"))
    capsys.readouterr()
    assert btlm_main(["convert", "to-hf", str(base_ckpt), str(tmp_path / "x"), "--merge-lora"]) == 1
    assert "--merge-lora" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("lora_params, message", [
    ({"r": 8, "rank": 4}, r"lora_params\.0: .*unknown key 'rank'; lora_params keys are r, alpha, dropout"),
    ({"r": 8, "target_modules": ["q_proj"]}, r"unknown target module 'q_proj'; valid names: .*MultiheadAttention"),
    ({"r": 8, "target_modules": ["lm_head"]}, r"'lm_head': LoRA on the token embedding / LM head is not supported"),
    ({"r": 0}, r"lora_params\.0\.r: .*r must be a positive rank, got 0"),
    ({"alpha": 16}, r"r must be a positive rank, got 0"),  # Model Zoo's default rank 0
    ({"r": -2}, r"r must be a positive rank, got -2"),
    ({"r": 4, "target_modules": []}, r"target_modules is empty"),
    ([], r"lora_params is an empty list"),
    ([{"r": 4, "dropout": 0.1}, {"r": 2}], r"same dropout"),
])
def test_bad_lora_params_give_one_clear_error(tiny_raw, lora_params, message):
    raw = copy.deepcopy(tiny_raw)
    raw["model"]["lora_params"] = lora_params
    with pytest.raises(ConfigError, match=message) as err:
        parse_params(raw, "p.yaml")
    assert str(err.value).startswith("p.yaml: invalid params") and str(err.value).count("\n") == 1


def test_an_entry_that_selects_nothing_is_an_error(tiny_raw):
    params = parse_params(tiny_raw)
    model = build_model(params.model, params.optimizer)
    groups = [LoraGroup(r=2, target_modules=["MultiheadAttention"]), LoraGroup(r=4, target_modules=["c_attn"])]
    with pytest.raises(BTLMError, match=r"lora_params\[1\]: target_modules \['c_attn'\] select no decoder "
                                        "projection not already taken by an earlier entry"):
        assign_groups(model, groups)


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` then raises ImportError
    with pytest.raises(BTLMError, match=r"pip install 'btlm\[finetune\]'"):
        require_peft()


def test_a_full_run_refuses_a_lora_checkpoint(lora_raw, base_ckpt, tmp_path):
    run(lora_raw, tmp_path / "lora", max_steps=1, checkpoint_path=str(base_ckpt), load_checkpoint_states="model")
    raw = copy.deepcopy(lora_raw)
    del raw["model"]["lora_params"]
    with pytest.raises(ckpt.CheckpointError, match="holds LoRA adapters but the params have no model.lora_params"):
        run(raw, tmp_path / "full", max_steps=2, checkpoint_path=str(tmp_path / "lora" / "checkpoint_1.mdl"))


@pytest.mark.parametrize("name, adapted", [("params_btlm_tiny_lora.yaml", 5), ("params_btlm_3b_8k_lora.yaml", 2)])
def test_lora_configs_parse_and_select_their_projections(name, adapted):
    params, _ = load_params(CONFIGS / name)
    (group,) = params.model.lora_params
    assert group.r > 0 and params.model.loss_scaling == "num_tokens"
    one_block = params.model.model_copy(update={"num_hidden_layers": 1, "hidden_size": 64, "num_heads": 4,
                                                "filter_size": 128})  # the same module tree, small
    assert len(assign_groups(build_model(one_block, params.optimizer), [group])) == adapted


def test_a_sharded_dcp_checkpoint_is_a_base_too(lora_raw, base_ckpt, tmp_path):
    """An FSDP2 full run's checkpoint_<step>.dcp directory gives the same start as the .mdl of the same weights."""
    from btlm.train import distributed as D
    from btlm.train.optim import build_optimizer

    raw = copy.deepcopy(lora_raw)
    del raw["model"]["lora_params"]
    params = parse_params(raw)
    model = build_model(params.model, params.optimizer)
    model.load_state_dict(ckpt.load_checkpoint_file(base_ckpt)["model"], strict=False)
    D.save_sharded(tmp_path / "checkpoint_0.dcp", model, build_optimizer(model, params.optimizer), {"global_step": 0},
                   D.DistEnv())
    start = dict(max_steps=2, checkpoint_steps=0, load_checkpoint_states="model")
    from_mdl = run(lora_raw, tmp_path / "a", checkpoint_path=str(base_ckpt), **start)
    with pytest.raises(ckpt.CheckpointError, match="--allow_unpickle"):
        run(lora_raw, tmp_path / "b", checkpoint_path=str(tmp_path / "checkpoint_0.dcp"), **start)
    from_dcp = run(lora_raw, tmp_path / "b", checkpoint_path=str(tmp_path / "checkpoint_0.dcp"), allow_unpickle=True,
                   **start)
    assert from_dcp["losses"] == from_mdl["losses"]
    a = ckpt.load_checkpoint_file(tmp_path / "a" / "checkpoint_2.mdl")["model"]
    b = ckpt.load_checkpoint_file(tmp_path / "b" / "checkpoint_2.mdl")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_zoo_2_4_trainer_yaml_spells_lora_as_a_callback(tmp_path):
    trainer = {"trainer": {"init": {
        "model": {"name": "btlm", **{k: v for k, v in copy.deepcopy(TINY["model"]).items()}},
        "callbacks": [{"Lora": {"lora_params": {"r": 4, "alpha": 8, "target_modules": ["MultiheadAttention"]}}},
                      {"ComputeNorm": {}}]}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(trainer))
    params, raw = load_params(tmp_path / "t.yaml")
    assert params.model.lora_params == [LoraGroup(r=4, alpha=8, target_modules=["MultiheadAttention"])]
    assert raw["model"]["lora_params"]["r"] == 4  # the run's stored params keep it (convert reads them)


def test_mfu_counts_no_weight_gradients_for_the_frozen_base(lora_raw):
    from btlm.train.trainer import flops_per_token

    raw = copy.deepcopy(lora_raw)
    params = parse_params(raw)
    full = build_model(params.model, params.optimizer)
    lora = apply_lora(build_model(params.model, params.optimizer), params.model.lora_params)
    cfg = full.config
    matrices = sum(p.numel() for n, p in full.named_parameters() if ".h." in n and p.dim() == 2)
    attention = 6.0 * cfg.n_layer * 16 * cfg.n_embd
    assert flops_per_token(full, 16) == 6.0 * (matrices + cfg.vocab_size * cfg.n_embd) + attention
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert flops_per_token(lora, 16) == 4.0 * (matrices + cfg.vocab_size * cfg.n_embd) + 6.0 * adapters + attention

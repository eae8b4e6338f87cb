"""muP: the Model Zoo 2.0-2.2 and 2.3+ spellings build the same model, groups and exported logits; the
coordinate check flags a broken muP and passes the shipped config; the sweep finds an optimum per width."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import btlm  # noqa: F401  (registers model_type "btlm" with the Auto classes)
from btlm.train import checkpoint as ckpt
from btlm.train import mup
from btlm.train.config import ConfigError, parse_params
from btlm.cli import main as btlm_main
from btlm.train.zoo_model import btlm_config_from_params, build_model
from btlm.train.optim import build_param_groups
from btlm.train.trainer import Runner


def mup_main(argv):
    return btlm_main(["mup", *argv])


def convert_main(argv):
    return btlm_main(["convert", *argv])

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE_STD = 0.073
TRUNC_2SIGMA = 0.8796  # std of a normal truncated at ±2σ, in units of σ


def _trunc(std: float) -> dict:
    return {"name": "truncated_normal", "mean": 0.0, "std": std, "a": -2 * std, "b": 2 * std}


def _spellings(tiny_raw, hidden=64, base_hidden=16, filter_size=128, base_filter=32):
    """The same muP model in both spellings: (old: pre-scaled inits + output_logits_scale +
    decoder_kernel, new: base sizes + base stds + output_logits_alpha)."""
    m, mf, depth = hidden / base_hidden, filter_size / base_filter, (2 * 2) ** -0.5
    new = copy.deepcopy(tiny_raw)
    new["model"].update(hidden_size=hidden, filter_size=filter_size, mup_base_hidden_size=base_hidden,
                        mup_base_filter_size=base_filter, output_logits_alpha=2.22,
                        initializer=_trunc(BASE_STD), output_layer_initializer=_trunc(BASE_STD))
    new["model"].pop("output_logits_scale")
    new["optimizer"].pop("adjust_learning_rate")
    old = copy.deepcopy(tiny_raw)
    old["model"].update(hidden_size=hidden, filter_size=filter_size, output_logits_scale=2.22 / m,
                        initializer={k: v * m**-0.5 if k in ("std", "a", "b") else v
                                     for k, v in _trunc(BASE_STD).items()},
                        output_layer_initializer={k: v * (m**-0.5 * depth) if k in ("std", "a", "b") else v
                                                  for k, v in _trunc(BASE_STD).items()})
    if mf != m:
        old["model"]["ffn_output_layer_initializer"] = {k: v * (mf**-0.5 * depth) if k in ("std", "a", "b") else v
                                                        for k, v in _trunc(BASE_STD).items()}
    old["optimizer"]["adjust_learning_rate"] = {"decoder_kernel": 1 / m}
    return old, new


def _groups(model, params):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], g["adjust_learning_rate"], g["weight_decay"], [names[id(p)] for p in g["params"]])
            for g in build_param_groups(model, params.optimizer, params.model)]


def test_both_spellings_build_the_same_model_and_param_groups(tiny_raw):
    old, new = _spellings(tiny_raw)
    with_kernel = copy.deepcopy(new)  # 2.3+ keys together with a (consistent) adjust_learning_rate
    with_kernel["optimizer"]["adjust_learning_rate"] = {"decoder_kernel": 0.25}
    models = []
    for raw in (old, new, with_kernel):
        params = parse_params(raw)
        model = build_model(params.model, params.optimizer, seed=3)
        models.append((model, params))
    (ref, p_ref), others = models[0], models[1:]
    assert btlm_config_from_params(p_ref.model, p_ref.optimizer).output_logits_scale == 2.22 / 4
    for model, params in others:
        assert set(model.state_dict()) == set(ref.state_dict())
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert _groups(model, params) == _groups(ref, p_ref)
        cfg, cfg_ref = (btlm_config_from_params(p.model, p.optimizer) for p in (params, p_ref))
        assert (cfg.mup_width_scale, cfg.output_logits_scale) == (cfg_ref.mup_width_scale, cfg_ref.output_logits_scale)
    assert [g[:2] for g in _groups(ref, p_ref)] == [("decoder_kernel", 0.25), ("embedding", 1.0), ("no_decay", 1.0)]
    # The initializers really were width-scaled (not just equal by accident): q/k/v std 0.073/2.
    assert abs(ref.transformer.h[0].attn.c_attn.weight.std().item() - TRUNC_2SIGMA * BASE_STD / 2) < 0.001


def test_three_lr_groups_when_the_ffn_output_width_multiplier_differs(tiny_raw):
    old, new = _spellings(tiny_raw, filter_size=128, base_filter=64)  # m = 4, mf = 2
    params = parse_params(new)
    model = build_model(params.model, params.optimizer, seed=0)
    groups = {g[0]: g for g in _groups(model, params)}
    assert {k: g[1] for k, g in groups.items()} == {"decoder_attention": 0.25, "decoder_input_ffn": 0.25,
                                                    "decoder_output_ffn": 0.5, "embedding": 1.0, "no_decay": 1.0}
    assert groups["decoder_attention"][3] == [f"transformer.h.{i}.attn.{m}.weight" for i in (0, 1)
                                              for m in ("c_attn", "c_proj")]
    assert groups["decoder_input_ffn"][3] == [f"transformer.h.{i}.mlp.{m}.weight" for i in (0, 1)
                                              for m in ("c_fc", "c_fc2")]
    assert groups["decoder_output_ffn"][3] == [f"transformer.h.{i}.mlp.c_proj.weight" for i in (0, 1)]
    # The FFN output std follows mf, not m: 0.073 / sqrt(2) / sqrt(4).
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - TRUNC_2SIGMA * BASE_STD * (2 * 4) ** -0.5) < 0.001
    # The single decoder_kernel of the old spelling cannot express this: giving it is an error.
    bad = copy.deepcopy(new)
    bad["optimizer"]["adjust_learning_rate"] = {"decoder_kernel": 0.25}
    with pytest.raises(ConfigError, match="decoder_kernel 0.25 disagrees.*decoder_output_ffn x0.5"):
        parse_params(bad)


@pytest.mark.parametrize("key, value, expected", [
    ("output_logits_scale", 0.5, "not both"),
    ("attention_logits_alpha", 2.0, "attention_logits_alpha other than 1.0"),
])
def test_ambiguous_or_unsupported_mup_keys_are_refused(tiny_raw, key, value, expected):
    _, new = _spellings(tiny_raw)
    new["model"][key] = value
    with pytest.raises(ConfigError, match=expected):
        parse_params(new)


def test_trained_and_converted_logits_are_equal_for_both_spellings(tiny_raw, tmp_path):
    old, new = _spellings(tiny_raw)
    states = []
    for name, raw in (("old", old), ("new", new)):
        raw["runconfig"].update(max_steps=2, checkpoint_steps=0)
        Runner(parse_params(raw), raw, tmp_path / name).train()  # step 2 updates with lr 0.005 x groups
        ckpt_path = tmp_path / name / "checkpoint_2.mdl"
        assert convert_main(["to-hf", str(ckpt_path), str(tmp_path / f"hf_{name}")]) == 0
        params = parse_params(raw)
        ours = build_model(params.model, params.optimizer)
        state = ckpt.load_checkpoint_file(ckpt_path)["model"]
        ours.load_state_dict(state)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{name}").eval()
        assert hf.config.output_logits_scale == 2.22 / 4
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, ours.eval()(x).logits, rtol=0, atol=0)
        states.append(state)
    for k, v in states[0].items():  # same init, same groups, same updates
        assert torch.equal(states[1][k], v), k


def test_coord_check_flags_logits_not_divided_by_the_width_multiplier(tiny_raw):
    params = parse_params(tiny_raw)
    good = mup.variants_from_params(params, lr=0.01)["muP"]

    def broken(width, seed):
        model, optimizer, cfg = good(width, seed)
        model.config.mup_output_alpha *= cfg.hidden_width_mult  # logits x alpha instead of alpha / m
        return model, optimizer, cfg

    rows = mup.coord_check(params, [32, 64, 128, 256], steps=3, batch_size=2, seq_len=16, lr=0.01, seed=0,
                           data="random", variants={"muP": good, "broken": broken}, log=lambda *_: None)
    verdict = {(e["variant"], e["layer"]): e for e in mup.verdict(rows)}
    assert [k for k, e in verdict.items() if e["grows"]] == [("broken", "logits")]
    assert verdict[("broken", "logits")]["slope"] > 0.5
    # Before the first update the broken model is the correct one everywhere but the logits.
    first = mup.slopes(rows, step=1)
    assert first[("broken", "block1.mlp")] == first[("muP", "block1.mlp")]
    assert first[("broken", "logits")] == pytest.approx(first[("muP", "logits")] + 1.0)  # x m = x width/base


def test_coord_check_cli_passes_the_shipped_tiny_config_and_flags_sp(tmp_path, capsys):
    rc = mup_main(["coord-check", "--params", str(CONFIGS / "params_btlm_tiny_cpu.yaml"), "--widths", "32,64,128",
                   "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--data", "random", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "muP verdict: OK" in out
    rows = list(__import__("csv").DictReader((tmp_path / "coord_check.csv").open()))
    assert {r["variant"] for r in rows} == {"muP", "SP"} and len(rows) == 2 * 3 * 3 * (1 + 3 * 4 + 1)
    assert (tmp_path / "coord_check.png").read_bytes()[:4] == b"\x89PNG"
    sp_growing = [line for line in out.splitlines() if line.startswith("SP") and "GROWS" in line]
    assert any("logits " in line for line in sp_growing) and len(sp_growing) >= 8, out


def test_base_form_of_an_old_spelling_reproduces_the_model_at_its_own_width(tiny_raw):
    old, _ = _spellings(tiny_raw)
    params = parse_params(old)
    base_model, _ = mup.mup_base_form(params)
    again = parse_params({**old, "model": mup.model_at_width(base_model, 64)})
    a, b = build_model(params.model, params.optimizer, seed=1), build_model(again.model, params.optimizer, seed=1)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-6, atol=0)  # stds round-trip within float error
    assert again.model.logits_scale() == pytest.approx(params.model.output_logits_scale)
    # A 2.3+ params file with a (consistent) decoder_kernel: at another width the base sizes rule.
    _, new = _spellings(tiny_raw)
    new["optimizer"]["adjust_learning_rate"] = {"decoder_kernel": 0.25, "embedding": 0.5}
    _, optimizer, cfg = mup.variants_from_params(parse_params(new), lr=0.01)["muP"](128, 0)
    assert (cfg.hidden_size, cfg.filter_size) == (128, 256)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"decoder_kernel": 0.01 / 8, "embedding": 0.005, "no_decay": 0.01})


def test_sweep_reports_an_optimum_per_width_and_a_huge_lr_never_wins(tiny_raw, tmp_path):
    params = parse_params(tiny_raw)
    rows = mup.lr_sweep(params, [32, 64], [1e-3, 1e-2, 1e3], steps=6, batch_size=4, seed=0, data="params",
                        log=lambda *_: None)
    assert len(rows) == 2 * 2 * 3
    best = mup.best_lrs(rows)
    assert set(best) == {(v, w) for v in ("muP", "SP") for w in (32, 64)}
    assert all(lr != 1e3 for lr in best.values())  # a learning rate of 1000 never wins
    # The learnable pattern in the data is learnt: loss at lr 1e-2 is below the uniform log(97).
    assert all(r["loss"] < math.log(97) for r in rows if r["lr"] == 1e-2)
    assert mup.plot_sweep(rows, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_model_zoo_2x_trainer_yaml_is_the_same_run_as_the_2_0_params(tmp_path):
    from btlm.train.config import load_params, lr_multipliers
    from btlm.train.zoo_model import effective_initializers

    new, _ = load_params(Path(__file__).parent / "data" / "trainer_btlm_2p7b_8k.yaml")
    old, _ = load_params(CONFIGS / "params_btlm_2p7b_8k.yaml")
    assert new.model.logits_scale() == old.model.logits_scale() == 0.22200000000000003
    assert lr_multipliers(new.model, new.optimizer) == lr_multipliers(old.model, old.optimizer)
    inits_new, inits_old = effective_initializers(new.model), effective_initializers(old.model)
    for kind, init in inits_old.items():
        assert inits_new[kind].std == pytest.approx(init.std, rel=1e-12), kind
        assert inits_new[kind].bounds() == pytest.approx(init.bounds(), rel=1e-12), kind
    sched_new, sched_old = new.optimizer.schedule(), old.optimizer.schedule()
    assert [sched_new(t) for t in (0, 50, 95, 10_000, 159_635)] == [sched_old(t) for t in (0, 50, 95, 10_000, 159_635)]
    for section in ("train_input", "eval_input"):
        assert getattr(new, section).data_dir == getattr(old, section).data_dir
    assert (new.runconfig.max_steps, new.runconfig.checkpoint_steps, new.runconfig.eval_steps, new.runconfig.seed) == (
        old.runconfig.max_steps, old.runconfig.checkpoint_steps, old.runconfig.eval_steps, old.runconfig.seed)
    assert (new.optimizer.max_gradient_norm, new.model.mixed_precision, new.model.half_dtype) == (1.0, True, "bfloat16")
    # btlm run's CLI overrides merge into the mapped sections.
    from btlm.train.launch import merge_overrides

    _, raw = load_params(Path(__file__).parent / "data" / "trainer_btlm_2p7b_8k.yaml")
    merged = parse_params(merge_overrides(raw, {"max_steps": 7, "mode": "train"}))
    assert (merged.runconfig.max_steps, merged.runconfig.eval_frequency) == (7, 200)
    # Keys btlm cannot honour are refused with one line naming them.
    text = (Path(__file__).parent / "data" / "trainer_btlm_2p7b_8k.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(text.replace("- ComputeNorm: {}", "- SomethingElse: {}"))
    with pytest.raises(ConfigError, match=r"bad.yaml: trainer.init.callbacks\[2\]: callback 'SomethingElse'"):
        load_params(tmp_path / "bad.yaml")


def test_coord_check_refuses_to_replace_earlier_results_before_any_run(tmp_path, capsys):
    (tmp_path / "coord_check.csv").write_text("mine\n")
    argv = ["coord-check", "--params", str(CONFIGS / "params_btlm_tiny_cpu.yaml"), "--widths", "32,64",
            "--steps", "1", "--data", "random", "--out", str(tmp_path)]
    assert mup_main(argv) == 1
    assert "coord_check.csv already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "coord_check.csv").read_text() == "mine\n" and not (tmp_path / "coord_check.png").exists()

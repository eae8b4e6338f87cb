"""LR schedules against closed forms, muP parameter groups, cstorch AdamW and the Model Zoo loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from btlm.train.config import OptimizerConfig, load_params, parse_params
from btlm.train.zoo_model import build_model, lm_loss
from btlm.train.optim import AdamW, ScheduledLR, build_optimizer, build_param_groups

from .conftest import CONFIGS, TINY


def sched(lr):
    return OptimizerConfig(learning_rate=lr).schedule()


@pytest.mark.parametrize("cfg,expected", [
    ({"scheduler": "Constant", "learning_rate": 0.3}, {0: 0.3, 10**6: 0.3}),
    ({"scheduler": "Linear", "initial_learning_rate": 1.0, "end_learning_rate": 0.2, "total_iters": 8},
     {0: 1.0, 4: 0.6, 7: 0.3, 8: 0.2, 100: 0.2}),
    ({"scheduler": "PolynomialLR", "initial_learning_rate": 1.0, "end_learning_rate": 0.0, "total_iters": 10,
      "power": 2.0}, {0: 1.0, 5: 0.25, 10: 0.0}),
    ({"scheduler": "Polynomial", "initial_learning_rate": 1.0, "end_learning_rate": 0.0, "total_iters": 10,
      "cycle": True}, {0: 1.0, 5: 0.5, 10: 0.5, 15: 0.25}),
    ({"scheduler": "CosineDecay", "initial_learning_rate": 1.0, "end_learning_rate": 0.1, "total_iters": 10},
     {0: 1.0, 5: 0.55, 10: 0.1, 20: 0.1}),
    ({"scheduler": "Exponential", "initial_learning_rate": 1.0, "total_iters": 10, "decay_rate": 0.5},
     {0: 1.0, 5: 0.5**0.5, 10: 0.5}),
    ({"scheduler": "Exponential", "initial_learning_rate": 1.0, "total_iters": 10, "decay_rate": 0.5,
      "staircase": True}, {9: 1.0, 10: 0.5, 25: 0.25}),
    ({"scheduler": "InverseExponentialTimeDecay", "initial_learning_rate": 1.0, "step_exponent": 2,
      "total_iters": 4, "decay_rate": 1.0}, {0: 1.0, 2: 0.5, 4: 1 / 5}),
    ({"scheduler": "InverseSquareRootDecay", "initial_learning_rate": 2.0, "scale": 1.0, "warmup_steps": 4},
     {0: 1.0, 4: 1.0, 16: 0.5}),
    ({"scheduler": "Step", "initial_learning_rate": 1.0, "step_size": 3, "gamma": 0.1},
     {2: 1.0, 3: 0.1, 6: 0.01}),
    ({"scheduler": "MultiStep", "initial_learning_rate": 1.0, "gamma": 0.5, "milestones": [2, 5]},
     {1: 1.0, 2: 0.5, 4: 0.5, 5: 0.25}),
    ({"scheduler": "PiecewiseConstant", "learning_rates": [3.0, 2.0, 1.0], "milestones": [2, 5]},
     {0: 3.0, 1: 3.0, 2: 2.0, 5: 1.0}),
    ({"scheduler": "CosineAnnealing", "initial_learning_rate": 1.0, "T_max": 4, "eta_min": 0.0},
     {0: 1.0, 2: 0.5, 4: 0.0, 8: 1.0}),
])
def test_schedule_closed_forms(cfg, expected):
    s = sched(cfg)
    for t, lr in expected.items():
        assert s(t) == pytest.approx(lr, abs=1e-12), (cfg["scheduler"], t)


def test_sequential_list_restarts_each_stage():
    s = sched([{"scheduler": "Constant", "learning_rate": 5.0, "total_iters": 3},
               {"scheduler": "Step", "initial_learning_rate": 1.0, "step_size": 2, "gamma": 0.5}])
    assert [s(t) for t in range(7)] == [5.0, 5.0, 5.0, 1.0, 1.0, 0.5, 0.5]


def test_btlm_two_stage_schedule_closed_form():
    p2, _ = load_params(CONFIGS / "params_btlm_2p7b_2k.yaml")
    p8, _ = load_params(CONFIGS / "params_btlm_2p7b_8k.yaml")
    s2, s8 = p2.optimizer.schedule(), p8.optimizer.schedule()
    lr = lambda t, end: 0.012 * t / 95 if t < 95 else end + (0.012 - end) * (1 - min(t - 95, 159541) / 159541)  # noqa: E731
    for t in (0, 1, 94, 95, 96, 119726, 119727, 159635, 159636, 200000):
        assert s2(t) == pytest.approx(lr(t, 1.0138e-4), rel=1e-12, abs=1e-18)
        assert s8(t) == pytest.approx(lr(t, 1.0198e-4), rel=1e-12, abs=1e-18)
    assert s2(0) == 0.0  # the first update uses lr 0
    assert s2(119726) == pytest.approx(3.08e-3, rel=2e-3)  # where the 2k stage stops (75 %)


def test_first_update_uses_lr_zero_and_groups_get_their_multipliers():
    params = parse_params({**TINY, "train_input": None, "eval_input": None})
    model = build_model(params.model, params.optimizer, seed=0)
    opt = build_optimizer(model, params.optimizer)
    scheduler = ScheduledLR(opt, params.optimizer.schedule())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 97, (2, 16))
    for step in range(3):
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        base = params.optimizer.schedule()(step)
        assert lrs == pytest.approx({"decoder_kernel": 0.2 * base, "embedding": base, "no_decay": base})
        model(x, labels=x).loss.backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
        if step == 0:  # lr 0: neither the update nor the decoupled decay changed anything
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])


def test_param_groups_follow_model_zoo_rules():
    params = parse_params({**TINY, "train_input": None, "eval_input": None})
    model = build_model(params.model, params.optimizer, seed=0)
    groups = {g["name"]: g for g in build_param_groups(model, params.optimizer)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    named = dict(model.named_parameters())
    assert id(named["transformer.wte.weight"]) in ids["embedding"] and len(ids["embedding"]) == 1
    for i in range(2):
        for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"):
            assert id(named[f"transformer.h.{i}.{mod}.weight"]) in ids["decoder_kernel"]
            assert id(named[f"transformer.h.{i}.{mod}.bias"]) in ids["no_decay"]
        assert id(named[f"transformer.h.{i}.ln_1.weight"]) in ids["no_decay"]
    all_ids = set().union(*ids.values())
    assert id(model.transformer.relative_pe.slopes) not in all_ids  # ALiBi slopes are never optimised
    assert (groups["decoder_kernel"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert groups["decoder_kernel"]["adjust_learning_rate"] == 0.2
    n_trainable = sum(p.numel() for n, p in named.items() if "slopes" not in n)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable


@pytest.mark.parametrize("correct_bias", [True, False])
def test_adamw_one_step_closed_form(correct_bias):
    p0 = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.5, -0.1, 2.0])
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW([p], lr=0.1, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.5, correct_bias=correct_bias)
    p.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.05 * g * g
    u = m / (v.sqrt() + 1e-3)  # eps before the bias correction (cstorch / HF AdamW)
    if correct_bias:
        u = u * math.sqrt(1 - 0.95) / (1 - 0.9)
    expected = p0 - 0.1 * (u + 0.5 * p0)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq", "beta1_power", "beta2_power"}


def test_adamw_matches_torch_adamw_without_eps():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamW([a], lr=0.01, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), eps=1e-30, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_scaling_hand_checked():
    # Two rows of 2 tokens, vocab 2; logits make ce = log(2) everywhere except one confident position.
    logits = torch.zeros(2, 2, 2)
    logits[0, 0] = torch.tensor([10.0, -10.0])
    labels = torch.tensor([[0, 1], [1, 0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # last token is padding
    ce00 = math.log1p(math.exp(-20.0))
    total = ce00 + 2 * math.log(2)
    base = dict(TINY["model"])
    tok = parse_params({"model": {**base, "loss_scaling": "num_tokens", "loss_weight": 1.0}}).model
    bs = parse_params({"model": {**base, "loss_scaling": "batch_size", "loss_weight": 0.5}}).model
    assert float(lm_loss(logits, labels, mask, tok)) == pytest.approx(total / 3, rel=1e-6)
    # batch_size: Σ ce·m / B · loss_weight (padding still counts in the denominator via 1/msl)
    assert float(lm_loss(logits, labels, mask, bs)) == pytest.approx(total / 2 * 0.5, rel=1e-6)


def test_adamw_beta_powers_stay_cpu_float64_across_load_state_dict():
    """Optimizer.load_state_dict casts float state to the parameter dtype; the running products must not
    be rounded to float32 (a resumed run would use another bias correction than an uninterrupted one)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([p], lr=0.01, betas=(0.9, 0.95))
    for _ in range(7):
        p.grad = torch.randn(4)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() hands out the live tensors
    q = torch.nn.Parameter(p.detach().clone())
    fresh = AdamW([q], lr=0.01, betas=(0.9, 0.95))
    fresh.load_state_dict(saved)
    for name, beta in (("beta1_power", 0.9), ("beta2_power", 0.95)):
        got = fresh.state[q][name]
        assert got.dtype == torch.float64 and got.device.type == "cpu"
        assert torch.equal(got, opt.state[p][name]) and float(got) != float(got.float())  # not float32-rounded
        expected = torch.tensor(1.0, dtype=torch.float64)
        for _ in range(7):
            expected *= beta
        assert torch.equal(got, expected)
    g = torch.randn(4)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    fresh.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_saving_empty_optimizer_state_takes_no_update(kind):
    """torch.distributed.checkpoint initialises empty optimizer state with a zero-gradient step(); through
    btlm.train.distributed the state is created without one, so the next update is a true first update."""
    from btlm.train import distributed as D

    raw = {"model": TINY["model"], "optimizer": {**TINY["optimizer"], "optimizer_type": kind, "momentum": 0.9}}
    params = parse_params(raw)

    def model_and_opt():
        model = build_model(params.model, params.optimizer, seed=0)
        opt = build_optimizer(model, params.optimizer)
        for g in opt.param_groups:
            g["lr"] = 0.01
        return model, opt

    ref_model, ref_opt = model_and_opt()
    model, opt = model_and_opt()
    state = D.full_optimizer_state(model, opt)["state"]
    assert state
    assert all(not v.any() for st in state.values() for k, v in st.items() if k in ("exp_avg", "momentum_buffer"))
    if kind == "adamw":
        assert all(float(st["beta1_power"]) == 1.0 for st in state.values())
    if kind == "adam":
        assert all(float(st["step"]) == 0.0 for st in state.values())
    x = torch.randint(0, 97, (2, 16))
    for m, o in ((ref_model, ref_opt), (model, opt)):
        m(x, labels=x.long()).loss.backward()
        o.step()
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def _with_linear_projections(model):
    """``model`` with every GPT-2 ``Conv1D`` replaced by an ``nn.Linear`` of the same shape."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            parent, _, leaf = name.rpartition(".")
            d_in, d_out = module.weight.shape
            setattr(model.get_submodule(parent), leaf, torch.nn.Linear(d_in, d_out))
    return model


@pytest.mark.parametrize("layout", ["released", "untied_linear_head", "linear_projections", "learned_positions"])
def test_trainer_and_model_give_the_same_mup_groups(layout):
    """``build_param_groups`` (the trainer) and ``get_mup_param_groups`` (HF users) go through the model's one
    muP rule: the same parameters, in the same order, in groups with the same lr scale and weight decay."""
    from btlm.model import BTLMLMHeadModel, config_from_preset
    from btlm.model.model import MUP_DECODER_GROUPS
    from btlm.train.config import DECODER_LR_GROUPS

    width, wd = 0.25, 0.1
    overrides = {"untied_linear_head": dict(tie_word_embeddings=False),
                 "learned_positions": dict(position_embedding_type="learned", n_positions=64)}.get(layout, {})
    model = BTLMLMHeadModel(config_from_preset("tiny", mup_width_scale=width, **overrides))
    if layout == "linear_projections":
        _with_linear_projections(model)
    opt_cfg = OptimizerConfig(learning_rate=1.0, weight_decay=wd, adjust_learning_rate={"decoder_kernel": width})
    trainer = {g["name"]: g for g in build_param_groups(model, opt_cfg)}
    hf = {g["name"]: g for g in model.get_mup_param_groups(lr=1.0, weight_decay=wd)}
    assert set(trainer) == {"decoder_kernel", "embedding", "no_decay"}
    assert MUP_DECODER_GROUPS == DECODER_LR_GROUPS  # the model's decoder groups are the trainer's lr groups
    for t_name, h_name in (("decoder_kernel", "hidden"), ("embedding", "embedding"), ("no_decay", "no_decay")):
        assert [id(p) for p in trainer[t_name]["params"]] == [id(p) for p in hf[h_name]["params"]], t_name
        assert trainer[t_name]["adjust_learning_rate"] == pytest.approx(hf[h_name]["lr"])
        assert trainer[t_name]["weight_decay"] == hf[h_name]["weight_decay"]
    named = dict(model.named_parameters())
    assert len(trainer["decoder_kernel"]["params"]) == 5 * model.config.n_layer
    embedding = {id(p) for p in trainer["embedding"]["params"]}
    assert id(model.transformer.wte.weight) in embedding
    assert (id(model.lm_head.weight) in embedding) and (len(embedding) == 1 + (layout in ("untied_linear_head",
                                                                                           "learned_positions")))
    listed = [id(p) for g in trainer.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for n, p in named.items() if "slopes" not in n)


def test_mup_kinds_do_not_depend_on_the_projection_type():
    """Conv1D or nn.Linear projections, any name prefix: the same muP kind, so the same init and lr."""
    from btlm.model import BTLMLMHeadModel, config_from_preset, mup_named_parameters

    def kinds(model):
        return {n: k for n, k, _ in mup_named_parameters(model)}

    cfg = config_from_preset("tiny", tie_word_embeddings=False)
    conv, linear = BTLMLMHeadModel(cfg), _with_linear_projections(BTLMLMHeadModel(cfg))
    assert kinds(conv) == kinds(linear)
    got = kinds(conv)
    assert [got[f"transformer.h.0.{m}.weight"] for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2",
                                                          "mlp.c_proj")] == [
        "attention", "attention_output", "ffn", "ffn", "ffn_output"]
    assert (got["transformer.h.1.attn.c_attn.bias"], got["transformer.ln_f.weight"], got["transformer.ln_f.bias"],
            got["transformer.relative_pe.slopes"], got["lm_head.weight"]) == ("bias", "norm", "bias", "alibi_slopes",
                                                                             "output")
    block = {n: k for n, k, _ in mup_named_parameters(conv.transformer.h[1])}  # a block on its own
    assert all(block[n] == got[f"transformer.h.1.{n}"] for n in block)
    # the untied nn.Linear head gets the hidden init (σ·√width); the trainer puts it at lr×1 with the embedding
    torch.manual_seed(0)
    wide = BTLMLMHeadModel(config_from_preset("tiny", n_embd=256, n_head=4, mup_width_scale=0.1,
                                              tie_word_embeddings=False))
    assert wide.lm_head.weight.std().item() == pytest.approx(0.073 * math.sqrt(0.1), rel=0.03)


def test_a_trainable_parameter_without_a_mup_rule_is_refused():
    from btlm.model import BTLMLMHeadModel, config_from_preset

    model = BTLMLMHeadModel(config_from_preset("tiny"))
    model.transformer.h[0].attn.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="transformer.h.0.attn.extra"):
        build_param_groups(model, OptimizerConfig(learning_rate=1.0))
    with pytest.raises(ValueError, match="transformer.h.0.attn.extra"):
        model.get_mup_param_groups(lr=1.0)
    model.transformer.h[0].attn.extra.requires_grad_(False)  # frozen parameters are left out by both
    assert len(build_param_groups(model, OptimizerConfig(learning_rate=1.0))) == 3

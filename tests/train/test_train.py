"""The training runner end to end on a tiny model: resume, fine-tune, stage switch, NaN stop, eval, CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from btlm.cli import main as btlm_main
from btlm.train import checkpoint as ckpt
from btlm.train.config import parse_params
from btlm.train.metrics import LMEvalMetrics
from btlm.train.trainer import Runner, TrainingError

from .conftest import write_h5_dir


def train(raw, model_dir, **rc):
    raw = copy.deepcopy(raw)
    raw["runconfig"].update(rc)
    return Runner(parse_params(raw), raw, model_dir).train()


def test_train_2n_equals_train_n_stop_resume_n(tiny_raw, tmp_path):
    straight = train(tiny_raw, tmp_path / "a", max_steps=6, checkpoint_steps=0)
    first = train(tiny_raw, tmp_path / "b", max_steps=3, checkpoint_steps=0)
    second = train(tiny_raw, tmp_path / "b", max_steps=6, checkpoint_steps=0)  # same dir: auto-resume
    assert sorted(first["losses"]) == [1, 2, 3] and sorted(second["losses"]) == [4, 5, 6]
    resumed = {**first["losses"], **second["losses"]}
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight["losses"][step], abs=1e-6)
    assert straight["losses"][6] < straight["losses"][1]
    a = ckpt.load_checkpoint_file(tmp_path / "a" / "checkpoint_6.mdl")["model"]
    b = ckpt.load_checkpoint_file(tmp_path / "b" / "checkpoint_6.mdl")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_checkpoint_contents_retention_and_atomicity(tiny_raw, tmp_path):
    train(tiny_raw, tmp_path, max_steps=6, checkpoint_steps=2, max_checkpoints=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint") or p.name.startswith("."))
    assert names == ["checkpoint_4.mdl", "checkpoint_6.mdl"]  # no temp files, old ones pruned
    state = torch.load(tmp_path / "checkpoint_6.mdl", weights_only=True)  # no arbitrary unpickling
    assert {"model", "optimizer", "lr_scheduler", "dataloader", "global_step", "rng", "__metadata__"} <= set(state)
    assert state["global_step"] == 6 and state["lr_scheduler"]["last_epoch"] == 6
    assert state["dataloader"] == {"samples_streamed": 24, "seed": 0}
    assert state["__metadata__"][0]["params"]["model"]["hidden_size"] == 32
    assert (tmp_path / "train" / "params_train.yaml").is_file() and (tmp_path / "train" / "run.log").is_file()
    assert "Training completed successfully!" in (tmp_path / "train" / "run.log").read_text()
    assert list((tmp_path / "train").glob("events.out.tfevents.*"))


def test_finetune_from_weights_only_restarts_schedule(tiny_raw, tmp_path):
    train(tiny_raw, tmp_path / "pre", max_steps=3)
    res = train(tiny_raw, tmp_path / "ft", max_steps=2, checkpoint_path=str(tmp_path / "pre" / "checkpoint_3.mdl"),
                load_checkpoint_states="model")
    assert sorted(res["losses"]) == [1, 2]  # global_step not loaded -> starts at 0 with lr 0
    state = ckpt.load_checkpoint_file(tmp_path / "ft" / "checkpoint_2.mdl")
    assert state["lr_scheduler"]["last_epoch"] == 2
    with pytest.raises(ckpt.CheckpointError, match="unknown state"):
        train(tiny_raw, tmp_path / "x", checkpoint_path=str(tmp_path / "pre" / "checkpoint_3.mdl"),
              load_checkpoint_states="model,weights")


def test_stage_switch_continues_step_count_and_schedule(tiny_raw, tmp_path):
    train(tiny_raw, tmp_path, max_steps=3, checkpoint_steps=0)
    long = copy.deepcopy(tiny_raw)  # the "8k" stage: longer rows, other data, same schedule
    long["train_input"]["data_dir"] = str(write_h5_dir(tmp_path / "long", 16, 32, seed=3))
    long["model"]["max_position_embeddings"] = 32
    long["model"]["loss_weight"] = 1 / 32
    long["train_input"]["batch_size"] = 2
    res = train(long, tmp_path, max_steps=5, checkpoint_steps=0)
    assert sorted(res["losses"]) == [4, 5]
    state = ckpt.load_checkpoint_file(tmp_path / "checkpoint_5.mdl")
    assert state["lr_scheduler"]["last_epoch"] == 5
    # the loader position was not carried over from the 2k data: 2 steps x batch 2 from the start
    assert state["dataloader"]["samples_streamed"] == 4
    sched = parse_params(long).optimizer.schedule()
    assert state["optimizer"]["param_groups"][1]["lr"] == pytest.approx(sched(5))


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tiny_raw, tmp_path):
    train(tiny_raw, tmp_path, max_steps=3)
    before = (tmp_path / "checkpoint_3.mdl").read_bytes()
    raw = copy.deepcopy(tiny_raw)
    raw["optimizer"]["learning_rate"] = 1e30  # blows the weights up -> inf/NaN loss
    raw["optimizer"].pop("max_gradient_norm")
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*checkpoint_3\.mdl"):
        train(raw, tmp_path, max_steps=8, checkpoint_steps=0)
    assert (tmp_path / "checkpoint_3.mdl").read_bytes() == before
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / "checkpoint_3.mdl"]


def test_eval_metrics_hand_checkable():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]],
                                     [[0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[0, 0], [1, 2]])
    mask = torch.tensor([[1, 1], [1, 0]])
    m = LMEvalMetrics()
    m.update(logits[:1], labels[:1], mask[:1], torch.tensor(2.0))
    m.update(logits[1:], labels[1:], mask[1:], torch.tensor(4.0))
    out = m.compute()
    assert out["eval/accuracy"] == pytest.approx(2 / 3)  # argmax hits at (0,0) and (1,0); (0,1) misses
    assert out["eval/lm_perplexity"] == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.2) + math.log(0.8)) / 3))
    assert out["loss"] == 3.0


def test_cli_train_eval_eval_all_and_errors(tiny_raw, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    tiny_raw["runconfig"].update(max_steps=4, checkpoint_steps=2)
    params.write_text(yaml.safe_dump(tiny_raw))
    md = str(tmp_path / "run")
    assert run_main(["CPU", "--mode", "train", "--params", str(params), "--model_dir", md, "--max_steps", "2"]) == 0
    assert run_main(["CPU", "--mode", "train_and_eval", "--params", str(params), "--model_dir", md]) == 0
    assert [p.name for p in ckpt.list_checkpoints(md)] == ["checkpoint_2.mdl", "checkpoint_4.mdl"]
    runner = Runner(parse_params(tiny_raw), tiny_raw, md)
    results = runner.evaluate_all()
    assert sorted(results) == [2, 4] and results[4]["global_step"] == 4
    assert results[4]["loss"] < results[2]["loss"]
    capsys.readouterr()
    assert run_main(["CPU", "--mode", "eval", "--params", str(params), "--model_dir", md, "--eval_steps", "1"]) == 0
    assert "Avg Eval Loss" in (tmp_path / "run" / "eval" / "run.log").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_raw, "model": {**tiny_raw["model"], "num_heads": "four"}}))
    assert run_main(["CPU", "--mode", "train", "--params", str(bad), "--model_dir", md]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "model.num_heads" in err.split("error: ")[-1] and "Traceback" not in err
    assert run_main(["CPU", "--mode", "eval", "--params", str(params), "--model_dir", md,
                     "--checkpoint_path", str(tmp_path / "nope.mdl")]) == 1
    assert "nope.mdl does not exist" in capsys.readouterr().err


def test_grad_accumulation_and_activation_checkpointing_give_the_same_steps(tiny_raw, tmp_path):
    ref = train(tiny_raw, tmp_path / "ref", max_steps=3, checkpoint_steps=0)
    accum = copy.deepcopy(tiny_raw)
    accum["train_input"]["batch_size"] = 2
    accum["optimizer"]["grad_accum_steps"] = 2  # 2 x 2 = the same 4 samples per update
    got = train(accum, tmp_path / "accum", max_steps=3, checkpoint_steps=0, activation_checkpointing=True)
    for step in (1, 2, 3):
        assert got["losses"][step] == pytest.approx(ref["losses"][step], abs=1e-6)


def test_tensorboard_scalars(tiny_raw, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = copy.deepcopy(tiny_raw)
    raw["optimizer"]["log_summaries"] = True
    res = train(raw, tmp_path, max_steps=2, checkpoint_steps=0)
    acc = EventAccumulator(str(tmp_path / "train"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr/0", "lr/decoder_kernel", "lr/embedding", "lr/no_decay", "avg_samples_per_sec",
            "tokens_per_sec", "mfu", "grad_norm/model_wise_grad_norm", "params_norm/model_wise_params_norm"} <= tags
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([res["losses"][1], res["losses"][2]])
    assert [e.value for e in acc.Scalars("lr/embedding")] == pytest.approx([0.0, 0.005])
    assert [e.value for e in acc.Scalars("lr/decoder_kernel")] == pytest.approx([0.0, 0.001])


class _Payload:  # an arbitrary object a malicious checkpoint could smuggle in
    pass


def test_unsafe_or_foreign_checkpoints_are_refused(tiny_raw, tmp_path):
    evil = tmp_path / "checkpoint_1.mdl"
    torch.save({"model": {}, "payload": _Payload()}, evil)
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint safely"):
        ckpt.load_checkpoint_file(evil)
    cs = tmp_path / "cs" / "checkpoint_5.mdl"
    cs.parent.mkdir()
    torch.save({"model": {"model.embedding_layer.word_embeddings.weight": torch.zeros(2, 2)}}, cs)
    runner = Runner(parse_params(tiny_raw), tiny_raw, tmp_path / "cs")
    with pytest.raises(ckpt.CheckpointError, match="Cerebras CS-format checkpoint"):
        runner.evaluate()


def run_main(argv: list[str]) -> int:
    """``btlm run ARGV`` in this process."""
    return btlm_main(["run", *argv])


def _states(path):
    state = ckpt.load_checkpoint_file(path)
    return state["model"], state["optimizer"]["state"]


def _assert_same_state(path_a, path_b):
    (model_a, opt_a), (model_b, opt_b) = _states(path_a), _states(path_b)
    assert model_a.keys() == model_b.keys() and opt_a.keys() == opt_b.keys()
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k
    for k in opt_a:
        for name, v in opt_a[k].items():
            assert v.dtype == opt_b[k][name].dtype and torch.equal(v, opt_b[k][name]), (k, name)


def test_initial_checkpoint_does_not_change_training(tiny_raw, tmp_path):
    """save_initial_checkpoint writes the optimizer's empty state without taking an update (no beta power
    advanced), so the run is bit-identical to one without it, and resuming from checkpoint_0 is too."""
    off = train(tiny_raw, tmp_path / "off", max_steps=6, checkpoint_steps=0)
    on = train(tiny_raw, tmp_path / "on", max_steps=6, checkpoint_steps=0, save_initial_checkpoint=True)
    assert on["losses"] == off["losses"]
    _assert_same_state(tmp_path / "off" / "checkpoint_6.mdl", tmp_path / "on" / "checkpoint_6.mdl")
    _, initial = _states(tmp_path / "on" / "checkpoint_0.mdl")
    assert initial  # every trained parameter has its (empty) state
    for st in initial.values():
        assert float(st["beta1_power"]) == 1.0 and float(st["beta2_power"]) == 1.0
        assert st["beta1_power"].dtype == torch.float64
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    _, final = _states(tmp_path / "on" / "checkpoint_6.mdl")
    powers = torch.tensor(1.0, dtype=torch.float64)
    for _ in range(6):
        powers *= 0.9
    assert all(torch.equal(st["beta1_power"], powers) for st in final.values())

    from_zero = copy.deepcopy(tiny_raw)
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "checkpoint_0.mdl").write_bytes((tmp_path / "on" / "checkpoint_0.mdl").read_bytes())
    resumed = train(from_zero, tmp_path / "zero", max_steps=6, checkpoint_steps=0)
    assert resumed["losses"] == off["losses"]
    _assert_same_state(tmp_path / "off" / "checkpoint_6.mdl", tmp_path / "zero" / "checkpoint_6.mdl")


def _logged_losses(summary_dir):
    """Every `loss` scalar in a run's TensorBoard files (all event files, in the order written)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out = {}
    for f in sorted(summary_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag == "loss":
                    tensor = v.HasField("tensor")
                    out[event.step] = float(tensor_util.make_ndarray(v.tensor)) if tensor else v.simple_value
    return out


def test_resume_is_bitwise_identical_across_epochs_workers_and_dropout(tiny_raw, tmp_path):
    """N steps == k steps + resume, bit for bit (weights, optimizer state, every logged loss), for resume
    points before, at and after an epoch boundary, with loader workers, a shuffled order and dropout
    (the restored RNG must be the one the uninterrupted run continues with)."""
    raw = copy.deepcopy(tiny_raw)
    raw["train_input"].update(num_workers=2, shuffle=True, shuffle_seed=3)  # 48 rows / 4 = 12 steps an epoch
    raw["model"]["dropout_rate"] = 0.1
    straight = train(raw, tmp_path / "straight", max_steps=16, checkpoint_steps=4)
    logged = _logged_losses(tmp_path / "straight" / "train")
    assert sorted(logged) == list(range(1, 17))
    for k in (5, 12, 14):
        run_dir = tmp_path / f"stop{k}"
        first = train(raw, run_dir, max_steps=k, checkpoint_steps=4)
        second = train(raw, run_dir, max_steps=16, checkpoint_steps=4)  # same dir: resumes at k
        assert sorted(second["losses"]) == list(range(k + 1, 17))
        assert {**first["losses"], **second["losses"]} == straight["losses"], k
        assert _logged_losses(run_dir / "train") == logged, k
        for step in (16, *[s for s in (8, 12) if s > k]):
            _assert_same_state(tmp_path / "straight" / f"checkpoint_{step}.mdl", run_dir / f"checkpoint_{step}.mdl")


def test_measuring_the_roofline_leaves_the_global_rng_alone():
    from btlm.train.trainer import measure_peak_flops

    before = torch.get_rng_state()
    assert measure_peak_flops(torch.device("cpu"), n=32) > 0
    assert torch.equal(torch.get_rng_state(), before)  # dropout after a resume draws what it would have


def test_train_and_eval_records_each_evaluation_once_at_its_training_step(tiny_raw, tmp_path):
    """Evaluations during training land in the eval summary at the step they ran (one point each), their
    log lines in eval/run.log, and training keeps logging to train/run.log afterwards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = copy.deepcopy(tiny_raw)
    raw["runconfig"].update(max_steps=4, checkpoint_steps=0, eval_frequency=2)
    res = Runner(parse_params(raw), raw, tmp_path).train_and_eval()
    assert sorted(res["evals"]) == [2, 4] and res["global_step"] == 4
    assert res["evals"][4]["loss"] < res["evals"][2]["loss"]
    acc = EventAccumulator(str(tmp_path / "eval"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([res["evals"][2]["loss"], res["evals"][4]["loss"]])
    assert (tmp_path / "eval" / "run.log").read_text().count("Avg Eval Loss") == 2
    train_log = (tmp_path / "train" / "run.log").read_text()
    assert "Step=4," in train_log and train_log.rstrip().endswith("Training completed successfully!")

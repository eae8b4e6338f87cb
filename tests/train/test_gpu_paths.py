"""GPU-only code paths of the runner, tested on the CPU: what they hand to CUDA / NCCL / FSDP2.

No GPU is needed: the device is modelled by the ``meta`` device (on which reading a value back fails, like
a host sync would stall a GPU), and ``torch.cuda`` / ``torch.distributed`` calls are replaced by fakes that
record their arguments and behave as torch does on a machine with the given number of GPUs.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from btlm.train import checkpoint as ckpt
from btlm.train import distributed as D
from btlm.train.config import parse_params
from btlm.train.metrics import LMEvalMetrics
from btlm.train.trainer import FixedLossScaler, Runner, make_grad_scaler


# ---- eval metrics are summed on the model's device (NCCL refuses CPU tensors) ----------------------


def test_eval_metric_sums_reach_the_collective_on_the_model_device():
    device = torch.device("meta")  # stands for the GPU: nothing may be read back per batch
    logits = torch.empty(2, 5, 11, device=device)
    labels = torch.zeros(2, 5, dtype=torch.int32, device=device)
    mask = torch.ones(2, 5, dtype=torch.int32, device=device)
    metrics = LMEvalMetrics()
    for _ in range(3):
        metrics.update(logits, labels, mask, torch.empty((), device=device))
    handed = []

    def all_reduce_sum(t):
        handed.append(t)
        return t

    metrics.reduce(all_reduce_sum)
    assert [t.device for t in handed] == [device] and handed[0].dtype == torch.float64


def test_eval_metrics_reduce_sums_over_ranks():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]]))
    labels, mask = torch.tensor([[0, 2]]), torch.tensor([[1, 1]])
    m = LMEvalMetrics()
    m.update(logits, labels, mask, torch.tensor(2.0))
    m.reduce(lambda t: t * 2)  # two ranks that saw the same batch
    out = m.compute()
    assert out["loss"] == 2.0 and out["eval/accuracy"] == 1.0


# ---- fp16 loss scaling: every loss_scaling_factor form builds a working scaler ----------------------


def _optimizer_section(tiny_raw, **overrides):
    raw = copy.deepcopy(tiny_raw)
    raw["optimizer"].update(overrides)
    return parse_params(raw).optimizer


def _scaler_steps(scaler, grads):
    """One optimizer step per entry of ``grads`` (a float put in every gradient); returns the scales after
    each update and whether the parameter changed in each step."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scales, stepped = [], []
    for g in grads:
        opt.zero_grad()
        scaler.scale((w * 0).sum()).backward()
        w.grad.fill_(g)
        before = w.detach().clone()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        stepped.append(not torch.equal(before, w.detach()))
    return scales, stepped


@pytest.mark.parametrize("factor,initial,expected_scale", [(1.0, None, 1.0), (128.0, None, 128.0),
                                                           (128.0, 8.0, 8.0)])
def test_numeric_loss_scaling_factor_is_a_fixed_scale(tiny_raw, factor, initial, expected_scale):
    opt = _optimizer_section(tiny_raw, loss_scaling_factor=factor, initial_loss_scale=initial, steps_per_increase=2)
    scaler = make_grad_scaler(opt, "cpu")
    assert isinstance(scaler, FixedLossScaler)
    scales, stepped = _scaler_steps(scaler, [1.0, float("inf"), 1.0, 1.0, 1.0, 1.0])
    assert scales == [expected_scale] * 6  # neither grows after clean steps nor backs off after overflow
    assert stepped == [True, False, True, True, True, True]  # the overflowing step is skipped
    restored = make_grad_scaler(opt, "cpu")
    restored.load_state_dict(scaler.state_dict())
    assert _scaler_steps(restored, [float("inf"), 1.0])[0] == [expected_scale] * 2


@pytest.mark.parametrize("factor", ["dynamic", None])
def test_dynamic_loss_scaling(tiny_raw, factor):
    opt = _optimizer_section(tiny_raw, loss_scaling_factor=factor, initial_loss_scale=64.0, steps_per_increase=2)
    scaler = make_grad_scaler(opt, "cpu")
    scales, stepped = _scaler_steps(scaler, [1.0, 1.0, float("inf"), 1.0])
    assert scales == [64.0, 128.0, 64.0, 64.0] and stepped == [True, True, False, True]
    assert make_grad_scaler(_optimizer_section(tiny_raw, loss_scaling_factor=factor), "cpu").get_scale() == 2.0**16


# ---- CUDA RNG: each rank saves and restores its own device's generator -------------------------------


class FakeCuda:
    """``torch.cuda``'s RNG functions on a machine with ``count`` visible GPUs (device index >= count raises
    like torch); each generator state is a 16-byte tensor tagged with its device index."""

    def __init__(self, count: int, tag: int):
        self.count, self.tag, self.restored = count, tag, []

    def _index(self, device):
        index = torch.device(device).index or 0 if not isinstance(device, int) else device
        if index >= self.count:
            raise IndexError(f"device {index} out of range ({self.count} visible)")
        return index

    def get_rng_state(self, device="cuda"):
        return torch.full((16,), self.tag * 10 + self._index(device), dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.restored.append((self._index(device), state.clone()))

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        for mod in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(mod, "get_rng_state", self.get_rng_state)
            monkeypatch.setattr(mod, "set_rng_state", self.set_rng_state)
            monkeypatch.setattr(mod, "device_count", lambda: self.count)


def test_cuda_rng_state_is_per_rank_and_restores_with_fewer_visible_gpus(monkeypatch):
    # Save on a 2-GPU node: rank 1 drives cuda:1. The all-gather (what the trainer passes as `gather`)
    # brings rank 0's state of its cuda:0, tagged 0 by rank 0's process.
    rank0_state = FakeCuda(count=2, tag=0).get_rng_state(0)
    fake = FakeCuda(count=2, tag=1)
    fake.install(monkeypatch)
    state = ckpt.rng_state(torch.device("cuda", 1), gather=lambda own: [rank0_state, own])
    assert [s.tolist() for s in state["cuda_per_rank"]] == [[0] * 16, [11] * 16]  # rank 1's own cuda:1 state

    # Restore on a node where each rank sees only its own GPU (CUDA_VISIBLE_DEVICES): both use cuda:0.
    for rank in (0, 1):
        fake = FakeCuda(count=1, tag=rank)
        fake.install(monkeypatch)
        ckpt.set_rng_state(state, torch.device("cuda", 0), rank)
        assert [(i, s.tolist()) for i, s in fake.restored] == [(0, state["cuda_per_rank"][rank].tolist())]
    # A rank the checkpoint has no state for keeps its seeded generator.
    fake = FakeCuda(count=1, tag=2)
    fake.install(monkeypatch)
    ckpt.set_rng_state(state, torch.device("cuda", 0), rank=2)
    assert fake.restored == []


# ---- resume, process group, FSDP2, input validation -------------------------------------------------


def _mapping_of(address: int) -> str | None:
    """The file backing the memory mapping that holds ``address`` (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_checkpoint_tensors_are_memory_mapped_from_the_file(tmp_path):
    """Every rank of a node loads the .mdl on resume: mapped from the page cache, not one private copy each."""
    path = tmp_path / "checkpoint_1.mdl"
    ckpt.atomic_torch_save({"model": {"w": torch.arange(1 << 18, dtype=torch.float32)}, "global_step": 1}, path)
    state = ckpt.load_checkpoint_file(path)
    assert state["global_step"] == 1
    assert _mapping_of(state["model"]["w"].data_ptr()) == str(path)


def test_process_group_timeout_allows_checkpoint_sized_waits(monkeypatch, tiny_raw):
    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(D.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 2)
    D.init_distributed("CPU", "gloo", "env://", "ddp")
    D.init_distributed("CPU", "gloo", "env://", "ddp", timeout_minutes=180)
    assert [c["timeout"] for c in calls] == [timedelta(minutes=60), timedelta(minutes=180)]
    assert parse_params(tiny_raw).runconfig.dist_timeout_minutes == 60  # NCCL's own default is 10
    raw = copy.deepcopy(tiny_raw)
    raw["runconfig"]["dist_timeout_minutes"] = 120
    assert parse_params(raw).runconfig.dist_timeout_minutes == 120


def test_fsdp2_all_gathers_in_the_run_precision(monkeypatch, tiny_raw, tmp_path):
    import torch.distributed.fsdp as fsdp

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: policies.append(kw.get("mp_policy")))
    runner = Runner(parse_params(tiny_raw), tiny_raw, tmp_path, "CPU", D.DistEnv(strategy="fsdp"))
    runner.autocast_dtype = torch.bfloat16  # what _choose_precision picks for bf16 on a GPU
    runner._build_model()
    assert len(policies) == 3  # two blocks, then the root
    assert all(p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32 for p in policies)
    policies.clear()
    runner.autocast_dtype = None  # fp32 run: no policy
    runner._build_model()
    assert policies == [None, None, None]


def test_training_forward_reads_nothing_back_from_the_device(tiny_raw, tmp_path):
    """The runner's forward + loss on a device where any read-back fails (meta, standing for a GPU); the
    token ids are validated on the CPU batch instead."""
    from btlm.train.zoo_model import build_model

    params = parse_params(tiny_raw)
    runner = Runner(params, tiny_raw, tmp_path, "CPU", D.DistEnv(device=torch.device("meta")))
    model = build_model(params.model, params.optimizer, seed=0).to("meta")
    batch = {"input_ids": torch.randint(0, 97, (2, 16), dtype=torch.int32), "labels": torch.zeros(2, 16, dtype=torch.int32),
             "attention_mask": torch.ones(2, 16, dtype=torch.int32)}
    logits, _, _, loss = runner._forward_loss(model, batch)
    assert logits.device.type == "meta" and loss.shape == ()
    batch["input_ids"][1, 3] = 97
    from btlm.train.trainer import TrainingError

    with pytest.raises(TrainingError, match="token id 97, outside the model's vocab_size 97"):
        runner._forward_loss(model, batch)


def test_all_gather_tensor_single_process():
    t = torch.arange(4, dtype=torch.uint8)
    assert [x.tolist() for x in D.all_gather_tensor(t, D.DistEnv())] == [[0, 1, 2, 3]]

"""Two gloo processes (DDP and FSDP2) match one process with the same global batch; FSDP2 resumes from
its sharded torch.distributed.checkpoint directory, which `btlm convert` reads back."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from btlm.train import distributed as D
from btlm.train.config import parse_params
from btlm.train.convert import read_training_checkpoint
from btlm.train.trainer import Runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(raw, model_dir, env, **rc):
    raw = copy.deepcopy(raw)
    raw["runconfig"].update(rc)
    return Runner(parse_params(raw), raw, model_dir, "CPU", env).train()["losses"]


def _worker(rank: int, world: int, port: int, raw: dict, out: str, prefix: str = "",
            first_run: dict | None = None) -> None:
    """One rank: under DDP, then FSDP2, train to step 2 (``first_run``: extra runconfig of that run), then resume
    to step 4; rank 0 writes every step's loss to ``<out>/<prefix>losses.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    losses = {}
    for strategy in ("ddp", "fsdp"):
        env = D.init_distributed("CPU", "gloo", "env://", strategy)
        model_dir = os.path.join(out, prefix + strategy)
        losses[strategy] = _run(raw, model_dir, env, max_steps=2, distributed_strategy=strategy, **(first_run or {}))
        # resume; a .dcp directory (whose .metadata is a pickle) loads only with allow_unpickle (--allow_unpickle)
        losses[strategy].update(_run(raw, model_dir, env, max_steps=4, distributed_strategy=strategy,
                                     allow_unpickle=strategy == "fsdp"))
    torch.distributed.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out, prefix + "losses.json"), "w") as f:
            json.dump(losses, f)


def test_two_process_ddp_and_fsdp_match_one_process(tiny_raw, tmp_path):
    single = copy.deepcopy(tiny_raw)
    single["runconfig"]["checkpoint_steps"] = 2
    ref = _run(single, tmp_path / "single", D.DistEnv(), max_steps=4)

    per_rank = copy.deepcopy(single)
    per_rank["train_input"]["batch_size"] = 2  # x 2 ranks = the same global batch of 4
    # save_initial_checkpoint: writing the empty optimizer state must not change training (the one-process
    # reference does not write it)
    args = (2, _free_port(), per_rank, str(tmp_path), "", {"save_initial_checkpoint": True})
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
    got = json.loads((tmp_path / "losses.json").read_text())
    for strategy in ("ddp", "fsdp"):
        for step in range(1, 5):
            assert got[strategy][str(step)] == pytest.approx(ref[step], abs=2e-5), (strategy, step)

    assert (tmp_path / "ddp" / "checkpoint_0.mdl").is_file() and (tmp_path / "fsdp" / "checkpoint_0.dcp").is_dir()
    for st in read_training_checkpoint(tmp_path / "fsdp" / "checkpoint_0.dcp", allow_unpickle=True)["optimizer"]["state"].values():
        assert float(st["beta1_power"]) == 1.0 and not st["exp_avg"].any()  # no zero-gradient update taken
    sharded = tmp_path / "fsdp" / "checkpoint_4.dcp"
    assert sharded.is_dir() and (sharded / ".metadata").is_file()
    assert not list((tmp_path / "fsdp").glob(".*.tmp"))
    full = read_training_checkpoint(sharded, allow_unpickle=True)
    plain = read_training_checkpoint(tmp_path / "single" / "checkpoint_4.mdl")
    assert full["global_step"] == 4 and full["dataloader"] == plain["dataloader"] == {"samples_streamed": 16, "seed": 0}
    for k, v in plain["model"].items():
        torch.testing.assert_close(full["model"][k], v, rtol=1e-4, atol=2e-5)


def test_torchrun_cli_launch(tiny_raw, tmp_path):
    """`torchrun --nproc_per_node=2 -m btlm run CPU ...` (the documented launch) trains and checkpoints."""
    import subprocess
    import sys

    import yaml

    tiny_raw["train_input"]["batch_size"] = 2
    tiny_raw["runconfig"].update(max_steps=2, checkpoint_steps=0, distributed_strategy="ddp")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(tiny_raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "btlm", "run", "CPU", "--mode", "train", "--params", str(params), "--model_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2, ddp" in proc.stderr and "Training completed successfully!" in proc.stderr
    state = torch.load(tmp_path / "run" / "checkpoint_2.mdl", weights_only=True)
    assert state["global_step"] == 2 and state["dataloader"]["samples_streamed"] == 8


def test_lora_runs_on_two_processes_like_one(tiny_raw, tmp_path):
    """A LoRA run (model.lora_params) under DDP and FSDP2 matches one process, resumes, and keeps the base."""
    full = copy.deepcopy(tiny_raw)
    _run(full, tmp_path / "base", D.DistEnv(), max_steps=1, save_initial_checkpoint=True)
    base = str(tmp_path / "base" / "checkpoint_0.mdl")
    lora = copy.deepcopy(tiny_raw)
    lora["model"]["lora_params"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn", "c_proj"]}
    lora["optimizer"]["learning_rate"] = 0.02
    lora["runconfig"]["checkpoint_steps"] = 2
    ref = _run(lora, tmp_path / "single", D.DistEnv(), max_steps=4, checkpoint_path=base,
               load_checkpoint_states="model")

    per_rank = copy.deepcopy(lora)
    per_rank["train_input"]["batch_size"] = 2
    first_run = {"checkpoint_path": base, "load_checkpoint_states": "model"}
    args = (2, _free_port(), per_rank, str(tmp_path), "lora_", first_run)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
    got = json.loads((tmp_path / "lora_losses.json").read_text())
    for strategy in ("ddp", "fsdp"):
        for step in range(1, 5):
            assert got[strategy][str(step)] == pytest.approx(ref[step], abs=2e-5), (strategy, step)
    plain = read_training_checkpoint(tmp_path / "single" / "checkpoint_4.mdl")
    sharded = read_training_checkpoint(tmp_path / "lora_fsdp" / "checkpoint_4.dcp", allow_unpickle=True)
    initial = read_training_checkpoint(base)["model"]
    for k, v in plain["model"].items():
        torch.testing.assert_close(sharded["model"][k], v, rtol=1e-4, atol=2e-5)
        if ".lora_" not in k:
            assert torch.equal(sharded["model"][k], initial[k.replace(".base_layer.", ".")]), k  # frozen base
    assert sorted(sharded["optimizer"]["state"]) == sorted(k for k in plain["model"] if ".lora_" in k)

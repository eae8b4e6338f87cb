"""Data parallelism on PyTorch's own engines: DDP or FSDP2 (``fully_shard``), and distributed checkpoints.

A run is distributed when it is launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set) or when
``runconfig.enable_distributed: True`` on GPU, in which case ``btlm run`` relaunches itself under
``torchrun --nproc_per_node=<local GPUs>`` (what Model Zoo's ``run.py`` does). Multi-node: start
``torchrun --nnodes=N --node_rank=i --nproc_per_node=G --rdzv_endpoint=HOST:PORT -m btlm run GPU ...``
on every node.

Checkpoint state dicts always go through ``torch.distributed.checkpoint.state_dict`` so that the
model / optimizer layout (FQN keys) is the same for single-process, DDP and FSDP2 runs: a checkpoint
from any of them resumes in any other.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .optim import init_optimizer_state

logger = logging.getLogger("btlm.train")


@dataclass
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # "none", "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def relaunch_with_torchrun(argv: list[str], nproc: int) -> int:
    """Re-run ``btlm run`` with the same arguments under ``torchrun`` on this node; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "-m", "btlm", "run", *argv]
    logger.info("enable_distributed: relaunching on %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd)


#: Process-group timeout: collectives may wait this long, e.g. ranks at a barrier while rank 0 writes a
#: checkpoint of tens of GB (NCCL's default watchdog, 10 minutes, would abort the run).
DEFAULT_TIMEOUT_MINUTES = 60.0


def init_distributed(target_device: str, backend: str | None, init_method: str, strategy: str,
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistEnv:
    """Join the process group when launched by torchrun; pick this rank's device.

    ``timeout_minutes`` bounds every collective's wait (``runconfig.dist_timeout_minutes``)."""
    use_cuda = target_device == "GPU"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("target device GPU requested but torch.cuda.is_available() is False")
    if not launched_by_torchrun():
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistEnv(device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method=init_method,
                                timeout=timedelta(minutes=timeout_minutes))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, strategy=strategy)


def wrap_model(model: nn.Module, env: DistEnv, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP, or FSDP2 with each decoder block and then the root sharded (the documented recipe).

    ``param_dtype`` is the run's autocast dtype (None: fp32): FSDP2 then all-gathers parameters in it and
    reduces gradients in fp32, instead of all-gathering fp32 weights that autocast casts down anyway."""
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if env.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a scalar over ranks (logged values are rank means, as in the Model Zoo)."""
    if env.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def all_gather_tensor(t: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """``t`` from every rank (same shape everywhere), as CPU tensors indexed by rank. The exchange goes
    through this rank's device, since NCCL only moves device tensors."""
    if env.world_size == 1:
        return [t.cpu()]
    local = t.to(env.device)
    out = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(out, local)
    return [x.cpu() for x in out]


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def full_model_state(model: nn.Module) -> dict:
    """The whole model state dict (FQN keys) on every rank, on the CPU."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state (FQN keys) on the CPU; empty state is created without an update."""
    init_optimizer_state(optimizer)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict, strict: bool = True):
    """Load a full (unsharded) model state dict into a plain, DDP or FSDP2 model."""
    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    init_optimizer_state(optimizer)  # the template PyTorch fills must not come from a zero-gradient step
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict, env: DistEnv) -> None:
    """FSDP2 checkpoint: a ``torch.distributed.checkpoint`` directory written by all ranks.

    Written to a temp directory that rank 0 renames once every rank is done, so a crash never leaves
    a directory with a checkpoint name. Non-tensor state (step, scheduler, data position, params)
    goes into ``extra.pt`` (weights_only-loadable).
    """
    import torch.distributed.checkpoint as dcp

    from .checkpoint import atomic_torch_save

    tmp = path.with_name(f".{path.name}.tmp")
    if env.is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(env)
    init_optimizer_state(optimizer)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    if env.is_main:
        atomic_torch_save(extra, tmp / "extra.pt")
    barrier(env)
    if env.is_main:
        os.replace(tmp, path)
    barrier(env)


def sharded_keys(path: Path) -> list[str]:
    """The model state keys of a ``.dcp`` directory (from its ``.metadata``, a pickle: trusted dirs only)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return [k.removeprefix("model.") for k in keys if k.startswith("model.")]


def load_sharded_renamed(path: Path, model: nn.Module, checkpoint_key) -> None:
    """Load the model weights of a ``.dcp`` directory whose keys differ from the model's:
    ``checkpoint_key(fqn)`` is the checkpoint's key of each model key, or None for a key it lacks (left as
    it is)."""
    import torch.distributed.checkpoint as dcp

    own = get_model_state_dict(model)
    names = {fqn: checkpoint_key(fqn) for fqn in own}
    template = {name: own[fqn] for fqn, name in names.items() if name is not None}
    dcp.load({"model": template}, checkpoint_id=str(path))
    set_model_state_dict(model, {fqn: template[name] for fqn, name in names.items() if name is not None},
                         options=StateDictOptions(strict=False))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, strict: bool = True) -> dict:
    """Load a ``.dcp`` checkpoint directory into the (possibly sharded) model / optimizer; returns extra."""
    import torch.distributed.checkpoint as dcp

    from .checkpoint import load_checkpoint_file

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        init_optimizer_state(optimizer)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=strict))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return load_checkpoint_file(path / "extra.pt")

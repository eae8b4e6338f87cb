"""Training checkpoints: ``<model_dir>/checkpoint_<global_step>.mdl``, written atomically.

Contents follow the Model Zoo checkpoint layout: ``model``, ``optimizer``, ``lr_scheduler``,
``dataloader``, ``grad_scaler`` (when used), ``global_step``, ``rng`` and ``__metadata__`` (the params).
Only tensors and plain Python containers / numbers / strings are stored, so every checkpoint loads
with ``torch.load(weights_only=True)`` — nothing arbitrary is ever unpickled. Model keys are the HF
BTLM names (``transformer.h.0.attn.c_attn.weight``), so ``btlm convert`` is a plain copy.

FSDP2 runs write ``checkpoint_<step>.dcp/``, a ``torch.distributed.checkpoint`` directory (one shard
file per rank); see :mod:`btlm.train.distributed`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from btlm.errors import BTLMError

logger = logging.getLogger("btlm.train")

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)(?:_(\d{8}_\d{6}))?\.(mdl|dcp)$")
#: States ``--load_checkpoint_states`` may name (the Model Zoo set).
LOADABLE_STATES = ("model", "optimizer", "dataloader", "grad_scaler", "lr_scheduler", "global_step")
FORMAT_VERSION = 1


class CheckpointError(BTLMError, RuntimeError):
    """A checkpoint that cannot be found, read or applied (the message names the file)."""


def list_checkpoints(model_dir: str | Path) -> list[Path]:
    """Checkpoints in ``model_dir`` sorted by (step, timestamp); temp files and other names are skipped."""
    found = []
    for p in Path(model_dir).glob("checkpoint_*"):
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append(((int(m.group(1)), m.group(2) or ""), p))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    m = CHECKPOINT_RE.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint name (expected checkpoint_<step>.mdl)")
    return int(m.group(1))


def latest_checkpoint(model_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(model_dir)
    return ckpts[-1] if ckpts else None


def new_checkpoint_path(model_dir: str | Path, step: int, suffix: str = ".mdl") -> Path:
    """``checkpoint_<step>.mdl``, or with a timestamp when that name is taken (Model Zoo rule)."""
    path = Path(model_dir) / f"checkpoint_{step}{suffix}"
    if path.exists():
        path = Path(model_dir) / f"checkpoint_{step}_{time.strftime('%Y%m%d_%H%M%S')}{suffix}"
    return path


def prune_checkpoints(model_dir: str | Path, max_checkpoints: int | None) -> list[Path]:
    """Delete all but the newest ``max_checkpoints`` checkpoints; returns the removed paths."""
    if not max_checkpoints:
        return []
    old = list_checkpoints(model_dir)[:-max_checkpoints]
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        logger.info("Removed old checkpoint %s (max_checkpoints=%d)", p.name, max_checkpoints)
    return old


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace``.

    A crash mid-write leaves the previous checkpoint untouched and no file with a checkpoint name.
    """
    from btlm.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a ``.mdl`` checkpoint safely (``weights_only=True``) onto the CPU, memory-mapped (``mmap=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        # mmap: tensors are read from the page cache on demand, so ranks of one node share one copy
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: cannot load checkpoint safely ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def parse_load_states(spec: str | None) -> set[str]:
    """``--load_checkpoint_states model,optimizer`` → a set; unknown names are an error."""
    if not spec:
        return set(LOADABLE_STATES)
    states = {s.strip() for s in spec.split(",") if s.strip()}
    bad = sorted(states - set(LOADABLE_STATES))
    if bad:
        raise CheckpointError(f"--load_checkpoint_states: unknown state(s) {bad}; choose from {list(LOADABLE_STATES)}")
    return states


# ---- RNG state, stored as tensors and plain numbers only (weights_only-safe) ------------------------


def rng_state(device: torch.device | None = None, gather=None) -> dict:
    """The RNG states to checkpoint. With a CUDA ``device`` (this rank's), ``"cuda_per_rank"`` holds every
    rank's generator state of its *own* device, indexed by rank: ``gather`` maps this rank's state tensor
    to the list over ranks (an all-gather; default: this process alone)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if device is not None and device.type == "cuda":
        own = torch.cuda.get_rng_state(device)
        state["cuda_per_rank"] = gather(own) if gather is not None else [own]
    return state


def set_rng_state(state: dict, device: torch.device | None = None, rank: int = 0) -> None:
    """Restore :func:`rng_state`; rank ``rank`` takes its own saved CUDA state onto its ``device``. A
    rank the checkpoint has no state for (more ranks than when it was written) keeps its seeded state.
    Only this rank's device is touched, so fewer visible GPUs than at save time are fine."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    per_rank = state.get("cuda_per_rank")
    if device is not None and device.type == "cuda" and per_rank is not None:
        if rank < len(per_rank):
            torch.cuda.set_rng_state(per_rank[rank], device)
        else:
            logger.warning("checkpoint has CUDA RNG states for %d rank(s); rank %d keeps its seeded state",
                           len(per_rank), rank)

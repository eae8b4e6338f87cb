"""One ``btlm run``: merge the command-line settings into the params, check the machine, take the
model_dir lock (train modes), set up distributed training and dispatch the mode to the
:class:`~btlm.train.trainer.Runner`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from btlm.errors import BTLMError

logger = logging.getLogger("btlm.train")

#: Settings the command line may give; a given one overrides ``runconfig`` (Model Zoo merge rule).
RUNCONFIG_OVERRIDES = ("mode", "model_dir", "checkpoint_path", "load_checkpoint_states",
                       "disable_strict_checkpoint_loading", "logging", "max_steps", "eval_steps", "num_steps",
                       "num_epochs", "dist_backend", "init_method", "target_device", "allow_unpickle")
TRAIN_MODES = ("train", "train_and_eval")


def merge_overrides(raw: dict, overrides: dict) -> dict:
    """Model Zoo merge rule: a command-line value, when given (not None), overrides ``runconfig``;
    otherwise the YAML's stands."""
    raw = dict(raw)
    rc = dict(raw.get("runconfig") or {})
    for key in RUNCONFIG_OVERRIDES:
        if overrides.get(key) is not None:
            rc[key] = overrides[key]
    rc.setdefault("model_dir", "./model_dir")
    raw["runconfig"] = rc
    return raw


def run(params_path: str, target_device: str, mode: str, overrides: dict, argv: list[str],
        progress: bool | None = None) -> int:
    """Validate, set up (distributed) and run ``mode``; ``argv`` is passed on when relaunching under
    torchrun; ``progress`` None shows bars when stderr is a terminal. Returns the exit status."""
    import torch

    from btlm.io import model_dir_lock
    from btlm.train import distributed as D
    from btlm.train.config import load_params, parse_params
    from btlm.train.trainer import Runner

    _, raw = load_params(params_path)
    raw = merge_overrides(raw, {**overrides, "mode": mode, "target_device": target_device})
    params = parse_params(raw, params_path)
    rc = params.runconfig
    if target_device == "GPU" and not torch.cuda.is_available():
        raise BTLMError("btlm run GPU: this PyTorch sees no CUDA GPU; use btlm run CPU")
    model_dir = Path(rc.model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise BTLMError(f"--model_dir {model_dir} is a file; expected a directory")

    if mode in ("eval", "eval_all") and not rc.checkpoint_path:
        from btlm.train.checkpoint import list_checkpoints

        if not model_dir.is_dir() or not list_checkpoints(model_dir):
            raise BTLMError(f"{mode}: no checkpoint_<step>.mdl in --model_dir {model_dir} (and no --checkpoint_path): "
                            "nothing to evaluate")
    if rc.enable_distributed and not D.launched_by_torchrun():
        if target_device == "GPU" and torch.cuda.device_count() > 1:
            return D.relaunch_with_torchrun(argv, torch.cuda.device_count())
        print("btlm run: enable_distributed with a single local device: running one process "
              "(launch under torchrun --nproc_per_node=N for N processes)", file=sys.stderr)
    import contextlib
    import os

    # One process per model_dir trains: rank 0 holds the lock (torchrun stops the others if it fails).
    lock = (model_dir_lock(model_dir) if mode in TRAIN_MODES and os.environ.get("RANK", "0") == "0"
            else contextlib.nullcontext())
    with lock:
        env = D.init_distributed(target_device, rc.dist_backend, rc.init_method, rc.distributed_strategy,
                                 rc.dist_timeout_minutes)
        try:
            runner = Runner(params, raw, rc.model_dir, target_device, env, progress=progress)
            if mode == "train":
                runner.train()
            elif mode == "eval":
                runner.evaluate()
            elif mode == "eval_all":
                runner.evaluate_all()
            else:
                runner.train_and_eval()
        finally:
            if env.world_size > 1:
                import torch.distributed as dist

                dist.destroy_process_group()
    return 0

"""What a run writes besides its log: checkpoints (:class:`Checkpointer`) and TensorBoard scalars
(:class:`MetricsWriter`). Each object has one job; :class:`~btlm.train.trainer.Runner` drives both."""

from __future__ import annotations

import logging
from pathlib import Path

from . import checkpoint as ckpt
from . import distributed as D

logger = logging.getLogger("btlm.train")


class Checkpointer:
    """Finds, reads, writes and prunes ``<model_dir>/checkpoint_<step>`` files for one process.

    ``last_written`` is the newest checkpoint this object saved (None until the first save); the checkpoint a
    run resumed from is the caller's to keep (see :meth:`resume_path`).
    """

    def __init__(self, model_dir: Path, rc, env: D.DistEnv, raw: dict):
        self.model_dir, self.rc, self.env, self.raw = model_dir, rc, env, raw
        self.last_written: Path | None = None

    def resume_path(self) -> Path | None:
        """``--checkpoint_path``, else (with ``autoload_last_checkpoint``) the newest in model_dir, else None."""
        if self.rc.checkpoint_path:
            path = Path(self.rc.checkpoint_path)
            if not path.exists():
                raise ckpt.CheckpointError(f"--checkpoint_path {path} does not exist")
            self._check_unpickle(path)
            return path
        if self.rc.autoload_last_checkpoint:
            path = ckpt.latest_checkpoint(self.model_dir)
            if path is not None:
                self._check_unpickle(path)
            return path
        return None

    def _check_unpickle(self, path: Path) -> None:
        """A ``.dcp`` directory's ``.metadata`` is a pickle (code runs when it loads): only with ``allow_unpickle``."""
        if path.is_dir() and not self.rc.allow_unpickle:
            raise ckpt.CheckpointError(
                f"{path} is a torch.distributed.checkpoint directory, whose .metadata is a pickle that can run code; "
                "pass --allow_unpickle to load it (only if you wrote it), or --checkpoint_path a .mdl checkpoint")

    def read(self, path: Path, model, optimizer) -> dict:
        """Load model (+ optimizer for train) from ``path``; returns the remaining states.

        A LoRA run (adapters in ``model``) started from a checkpoint without adapters takes only its weights,
        as the frozen base, and keeps its fresh adapters; nothing else of that checkpoint applies (it returns
        no states: step 0, fresh optimizer, data from the start)."""
        from .lora import is_adapter_key

        strict = not self.rc.disable_strict_checkpoint_loading
        lora = any(is_adapter_key(n) for n, _ in D.unwrap(model).named_parameters())
        if path.is_dir():
            if lora and not any(is_adapter_key(k) for k in D.sharded_keys(path)):
                self._read_lora_base(path, model)
                return {}
            return D.load_sharded(path, model, optimizer, strict=strict)
        state = ckpt.load_checkpoint_file(path)
        if "model" not in state:
            raise ckpt.CheckpointError(f"{path}: no 'model' state in the checkpoint")
        model_state = state["model"]
        if any(k.startswith("model.") for k in model_state):
            raise ckpt.CheckpointError(f"{path}: model keys start with 'model.' (a Cerebras CS-format checkpoint); "
                                       "convert it to the HF layout with the Model Zoo's convert_checkpoint.py, then "
                                       "`btlm convert from-hf`")
        if any(is_adapter_key(k) for k in model_state) and not lora:
            raise ckpt.CheckpointError(f"{path} holds LoRA adapters but the params have no model.lora_params: add the "
                                       "run's lora_params, or write a merged model with btlm convert to-hf --merge-lora")
        if lora and not any(is_adapter_key(k) for k in model_state):
            self._read_lora_base(path, model, model_state)
            return {}
        try:
            D.load_full_model_state(model, model_state, strict=strict)
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{path}: model weights do not fit this model config: {err}. "
                                       "Use --disable_strict_checkpoint_loading to load partially") from None
        if optimizer is not None and "optimizer" in state:
            D.load_full_optimizer_state(model, optimizer, state["optimizer"])
        return state

    def _read_lora_base(self, path: Path, model, base_state: dict | None = None) -> None:
        """The weights of a checkpoint without adapters (``base_state`` of a ``.mdl`` file, else the ``.dcp``
        directory ``path``) as the base of a LoRA model; the adapters stay as initialised."""
        from .lora import base_key, base_state_to_lora, is_adapter_key

        logger.info("LoRA: base weights from %s (its optimizer, step and data position do not apply); "
                    "adapters freshly initialised", path)
        if base_state is None:
            try:
                D.load_sharded_renamed(path, model, base_key)
            except Exception as err:  # noqa: BLE001 - dcp names the missing keys; re-raised with the path
                raise ckpt.CheckpointError(f"{path}: base weights do not fit this model config ({err})") from None
            return
        state = base_state_to_lora(D.unwrap(model), base_state)
        missing, unexpected = D.load_full_model_state(model, state, strict=False)
        missing = [k for k in missing if not is_adapter_key(k)]
        if (missing or unexpected) and not self.rc.disable_strict_checkpoint_loading:
            raise ckpt.CheckpointError(f"{path}: base weights do not fit this model config: missing {missing[:5]}, "
                                       f"unexpected {unexpected[:5]}")

    def save(self, step: int, model, optimizer, scheduler, loader, scaler) -> Path:
        """Write ``checkpoint_<step>`` (every rank takes part), then prune to ``max_checkpoints``."""
        extra = {
            "lr_scheduler": scheduler.state_dict(),
            "global_step": step,
            "rng": ckpt.rng_state(self.env.device, gather=lambda t: D.all_gather_tensor(t, self.env)),
            "__metadata__": [{"format_version": ckpt.FORMAT_VERSION, "model_name": "BTLMLMHeadModel",
                              "params": self.raw}],
        }
        if loader is not None and hasattr(loader, "state_dict"):
            extra["dataloader"] = loader.state_dict()
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()
        if self.env.strategy == "fsdp":
            path = ckpt.new_checkpoint_path(self.model_dir, step, ".dcp")
            D.save_sharded(path, model, optimizer, extra, self.env)
        else:
            model_state = D.full_model_state(model)
            optim_state = D.full_optimizer_state(model, optimizer)
            path = ckpt.new_checkpoint_path(self.model_dir, step)
            if self.env.is_main:
                ckpt.atomic_torch_save({"model": model_state, "optimizer": optim_state, **extra}, path)
            D.barrier(self.env)
        if self.env.is_main:
            logger.info("Saved checkpoint %s", path)
            ckpt.prune_checkpoints(self.model_dir, self.rc.max_checkpoints)
        D.barrier(self.env)
        self.last_written = path
        return path


class MetricsWriter:
    """TensorBoard scalars of one summary directory. Only the main process writes: on the others
    (``log_dir=None``) every call is a no-op, so callers never test which process they are on."""

    def __init__(self, log_dir: Path | None):
        self._tb = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

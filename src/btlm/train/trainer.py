"""The training and evaluation loops behind ``btlm run`` (Model Zoo ``run_cstorch_train`` / ``_eval``).

One :class:`Runner` per process holds the validated params, the model (plain, DDP or FSDP2), and the
run directory layout::

    <model_dir>/checkpoint_<step>.mdl           # checkpoints (FSDP2: checkpoint_<step>.dcp/)
    <model_dir>/<mode>/params_<mode>.yaml       # the merged params of this run
    <model_dir>/<mode>/run.log                  # the log file
    <model_dir>/<mode>/events.out.tfevents.*    # TensorBoard scalars
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from tqdm import tqdm


from . import checkpoint as ckpt
from . import distributed as D
from .config import InputConfig, Params
from .metrics import LMEvalMetrics
from .modeling import build_model, lm_loss
from .optim import ScheduledLR, build_optimizer
from btlm.errors import BTLMError

logger = logging.getLogger("btlm.train")


class TrainingError(BTLMError, RuntimeError):
    """A run that cannot continue (NaN loss, nothing to train, bad resume); the message says why."""


# ---- helpers --------------------------------------------------------------------------------------


def make_dataloader(cfg: InputConfig, env: D.DistEnv):
    """The ``GptHDF5MapDataProcessor`` DataLoader for a ``train_input`` / ``eval_input`` section.

    Each data-parallel rank reads a disjoint share (whole batches dealt round-robin, as Model Zoo's sampler does).
    """
    from btlm.data.loader import IGNORED_KEYS, KNOWN_KEYS, GptHDF5MapDataProcessor

    # Unknown keys were already reported by the params check; pass only what the loader knows.
    params = {k: v for k, v in cfg.model_dump(exclude_none=True).items() if k in KNOWN_KEYS | IGNORED_KEYS}
    return GptHDF5MapDataProcessor(params, rank=env.rank, world_size=env.world_size).create_dataloader()


class FixedLossScaler(torch.amp.GradScaler):
    """A constant fp16 loss scale (a numeric ``loss_scaling_factor``): like dynamic scaling, a step whose
    gradients overflow is skipped, but the scale never changes. (``GradScaler`` itself refuses
    ``growth_factor=1.0``, so the scale is pinned at each ``update`` instead.)"""

    def __init__(self, device: str, scale: float):
        super().__init__(device, init_scale=scale)
        self.fixed_scale = float(scale)

    def update(self, new_scale=None) -> None:
        super().update(self.fixed_scale if new_scale is None else new_scale)


def make_grad_scaler(opt, device_type: str) -> torch.amp.GradScaler:
    """The fp16 gradient scaler for an ``optimizer`` section: ``loss_scaling_factor: dynamic`` (or null)
    grows ×2 every ``steps_per_increase`` clean steps from ``initial_loss_scale`` (default 2^16) and halves
    on overflow; a number is a fixed scale (``initial_loss_scale``, when set, takes precedence)."""
    if opt.loss_scaling_factor in ("dynamic", None):
        return torch.amp.GradScaler(device_type, init_scale=opt.initial_loss_scale or 2.0**16, growth_factor=2.0,
                                    backoff_factor=0.5, growth_interval=opt.steps_per_increase)
    return FixedLossScaler(device_type, opt.initial_loss_scale or float(opt.loss_scaling_factor))


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Model FLOPs per trained token: ``6·N + 6·L·T·d`` (N = matmul parameters incl. the LM head;
    the second term is causal attention's QKᵀ and AV, fwd + bwd). Recomputation under activation
    checkpointing is not counted (it is *model* FLOPs utilisation)."""
    cfg = model.config
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    n_matmul += cfg.vocab_size * cfg.n_embd
    return 6.0 * n_matmul + 6.0 * cfg.n_layer * seq_len * cfg.n_embd


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """The machine's own matmul roofline (FLOP/s of an n³ matmul) — the peak MFU is stated against."""
    gen = torch.Generator(device).manual_seed(0)  # not the global RNG: it drives dropout, and resumes restore it
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3 or reps < 2:
        torch.mm(a, b)
        reps += 1
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def setup_logging(log_file: Path | None, level: str | int | None, is_main: bool) -> None:
    """Console + ``run.log`` handlers on the ``btlm.train`` logger (main process only writes)."""
    level = level or "INFO"
    if isinstance(level, str):
        level = logging.getLevelName(level.upper()) if not level.isdigit() else int(level)
        if not isinstance(level, int):  # TRACE / VERBOSE (Cerebras levels) are below DEBUG
            level = logging.DEBUG
    logger.setLevel(level if is_main else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)


def write_params_yaml(raw: dict, path: Path) -> None:
    from btlm.io import atomic_write

    atomic_write(path, yaml.safe_dump(raw, sort_keys=False))


# ---- the runner ----------------------------------------------------------------------------------


class Runner:
    """Builds everything for one process and runs ``train`` / ``eval`` / ``eval_all``."""

    def __init__(self, params: Params, raw: dict, model_dir: str | Path, target_device: str = "CPU",
                 env: D.DistEnv | None = None, progress: bool | None = None):
        self.params, self.raw = params, raw
        self.rc = params.runconfig
        self.model_dir = Path(model_dir)
        self.target_device = target_device
        #: progress bars: None = when stderr is a terminal (tqdm's rule); only the main process shows them
        self.progress = progress
        self.env = env or D.DistEnv(device=torch.device("cuda" if target_device == "GPU" else "cpu"))
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        self.autocast_dtype = None  # chosen (and logged) when the run's logging is set up

    # ---- setup ------------------------------------------------------------------------------------

    def _choose_precision(self) -> torch.dtype | None:
        m = self.params.model
        if not m.mixed_precision:
            return None
        if self.env.device.type == "cpu":  # bf16 only where this CPU runs it faster (btlm.precision)
            from btlm.precision import choose_cpu_dtype

            choice = choose_cpu_dtype()
            logger.info("mixed_precision on CPU: %s autocast, %s", choice.name, choice.reason)
            return torch.bfloat16 if choice.dtype == torch.bfloat16 else None
        if m.fp16_type == "cbfloat16":
            logger.warning("fp16_type cbfloat16 is a Cerebras format; using bfloat16")
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}[m.half_dtype]

    def _bars_off(self) -> bool | None:
        """tqdm's ``disable``: None lets tqdm decide by the terminal."""
        if not self.env.is_main:
            return True
        return None if self.progress is None else not self.progress

    def _summary_dir(self, mode: str) -> Path:
        return Path(self.rc.summary_dir) if self.rc.summary_dir else self.model_dir / mode

    def _open_run(self, mode: str) -> None:
        out = self._summary_dir(mode)
        if self.env.is_main:
            write_params_yaml(self.raw, out / f"params_{mode}.yaml")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out))
        setup_logging(out / "run.log", self.rc.logging, self.env.is_main)
        from .config import report_extra_keys

        report_extra_keys(self.params)
        self.autocast_dtype = self._choose_precision()

    def _close_run(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def _build_model(self):
        model = build_model(self.params.model, self.params.optimizer, seed=self.rc.seed)
        model.config._attn_implementation = self.rc.attn_implementation
        model.to(self.env.device)
        if self.rc.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model = D.wrap_model(model, self.env, param_dtype=self.autocast_dtype)
        if self.rc.compile:
            model.compile()
        return model

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _check_data(self, loader, cfg: InputConfig) -> None:
        """The rows must fit the model: msl within max_position_embeddings (checked before any step)."""
        msl, limit = getattr(loader.dataset, "msl", None), self.params.model.max_position_embeddings
        if msl is not None and msl > limit:
            raise TrainingError(f"data_dir {cfg.data_dir or cfg.mixture}: rows of {msl} tokens exceed the model's "
                                f"max_position_embeddings {limit}")

    def _forward_loss(self, model, batch):
        # Checked here, on the CPU batch: the model does not read ids back from an accelerator (a sync).
        ids = batch["input_ids"]
        vocab = self.params.model.vocab_size
        if int(ids.max()) >= vocab or int(ids.min()) < 0:  # the embedding lookup would fail with an index error
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise TrainingError(f"the data holds token id {bad}, outside the model's vocab_size {vocab} "
                                "(data prepared with another tokenizer?)")
        input_ids = ids.to(self.env.device, non_blocking=True).long()
        labels = batch["labels"].to(self.env.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.env.device, non_blocking=True)
        with self._autocast():
            # attention_mask is the *loss* mask in Model Zoo data: attention stays causal over the
            # packed row (documents attend across EOS), so it is not passed to the model.
            logits = model(input_ids=input_ids, use_cache=False).logits
        return logits, labels, mask, lm_loss(logits, labels, mask, self.params.model)

    # ---- checkpoints --------------------------------------------------------------------------------

    def _resolve_checkpoint(self) -> Path | None:
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

    def _read_checkpoint(self, path: Path, model, optimizer) -> dict:
        """Load model (+ optimizer for train) from ``path``; returns the remaining states."""
        strict = not self.rc.disable_strict_checkpoint_loading
        if path.is_dir():
            return D.load_sharded(path, model, optimizer, strict=strict)
        state = ckpt.load_checkpoint_file(path)
        if "model" not in state:
            raise ckpt.CheckpointError(f"{path}: no 'model' state in the checkpoint")
        model_state = state["model"]
        if any(k.startswith("model.") for k in model_state):
            raise ckpt.CheckpointError(f"{path}: model keys start with 'model.' (a Cerebras CS-format checkpoint); "
                                       "convert it to the HF layout with the Model Zoo's convert_checkpoint.py, then "
                                       "`btlm convert from-hf`")
        try:
            D.load_full_model_state(model, model_state, strict=strict)
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{path}: model weights do not fit this model config: {err}. "
                                       "Use --disable_strict_checkpoint_loading to load partially") from None
        if optimizer is not None and "optimizer" in state:
            D.load_full_optimizer_state(model, optimizer, state["optimizer"])
        return state

    def _save_checkpoint(self, step: int, model, optimizer, scheduler, loader, scaler) -> Path:
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
        return path

    def _same_data(self, state: dict) -> bool:
        """Whether a checkpoint's data-loader position applies here (not across the 2k → 8k switch)."""
        try:
            old = state["__metadata__"][0]["params"]["train_input"]
        except (KeyError, IndexError, TypeError):
            return True
        new = self.raw.get("train_input", {})
        keys = ("data_dir", "mixture", "batch_size", "shuffle", "shuffle_seed")
        return all(old.get(k) == new.get(k) for k in keys)

    # ---- train --------------------------------------------------------------------------------------

    def _target_step(self, start: int, steps_per_epoch: int | None) -> int:
        limits = []
        if self.rc.max_steps:
            limits.append(self.rc.max_steps)
        if self.rc.num_steps:
            limits.append(start + self.rc.num_steps)
        if self.rc.num_epochs:
            if not steps_per_epoch:
                raise TrainingError("num_epochs needs a data loader with a known length")
            limits.append(start + self.rc.num_epochs * (self.rc.steps_per_epoch or steps_per_epoch))
        if not limits:
            raise TrainingError("runconfig needs max_steps, num_steps or num_epochs to train")
        return min(limits)

    def train(self, eval_hook=None) -> dict:
        """Train until the target step; returns ``{"global_step", "losses", "checkpoint"}``.

        ``losses`` maps each global step run here to its (rank-averaged) loss.
        """
        p, rc, env = self.params, self.rc, self.env
        if p.optimizer is None or p.train_input is None:
            raise TrainingError("train mode needs 'optimizer' and 'train_input' sections in the params")
        self._open_run("train")
        loader = make_dataloader(p.train_input, env)  # before the model: bad data fails before any compute
        self._check_data(loader, p.train_input)
        model = self._build_model()
        optimizer = build_optimizer(D.unwrap(model), p.optimizer, p.model)
        scheduler = ScheduledLR(optimizer, p.optimizer.schedule())
        scaler = None
        if self.autocast_dtype == torch.float16:
            scaler = make_grad_scaler(p.optimizer, env.device.type)

        global_step = 0
        last_ckpt = self._resolve_checkpoint()
        if last_ckpt is not None:
            states = ckpt.parse_load_states(rc.load_checkpoint_states)
            logger.info("Loading checkpoint %s (states: %s)", last_ckpt, ", ".join(sorted(states)))
            state = self._read_checkpoint(last_ckpt, model, optimizer if "optimizer" in states else None)
            if "optimizer" not in states:  # weights only: fresh optimizer state
                optimizer = build_optimizer(D.unwrap(model), p.optimizer, p.model)
                scheduler = ScheduledLR(optimizer, p.optimizer.schedule())
            if "global_step" in states:
                global_step = int(state.get("global_step", 0))
            if "lr_scheduler" in states and "lr_scheduler" in state:
                scheduler.load_state_dict(state["lr_scheduler"])
            elif global_step:  # keep the schedule aligned with the step count
                scheduler.load_state_dict({"last_epoch": global_step})
            if "dataloader" in states and "dataloader" in state and hasattr(loader, "load_state_dict"):
                if self._same_data(state):
                    loader.load_state_dict(state["dataloader"])
                else:
                    logger.info("Not restoring the data-loader position: train_input differs from the "
                                "checkpoint's (e.g. the 2k -> 8k stage switch); reading from the start")
            if "grad_scaler" in states and scaler is not None and "grad_scaler" in state:
                scaler.load_state_dict(state["grad_scaler"])
            if "rng" in state and "global_step" in states:
                ckpt.set_rng_state(state["rng"], env.device, env.rank)
        elif rc.checkpoint_path is None:
            logger.info("No checkpoint in %s: training from a fresh initialisation", self.model_dir)

        accum = p.optimizer.grad_accum_steps
        try:
            steps_per_epoch = len(loader) // accum
        except TypeError:
            steps_per_epoch = None
        target = self._target_step(global_step, steps_per_epoch)
        result = {"global_step": global_step, "losses": {}, "checkpoint": last_ckpt}
        if target <= global_step:
            logger.info("Already at step %d (target %d): nothing to train", global_step, target)
            self._close_run()
            return result

        if rc.save_initial_checkpoint and global_step == 0:
            last_ckpt = self._save_checkpoint(0, model, optimizer, scheduler, loader, scaler)

        base = D.unwrap(model)
        msl = None
        peak = rc.peak_flops or measure_peak_flops(env.device, self.autocast_dtype or torch.float32)
        logger.info("Training steps %d -> %d on %s (world size %d, %s); MFU peak %.1f GFLOP/s per process (%s)",
                    global_step, target, env.device, env.world_size, env.strategy, peak / 1e9,
                    "runconfig.peak_flops" if rc.peak_flops else "measured matmul roofline")
        model.train()
        data_iter = iter(loader)
        start_step = global_step
        t_start = time.perf_counter()
        t_last, samples_since, samples_total = t_start, 0, 0
        bar = tqdm(total=target - global_step, desc="train", unit="step", disable=self._bars_off())
        while global_step < target:
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(accum):
                try:
                    batch = next(data_iter)
                except StopIteration:  # next epoch
                    data_iter = iter(loader)
                    batch = next(data_iter)
                sync_ctx = nullcontext()
                if micro < accum - 1 and env.strategy == "ddp":
                    sync_ctx = model.no_sync()
                elif env.strategy == "fsdp":
                    model.set_requires_gradient_sync(micro == accum - 1)
                with sync_ctx:
                    _, _, _, loss = self._forward_loss(model, batch)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += scaled.detach()
                msl = batch["input_ids"].shape[1]
                samples_since += batch["input_ids"].shape[0] * env.world_size
            loss_value = float(D.all_reduce_mean(loss_sum, env))
            if rc.check_loss_values and not math.isfinite(loss_value):
                bar.close()
                self._close_run()
                raise TrainingError(f"loss is {loss_value} at step {global_step + 1}; stopping before the update. "
                                    f"Last good checkpoint: {last_ckpt or 'none'}")
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [q for g in optimizer.param_groups for q in g["params"]]
            max_norm = p.optimizer.max_gradient_norm or float("inf")  # always clip when set (fixes CPU quirk)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            if p.optimizer.max_gradient_value:
                torch.nn.utils.clip_grad_value_(params, p.optimizer.max_gradient_value)
            lrs = [g["lr"] for g in optimizer.param_groups]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            result["losses"][global_step] = loss_value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")

            first_of_run = not samples_total and global_step == start_step + 1  # shows the starting loss
            if global_step % rc.log_steps == 0 or global_step == target or first_of_run:
                now = time.perf_counter()
                rate = samples_since / max(now - t_last, 1e-9)
                samples_total += samples_since
                avg = samples_total / max(now - t_start, 1e-9)
                tok_rate = rate * msl
                mfu = tok_rate / env.world_size * flops_per_token(base, msl) / peak
                pnorm = _param_norm(params)  # collective under FSDP2: every rank computes it
                logger.info("| Train Device=%s, Step=%d, Loss=%.5f, LR=%s, Rate=%.2f samples/sec, "
                            "GlobalRate=%.2f samples/sec, Tokens/sec=%.0f, MFU=%.1f%%, GradNorm=%.4f",
                            env.device.type.upper(), global_step, loss_value,
                            "/".join(f"{lr:.3e}" for lr in lrs), rate, avg, tok_rate, 100 * mfu, float(grad_norm))
                if self.writer is not None:
                    w = self.writer
                    w.add_scalar("loss", loss_value, global_step)
                    for i, (g, lr) in enumerate(zip(optimizer.param_groups, lrs)):
                        w.add_scalar(f"lr/{i}", lr, global_step)
                        w.add_scalar(f"lr/{g.get('name', i)}", lr, global_step)
                    w.add_scalar("local_samples_per_sec", rate / env.world_size, global_step)
                    w.add_scalar("avg_samples_per_sec", avg, global_step)
                    w.add_scalar("tokens_per_sec", tok_rate, global_step)
                    w.add_scalar("mfu", mfu, global_step)
                    w.add_scalar("grad_norm/model_wise_grad_norm", float(grad_norm), global_step)
                    w.add_scalar("params_norm/model_wise_params_norm", pnorm, global_step)
                    if scaler is not None:
                        w.add_scalar("loss_scale", scaler.get_scale(), global_step)
                t_last, samples_since = now, 0

            if (rc.checkpoint_steps and global_step % rc.checkpoint_steps == 0) or global_step == target:
                last_ckpt = self._save_checkpoint(global_step, model, optimizer, scheduler, loader, scaler)
            if eval_hook is not None:
                eval_hook(global_step, model)
        bar.close()
        elapsed = time.perf_counter() - t_start
        logger.info("Processed %d sample(s) in %.1f seconds.", samples_total, elapsed)
        logger.info("Training completed successfully!")
        self._close_run()
        result.update(global_step=global_step, checkpoint=last_ckpt)
        return result

    # ---- eval ---------------------------------------------------------------------------------------

    def evaluate(self, checkpoint_path: Path | None = None, model=None) -> dict[str, float]:
        """Evaluate one checkpoint (default: ``--checkpoint_path`` or the latest) on ``eval_input``."""
        p, env = self.params, self.env
        if p.eval_input is None:
            raise TrainingError("eval mode needs an 'eval_input' section in the params")
        own_run = self.writer is None
        if own_run:
            self._open_run("eval")
        try:
            return self._evaluate(checkpoint_path, model)
        finally:
            if own_run:
                self._close_run()

    def _evaluate(self, checkpoint_path: Path | None, model) -> dict[str, float]:
        p, env = self.params, self.env
        global_step = 0
        if model is None:
            model = self._build_model()
            path = checkpoint_path or self._resolve_checkpoint()
            if path is not None:
                logger.info("Evaluating checkpoint %s", path)
                state = self._read_checkpoint(path, model, None)  # eval loads only the model (+ step)
                global_step = int(state.get("global_step", 0))
            else:
                raise TrainingError(f"eval: no checkpoint_<step>.mdl in --model_dir {self.model_dir} (and no "
                                    "--checkpoint_path): nothing to evaluate")
        loader = make_dataloader(p.eval_input, env)
        self._check_data(loader, p.eval_input)
        try:
            n_batches = len(loader)
        except TypeError:
            n_batches = None
        steps = self.rc.eval_steps or n_batches
        if not steps:
            raise TrainingError("eval needs runconfig.eval_steps or an eval data loader with a known length")
        metrics = LMEvalMetrics()
        model.eval()
        data_iter = iter(loader)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in tqdm(range(steps), desc="eval", unit="batch", disable=self._bars_off()):
                try:
                    batch = next(data_iter)
                except StopIteration:  # eval_steps larger than the set: wrap around
                    data_iter = iter(loader)
                    batch = next(data_iter)
                logits, labels, mask, loss = self._forward_loss(model, batch)
                metrics.update(logits, labels, mask, loss)
        model.train()
        if env.world_size > 1:
            import torch.distributed as dist

            def _sum(t):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                return t

            metrics.reduce(_sum)
        results = metrics.compute()
        for name in ("eval/lm_perplexity", "eval/accuracy"):
            logger.info("Metric: %s = %.6f", name, results[name])
        logger.info("Avg Eval Loss: %.6f", results["loss"])
        if self.writer is not None:
            for name, value in results.items():
                self.writer.add_scalar(name, value, global_step)
            self.writer.flush()
        logger.info("Processed %d batch(es) in %.1f seconds.", steps, time.perf_counter() - t0)
        logger.info("Evaluation completed successfully!")
        return {**results, "global_step": global_step}

    def evaluate_all(self) -> dict[int, dict]:
        """``eval_all``: every ``checkpoint_<step>`` in model_dir, oldest first (timestamped twins skipped)."""
        if self.rc.checkpoint_path:
            raise TrainingError("eval_all evaluates every checkpoint in --model_dir; do not pass --checkpoint_path")
        paths = [q for q in ckpt.list_checkpoints(self.model_dir) if "_" not in q.stem.removeprefix("checkpoint_")]
        if not paths:
            raise TrainingError(f"eval_all: no checkpoint_<step>.mdl files in {self.model_dir}")
        self._open_run("eval")
        out = {}
        for q in paths:
            out[ckpt.checkpoint_step(q)] = self.evaluate(q)
        self._close_run()
        return out

    def train_and_eval(self) -> dict:
        """Train, evaluating every ``eval_frequency`` steps (if set) and at the end."""
        freq = self.rc.eval_frequency
        evals = {}

        def hook(step, model):
            if freq and step % freq == 0:
                evals[step] = self._eval_in_training(model, step)

        result = self.train(eval_hook=hook)
        if result["global_step"] not in evals:
            evals[result["global_step"]] = self.evaluate()
        result["evals"] = evals
        return result

    def _eval_in_training(self, model, step: int) -> dict:
        writer, self.writer = self.writer, None
        try:
            self._open_run("eval")
            res = self.evaluate(model=model)
            if self.writer is not None:
                for name, value in res.items():
                    if name != "global_step":
                        self.writer.add_scalar(name, value, step)
            self._close_run()
        finally:
            self.writer = writer
            setup_logging(self._summary_dir("train") / "run.log", self.rc.logging, self.env.is_main)
        return res


def _param_norm(params) -> float:
    norms = []
    for q in params:
        t = q.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        norms.append(t.float().norm())
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

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
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm


from . import checkpoint as ckpt
from . import distributed as D
from .config import InputConfig, Params
from .metrics import LMEvalMetrics
from .zoo_model import build_model, lm_loss
from .optim import ScheduledLR, build_optimizer
from .outputs import Checkpointer, MetricsWriter
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
    the second term is causal attention's QKᵀ and AV, fwd + bwd). A frozen matrix (a LoRA run's base)
    counts 4 per parameter instead of 6: its backward computes no weight gradient. Recomputation under
    activation checkpointing is not counted (it is *model* FLOPs utilisation)."""
    cfg = model.config

    def cost(p) -> float:
        return 6.0 if p.requires_grad else 4.0

    flops = sum(cost(p) * p.numel() for n, p in model.named_parameters()
                if n.startswith("transformer.h.") and p.dim() == 2)
    flops += cost(model.get_output_embeddings().weight) * cfg.vocab_size * cfg.n_embd
    return flops + 6.0 * cfg.n_layer * seq_len * cfg.n_embd


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
        self.checkpointer = Checkpointer(self.model_dir, self.rc, self.env, raw)
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

    def _open_metrics(self, mode: str) -> MetricsWriter:
        """``params_<mode>.yaml`` and the TensorBoard writer in the mode's summary dir (main process only)."""
        out = self._summary_dir(mode)
        if not self.env.is_main:
            return MetricsWriter(None)
        write_params_yaml(self.raw, out / f"params_{mode}.yaml")
        return MetricsWriter(out)

    @contextmanager
    def _run(self, mode: str):
        """One ``train`` / ``eval`` run: its params file, ``run.log`` and TensorBoard writer (yielded)."""
        metrics = self._open_metrics(mode)
        try:
            setup_logging(self._summary_dir(mode) / "run.log", self.rc.logging, self.env.is_main)
            from .config import report_extra_keys

            report_extra_keys(self.params)
            self.autocast_dtype = self._choose_precision()
            yield metrics
        finally:
            metrics.close()

    def _build_model(self):
        model = build_model(self.params.model, self.params.optimizer, seed=self.rc.seed)
        if self.params.model.lora_params:
            from .lora import apply_lora

            apply_lora(model, self.params.model.lora_params)  # base weights come from the checkpoint loaded next
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

        ``losses`` maps each global step run here to its (rank-averaged) loss; ``checkpoint`` is the last
        checkpoint written, else the one resumed from.
        """
        if self.params.optimizer is None or self.params.train_input is None:
            raise TrainingError("train mode needs 'optimizer' and 'train_input' sections in the params")
        with self._run("train") as metrics:
            run = self._build_training()
            resumed_from = self._resume(run)
            target = self._target_step(run.step, self._steps_per_epoch(run.loader))
            result = {"global_step": run.step, "losses": {}, "checkpoint": resumed_from}
            if target <= run.step:
                logger.info("Already at step %d (target %d): nothing to train", run.step, target)
                return result
            if self.rc.save_initial_checkpoint and run.step == 0:
                self.checkpointer.save(0, run.model, run.optimizer, run.scheduler, run.loader, run.scaler)
            progress = _TrainProgress(self, run, metrics, target)
            run.model.train()
            batches = _endless(run.loader)
            with tqdm(total=target - run.step, desc="train", unit="step", disable=self._bars_off()) as bar:
                while run.step < target:
                    out = self._optimizer_step(run, batches, self.checkpointer.last_written or resumed_from)
                    result["losses"][run.step] = out.loss
                    bar.update(1)
                    bar.set_postfix(loss=f"{out.loss:.4f}")
                    progress.record(out)
                    if (self.rc.checkpoint_steps and run.step % self.rc.checkpoint_steps == 0) or run.step == target:
                        self.checkpointer.save(run.step, run.model, run.optimizer, run.scheduler, run.loader,
                                               run.scaler)
                    if eval_hook is not None:
                        eval_hook(run.step, run.model)
            progress.finish()
            result.update(global_step=run.step, checkpoint=self.checkpointer.last_written or resumed_from)
            return result

    def _build_training(self) -> _TrainRun:
        """Data loader, model, optimizer, LR schedule and (fp16) grad scaler of a fresh run at step 0."""
        p = self.params
        loader = make_dataloader(p.train_input, self.env)  # before the model: bad data fails before any compute
        self._check_data(loader, p.train_input)
        model = self._build_model()
        optimizer = build_optimizer(D.unwrap(model), p.optimizer, p.model)
        scheduler = ScheduledLR(optimizer, p.optimizer.schedule())
        scaler = None
        if self.autocast_dtype == torch.float16:
            scaler = make_grad_scaler(p.optimizer, self.env.device.type)
        return _TrainRun(model, optimizer, scheduler, loader, scaler)

    def _resume(self, run: _TrainRun) -> Path | None:
        """Restore the ``load_checkpoint_states`` of ``--checkpoint_path`` or the newest checkpoint into ``run``;
        returns the checkpoint resumed from (None: fresh initialisation)."""
        p, rc, env = self.params, self.rc, self.env
        path = self.checkpointer.resume_path()
        if path is None:
            if rc.checkpoint_path is None:
                logger.info("No checkpoint in %s: training from a fresh initialisation", self.model_dir)
            return None
        states = ckpt.parse_load_states(rc.load_checkpoint_states)
        logger.info("Loading checkpoint %s (states: %s)", path, ", ".join(sorted(states)))
        state = self.checkpointer.read(path, run.model, run.optimizer if "optimizer" in states else None)
        if "optimizer" not in states:  # weights only: fresh optimizer state
            run.optimizer = build_optimizer(D.unwrap(run.model), p.optimizer, p.model)
            run.scheduler = ScheduledLR(run.optimizer, p.optimizer.schedule())
        if "global_step" in states:
            run.step = int(state.get("global_step", 0))
        if "lr_scheduler" in states and "lr_scheduler" in state:
            run.scheduler.load_state_dict(state["lr_scheduler"])
        elif run.step:  # keep the schedule aligned with the step count
            run.scheduler.load_state_dict({"last_epoch": run.step})
        if "dataloader" in states and "dataloader" in state and hasattr(run.loader, "load_state_dict"):
            if self._same_data(state):
                run.loader.load_state_dict(state["dataloader"])
            else:
                logger.info("Not restoring the data-loader position: train_input differs from the "
                            "checkpoint's (e.g. the 2k -> 8k stage switch); reading from the start")
        if "grad_scaler" in states and run.scaler is not None and "grad_scaler" in state:
            run.scaler.load_state_dict(state["grad_scaler"])
        if "rng" in state and "global_step" in states:
            ckpt.set_rng_state(state["rng"], env.device, env.rank)
        return path

    def _steps_per_epoch(self, loader) -> int | None:
        try:
            return len(loader) // self.params.optimizer.grad_accum_steps
        except TypeError:
            return None

    def _optimizer_step(self, run: _TrainRun, batches, last_good: Path | None) -> _StepOutput:
        """One update: ``grad_accum_steps`` micro-batches forward + backward, the NaN guard, clipping, the
        optimizer and schedule steps. Advances ``run.step``."""
        accum, env = self.params.optimizer.grad_accum_steps, self.env
        loss_sum, samples = torch.zeros((), device=env.device), 0
        for micro in range(accum):
            batch = next(batches)
            with self._grad_sync(run.model, last=micro == accum - 1):
                _, _, _, loss = self._forward_loss(run.model, batch)
                scaled = loss / accum
                (run.scaler.scale(scaled) if run.scaler else scaled).backward()
            loss_sum += scaled.detach()
            samples += batch["input_ids"].shape[0] * env.world_size
        loss_value = float(D.all_reduce_mean(loss_sum, env))
        if self.rc.check_loss_values and not math.isfinite(loss_value):
            raise TrainingError(f"loss is {loss_value} at step {run.step + 1}; stopping before the update. "
                                f"Last good checkpoint: {last_good or 'none'}")
        grad_norm = self._clip_gradients(run)
        lrs = [g["lr"] for g in run.optimizer.param_groups]
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return _StepOutput(loss_value, grad_norm, lrs, batch["input_ids"].shape[1], samples)

    def _grad_sync(self, model, last: bool):
        """Data-parallel gradients are reduced on the last micro-batch of an update only."""
        if self.env.strategy == "fsdp":
            model.set_requires_gradient_sync(last)
        if not last and self.env.strategy == "ddp":
            return model.no_sync()
        return nullcontext()

    def _clip_gradients(self, run: _TrainRun) -> torch.Tensor:
        """Unscale (fp16), clip by norm and value; returns the global gradient norm before clipping."""
        opt = self.params.optimizer
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        params = _optimized_params(run.optimizer)
        max_norm = opt.max_gradient_norm or float("inf")  # always clip when set (fixes CPU quirk)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if opt.max_gradient_value:
            torch.nn.utils.clip_grad_value_(params, opt.max_gradient_value)
        return grad_norm

    # ---- eval ---------------------------------------------------------------------------------------

    def _require_eval_input(self) -> None:
        if self.params.eval_input is None:
            raise TrainingError("eval mode needs an 'eval_input' section in the params")

    def evaluate(self, checkpoint_path: Path | None = None, model=None) -> dict[str, float]:
        """Evaluate one checkpoint (default: ``--checkpoint_path`` or the latest) on ``eval_input``."""
        self._require_eval_input()  # before the run writes anything
        with self._run("eval") as metrics:
            return self._evaluate(metrics, checkpoint_path, model)

    def _evaluate(self, metrics: MetricsWriter, checkpoint_path: Path | None = None, model=None,
                  step: int | None = None) -> dict[str, float]:
        """Evaluate ``model`` (or the checkpoint) and write the results at ``step`` (default: the checkpoint's)."""
        p, env = self.params, self.env
        self._require_eval_input()
        global_step = 0
        if model is None:
            model = self._build_model()
            path = checkpoint_path or self.checkpointer.resume_path()
            if path is not None:
                logger.info("Evaluating checkpoint %s", path)
                state = self.checkpointer.read(path, model, None)  # eval loads only the model (+ step)
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
        lm_metrics = LMEvalMetrics()
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
                lm_metrics.update(logits, labels, mask, loss)
        model.train()
        if env.world_size > 1:
            import torch.distributed as dist

            def _sum(t):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                return t

            lm_metrics.reduce(_sum)
        results = lm_metrics.compute()
        for name in ("eval/lm_perplexity", "eval/accuracy"):
            logger.info("Metric: %s = %.6f", name, results[name])
        logger.info("Avg Eval Loss: %.6f", results["loss"])
        metrics.scalars(results, global_step if step is None else step)
        metrics.flush()
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
        with self._run("eval") as metrics:
            return {ckpt.checkpoint_step(q): self._evaluate(metrics, q) for q in paths}

    def train_and_eval(self) -> dict:
        """Train, evaluating every ``eval_frequency`` steps (if set) and at the end.

        Evaluations during training write their scalars to the eval summary dir and their log lines to its
        ``run.log`` as well as the training log."""
        freq = self.rc.eval_frequency
        evals = {}
        eval_metrics: MetricsWriter | None = None  # opened at the first evaluation during training

        def hook(step, model):
            nonlocal eval_metrics
            if freq and step % freq == 0:
                if eval_metrics is None:
                    eval_metrics = self._open_metrics("eval")
                with _also_log_to(self._summary_dir("eval") / "run.log", self.env.is_main):
                    evals[step] = self._evaluate(eval_metrics, model=model, step=step)

        try:
            result = self.train(eval_hook=hook)
        finally:
            if eval_metrics is not None:
                eval_metrics.close()
        if result["global_step"] not in evals:
            # the checkpoint just trained, not --checkpoint_path (the start of a fine-tune)
            evals[result["global_step"]] = self.evaluate(checkpoint_path=result["checkpoint"])
        result["evals"] = evals
        return result


# ---- the pieces of a training run ------------------------------------------------------------------


@dataclass
class _TrainRun:
    """The objects one training run steps; ``step`` is the global step (optimizer updates taken)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: ScheduledLR
    loader: object
    scaler: torch.amp.GradScaler | None
    step: int = 0


@dataclass
class _StepOutput:
    """What one optimizer step reports to the metrics."""

    loss: float  # rank-averaged
    grad_norm: torch.Tensor  # before clipping
    lrs: list[float]  # per param group, as used by this update
    msl: int  # sequence length of the batch
    samples: int  # over all ranks


def _endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise TrainingError("the training data loader yields no batches")


def _optimized_params(optimizer) -> list:
    return [q for g in optimizer.param_groups for q in g["params"]]


class _TrainProgress:
    """Throughput, MFU and the every-``log_steps`` log line + TensorBoard scalars of one training run."""

    def __init__(self, runner: Runner, run: _TrainRun, metrics: MetricsWriter, target: int):
        rc, env = runner.rc, runner.env
        self.rc, self.env, self.run, self.metrics, self.target = rc, env, run, metrics, target
        self.start_step = run.step
        self.base = D.unwrap(run.model)
        self.peak = rc.peak_flops or measure_peak_flops(env.device, runner.autocast_dtype or torch.float32)
        logger.info("Training steps %d -> %d on %s (world size %d, %s); MFU peak %.1f GFLOP/s per process (%s)",
                    run.step, target, env.device, env.world_size, env.strategy, self.peak / 1e9,
                    "runconfig.peak_flops" if rc.peak_flops else "measured matmul roofline")
        self.t_start = self.t_last = time.perf_counter()
        self.samples_since = self.samples_total = 0

    def record(self, out: _StepOutput) -> None:
        step, env = self.run.step, self.env
        self.samples_since += out.samples
        first_of_run = step == self.start_step + 1  # shows the starting loss
        if not (step % self.rc.log_steps == 0 or step == self.target or first_of_run):
            return
        now = time.perf_counter()
        rate = self.samples_since / max(now - self.t_last, 1e-9)
        self.samples_total += self.samples_since
        avg = self.samples_total / max(now - self.t_start, 1e-9)
        tok_rate = rate * out.msl
        mfu = tok_rate / env.world_size * flops_per_token(self.base, out.msl) / self.peak
        pnorm = _param_norm(_optimized_params(self.run.optimizer))  # collective under FSDP2: every rank computes it
        peak_gib = _peak_memory_gib(env.device)
        logger.info("| Train Device=%s, Step=%d, Loss=%.5f, LR=%s, Rate=%.2f samples/sec, "
                    "GlobalRate=%.2f samples/sec, Tokens/sec=%.0f, MFU=%.1f%%, GradNorm=%.4f%s",
                    env.device.type.upper(), step, out.loss,
                    "/".join(f"{lr:.3e}" for lr in out.lrs), rate, avg, tok_rate, 100 * mfu, float(out.grad_norm),
                    "" if peak_gib is None else f", PeakMem={peak_gib:.2f} GiB")
        scalars = {"loss": out.loss}
        for i, (g, lr) in enumerate(zip(self.run.optimizer.param_groups, out.lrs)):
            scalars[f"lr/{i}"] = lr
            scalars[f"lr/{g.get('name', i)}"] = lr
        scalars.update({"local_samples_per_sec": rate / env.world_size, "avg_samples_per_sec": avg,
                        "tokens_per_sec": tok_rate, "mfu": mfu,
                        "grad_norm/model_wise_grad_norm": float(out.grad_norm),
                        "params_norm/model_wise_params_norm": pnorm})
        if self.run.scaler is not None:
            scalars["loss_scale"] = self.run.scaler.get_scale()
        if peak_gib is not None:
            scalars["memory/peak_allocated_gib"] = peak_gib
        self.metrics.scalars(scalars, step)
        self.t_last, self.samples_since = now, 0

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.t_start
        logger.info("Processed %d sample(s) in %.1f seconds.", self.samples_total, elapsed)
        logger.info("Training completed successfully!")


def _peak_memory_gib(device: torch.device) -> float | None:
    """The most GPU memory this process's tensors have held so far (``torch.cuda.max_memory_allocated``), in
    GiB; ``None`` off CUDA, where the process's RSS is the figure to watch instead."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


@contextmanager
def _also_log_to(log_file: Path, is_main: bool):
    """Copy the ``btlm.train`` log to ``log_file`` too while the block runs (main process; not when the
    log already goes there)."""
    path = os.path.abspath(log_file)  # as FileHandler stores it
    if not is_main or any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logger.handlers[0].formatter if logger.handlers else None)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _param_norm(params) -> float:
    norms = []
    for q in params:
        t = q.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        norms.append(t.float().norm())
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

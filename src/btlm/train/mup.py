"""muP checks: the coordinate check and the learning-rate transfer sweep for a Model Zoo params YAML.

Both take the params' model, re-create it at several widths and train each for a few steps:

* **muP** — as the params say. The params are first brought into the Model Zoo 2.3+ spelling
  (:func:`mup_base_form`): base widths ``mup_base_hidden_size`` / ``mup_base_filter_size``, base
  initializer stds and ``output_logits_alpha``. A 2.0-2.2 params file (pre-scaled initializers,
  ``output_logits_scale``, ``adjust_learning_rate.decoder_kernel = k``) describes a width
  ``m = 1/k`` times its base, so its base is ``hidden_size·k`` / ``filter_size·k``, its alpha
  ``output_logits_scale / k``, and its base stds are the given stds × √m (output projections also
  × √(2L), the depth factor Model Zoo re-applies). At a new width every muP rule then follows from the
  base (``zoo_model.effective_initializers``, ``config.lr_multipliers``, ``ModelConfig.logits_scale``).
* **SP** (standard parametrization, muP off) — the same model with every width treated as its own
  base: base-width initializer stds at every width, one learning rate for all weights, logits ×
  alpha without the 1/m, attention scores divided by √d instead of d. The embedding multiplier is a
  constant and stays.

Widths change ``hidden_size`` (and ``filter_size`` in proportion, rounded); the number of heads and
layers stay, so the head dimension grows with the width (what the 1/d attention scale is for).

The coordinate check (microsoft/mup's test) records the RMS of each layer's output per step: the
scaled embedding (input of the first block), every block's attention and MLP output, every block's
attention logits ``q·kᵀ/divisor`` (before mask and ALiBi) and the final logits. Under a correct muP the
sizes stay flat across widths (the logits may shrink at initialisation); under SP they grow. The
verdict fits the slope of log RMS against log width at the last step and flags slopes above
``threshold`` (0.25: between flat and the √width growth of a missing 1/√m or 1/m factor).

The sweep trains each width at each learning rate (the schedule's peak replaced by a constant LR,
times each group's multiplier) and reports the final training loss; under muP the best LR stays put
across widths.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from btlm.errors import BTLMError
from btlm.io import atomic_path

from .config import ModelConfig, OptimizerConfig, Params, lr_multipliers
from .zoo_model import build_model, effective_initializers, lm_loss, scale_initializer
from .optim import build_optimizer

#: Slope of log RMS vs log width above which a layer is reported as growing.
GROWTH_THRESHOLD = 0.25


class MupError(BTLMError, ValueError):
    """Params that cannot be checked (not muP, width not divisible by the heads, no data)."""


# ---- the params at other widths ---------------------------------------------------------------------


def mup_base_form(params: Params) -> tuple[dict, dict]:
    """The params' ``model`` and ``optimizer`` sections in the 2.3+ muP spelling (base sizes, base stds).

    Raises :class:`MupError` when the params are not muP (no logit scale and no base sizes).
    """
    model, opt = params.model, params.optimizer
    if opt is None:
        raise MupError("the params have no optimizer section (needed for the learning-rate groups)")
    section = model.model_dump(exclude_none=True)
    optimizer = opt.model_dump(exclude_none=True)
    # The base sizes alone set the decoder multipliers at every width; a decoder_kernel only held for
    # the params' own width (``embedding`` stays: it does not depend on the width).
    adjust = {k: v for k, v in (opt.adjust_learning_rate or {}).items() if k != "decoder_kernel"}
    optimizer["adjust_learning_rate"] = adjust or None
    if model.mup_base_hidden_size is not None:
        return section, optimizer
    if model.output_logits_scale is None:
        raise MupError("the params are not muP: neither mup_base_hidden_size nor output_logits_scale is set")
    k = lr_multipliers(model, opt)["decoder_attention"]
    m = 1.0 / k
    depth = math.sqrt(2 * model.num_hidden_layers)
    inits = effective_initializers(model)
    section.update(
        mup_base_hidden_size=model.hidden_size * k,
        mup_base_filter_size=model.filter_size * k,
        output_logits_alpha=model.output_logits_scale * m,
        scale_output_logits_by_d=True,
        initializer=scale_initializer(inits["attention"], m**0.5).model_dump(),
        ffn_initializer=scale_initializer(inits["ffn"], m**0.5).model_dump(),
        output_layer_initializer=scale_initializer(inits["attention_output"], m**0.5 * depth).model_dump(),
        ffn_output_layer_initializer=scale_initializer(inits["ffn_output"], m**0.5 * depth).model_dump(),
    )
    section.pop("output_logits_scale")
    return section, optimizer


def model_at_width(base_model: dict, width: int, mup: bool = True) -> dict:
    """The base-form ``model`` section at ``hidden_size = width`` (muP, or SP when ``mup`` is False)."""
    if width % base_model["num_heads"]:
        raise MupError(f"width {width} is not divisible by num_heads {base_model['num_heads']}")
    filter_size = max(1, round(base_model["filter_size"] * width / base_model["hidden_size"]))
    section = dict(base_model, hidden_size=width, filter_size=filter_size)
    if not mup:
        section.update(mup_base_hidden_size=width, mup_base_filter_size=filter_size, scale_qk_dot_by_d=False)
    return section


VariantFn = Callable[[int, int], tuple[nn.Module, torch.optim.Optimizer, ModelConfig]]


def variants_from_params(params: Params, lr: float) -> dict[str, VariantFn]:
    """``{"muP": f, "SP": f}``: ``f(width, seed)`` builds the model, its optimizer (constant ``lr``
    times each group's multiplier) and the width's model config."""
    base_model, base_opt = mup_base_form(params)
    opt_cfg = OptimizerConfig.model_validate(base_opt)

    def make(mup: bool) -> VariantFn:
        def build(width: int, seed: int):
            cfg = ModelConfig.model_validate(model_at_width(base_model, width, mup))
            model = build_model(cfg, opt_cfg, seed=seed)
            model.config._attn_implementation = "eager"
            optimizer = build_optimizer(model, opt_cfg, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["adjust_learning_rate"]
            return model, optimizer, cfg
        return build

    return {"muP": make(True), "SP": make(False)}


def peak_learning_rate(params: Params, horizon: int = 5000) -> float:
    """The largest scheduled learning rate over the first ``horizon`` steps (the warm-up's peak)."""
    if params.optimizer is None:
        raise MupError("the params have no optimizer section")
    schedule = params.optimizer.schedule()
    return max(schedule(t) for t in range(horizon))


# ---- data -------------------------------------------------------------------------------------------


def batches(params: Params, batch_size: int, seq_len: int, seed: int, source: str = "auto"
            ) -> tuple[Iterator[dict], str]:
    """An endless batch iterator and a description of it.

    ``source``: ``"params"`` (the ``train_input`` HDF5 shards), ``"random"`` (uniform random tokens,
    fixed seed) or ``"auto"`` (the shards when their directory exists, else random tokens).
    """
    ti = params.train_input
    data_dir = ti.data_dir if ti is not None and isinstance(ti.data_dir, str) else None
    if source == "params" and data_dir is None:
        raise MupError("the params have no train_input.data_dir to read")
    if source == "params" or (source == "auto" and data_dir and Path(data_dir).is_dir()):
        if not Path(data_dir).is_dir():
            raise MupError(f"train_input.data_dir {data_dir} does not exist (prepare the data first)")
        from btlm.data.loader import GptHDF5MapDataProcessor

        loader = GptHDF5MapDataProcessor({"data_dir": data_dir, "batch_size": batch_size, "shuffle": False,
                                          "num_workers": 0}, rank=0, world_size=1).create_dataloader()

        def endless():
            while True:
                yield from loader
        return endless(), f"{data_dir} (batch {batch_size})"
    gen = torch.Generator().manual_seed(seed)
    vocab = params.model.vocab_size

    def random_tokens():
        while True:
            ids = torch.randint(vocab, (batch_size, seq_len + 1), generator=gen)
            yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": torch.ones(batch_size, seq_len)}
    return random_tokens(), f"random tokens (batch {batch_size} x {seq_len})"


def fixed_batches(it: Iterator[dict], n: int) -> list[dict]:
    """The first ``n`` batches, so every width and variant sees the same data."""
    return [next(it) for _ in range(n)]


def _train_step(model, optimizer, cfg: ModelConfig, batch: dict) -> float:
    logits = model(input_ids=batch["input_ids"].long(), use_cache=False).logits
    loss = lm_loss(logits, batch["labels"], batch["attention_mask"], cfg)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ---- coordinate check -------------------------------------------------------------------------------


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def _attach_hooks(model: nn.Module, record: dict[str, float]) -> list:
    """Forward hooks that store each layer's output RMS into ``record`` (overwritten per forward)."""
    handles = []
    blocks = model.transformer.h

    def pre_first(_mod, args, _kwargs):
        record["embedding"] = _rms(args[0])
    handles.append(blocks[0].register_forward_pre_hook(pre_first, with_kwargs=True))
    for i, block in enumerate(blocks):
        def out(name):
            def hook(_mod, _args, output):
                record[name] = _rms(output)
            return hook

        def logits_hook(attn, name):
            def hook(_mod, _args, qkv):
                q, k, _ = qkv.detach().split(attn.embed_dim, dim=2)
                B, T, _ = q.shape
                q, k = (t.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2) for t in (q, k))
                record[name] = _rms(q @ k.transpose(-1, -2) / attn.score_divisor())
            return hook
        handles.append(block.attn.c_attn.register_forward_hook(logits_hook(block.attn, f"block{i}.attn_logits")))
        handles.append(block.attn.register_forward_hook(out(f"block{i}.attn")))
        handles.append(block.mlp.register_forward_hook(out(f"block{i}.mlp")))
    return handles


def layer_order(n_layer: int) -> list[str]:
    names = ["embedding"]
    for i in range(n_layer):
        names += [f"block{i}.attn_logits", f"block{i}.attn", f"block{i}.mlp"]
    return names + ["logits"]


def coord_check(params: Params, widths: list[int], steps: int = 5, batch_size: int = 4, seq_len: int = 64,
                lr: float | None = None, seed: int = 1, data: str = "auto", seeds: int = 1,
                variants: dict[str, VariantFn] | None = None, log=print) -> list[dict]:
    """Rows ``{variant, width, step, layer, rms}``: the RMS of every layer's output at steps 1..``steps``
    (the forward pass before the step-th update; step 1 is the initialisation).

    ``lr`` defaults to the schedule's peak; ``variants`` defaults to muP and SP from the params (tests
    pass a deliberately broken one). Every width and variant sees the same batches. With ``seeds`` > 1
    each point is the mean RMS over that many initialisations (seed, seed+1, …), as microsoft/mup's
    ``nseeds``: it smooths the small widths' noise.
    """
    lr = peak_learning_rate(params) if lr is None else lr
    variants = variants or variants_from_params(params, lr)
    it, desc = batches(params, batch_size, seq_len, seed, data)
    data_batches = fixed_batches(it, steps)
    log(f"coord-check: widths {widths}, {steps} steps at lr {lr:g}, {seeds} seed(s), data: {desc}")
    rows = []
    for name, build in variants.items():
        for width in widths:
            sums: dict[tuple[int, str], float] = {}
            for s in range(seeds):
                for row in _coord_run(build, name, width, seed + s, data_batches, log):
                    key = (row["step"], row["layer"])
                    sums[key] = sums.get(key, 0.0) + row["rms"] / seeds
            rows += [dict(variant=name, width=width, step=st, layer=layer, rms=v) for (st, layer), v in sums.items()]
    return rows


def _coord_run(build: VariantFn, name: str, width: int, seed: int, data_batches: list[dict], log) -> list[dict]:
    """One model of one variant and width through the batches; its per-step, per-layer RMS rows."""
    rows = []
    model, optimizer, cfg = build(width, seed)
    record: dict[str, float] = {}
    handles = _attach_hooks(model, record)
    model.train()
    for step, batch in enumerate(data_batches, start=1):
        logits = model(input_ids=batch["input_ids"].long(), use_cache=False).logits
        record["logits"] = _rms(logits)
        loss = lm_loss(logits, batch["labels"], batch["attention_mask"], cfg)
        if not math.isfinite(loss.item()):
            raise MupError(f"{name} width {width}: loss is {loss.item()} at step {step} (lr too high?)")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rows += [dict(variant=name, width=width, step=step, layer=layer, rms=record[layer])
                 for layer in layer_order(cfg.num_hidden_layers)]
    for h in handles:
        h.remove()
    log(f"  {name} width {width} seed {seed}: final loss {loss.item():.4f}")
    return rows


def fit_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-30)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else 0.0


def slopes(rows: list[dict], step: int | None = None) -> dict[tuple[str, str], float]:
    """``{(variant, layer): slope}`` of log RMS vs log width at ``step`` (default: the last step)."""
    step = max(r["step"] for r in rows) if step is None else step
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in rows:
        if r["step"] == step:
            series.setdefault((r["variant"], r["layer"]), []).append((r["width"], r["rms"]))
    return {key: fit_slope([w for w, _ in pts], [v for _, v in pts]) for key, pts in series.items()}


def verdict(rows: list[dict], threshold: float = GROWTH_THRESHOLD) -> list[dict]:
    """One entry per (variant, layer): ``{variant, layer, slope, grows}`` at the last step."""
    return [dict(variant=v, layer=layer, slope=s, grows=s > threshold) for (v, layer), s in slopes(rows).items()]


def format_verdict(entries: list[dict], threshold: float = GROWTH_THRESHOLD) -> str:
    lines = []
    for e in entries:
        mark = f"GROWS (slope > {threshold})" if e["grows"] else "ok"
        lines.append(f"{e['variant']:<8} {e['layer']:<20} slope {e['slope']:+.3f}  {mark}")
    return "\n".join(lines)


# ---- output files -----------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` as CSV (atomically: temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_coord_check(rows: list[dict], path: str | Path) -> Path:
    """microsoft/mup's layout: one row of panels per variant, one panel per step, RMS vs width
    (log-log), one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(len(variants), len(steps), figsize=(3.2 * len(steps), 3.0 * len(variants)),
                             squeeze=False, sharey="row")
    cmap = plt.get_cmap("viridis")
    for i, v in enumerate(variants):
        for j, s in enumerate(steps):
            ax = axes[i][j]
            for k, layer in enumerate(layers):
                pts = sorted((r["width"], r["rms"]) for r in rows
                             if (r["variant"], r["step"], r["layer"]) == (v, s, layer))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1,
                        color=cmap(k / max(1, len(layers) - 1)), label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{v}  step {s}", fontsize=9)
            ax.set_xlabel("width")
            if j == 0:
                ax.set_ylabel("RMS of layer output")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return _save_figure(fig, Path(path))


# ---- learning-rate sweep ----------------------------------------------------------------------------


def lr_sweep(params: Params, widths: list[int], lrs: list[float], steps: int = 50, batch_size: int = 8,
             seq_len: int = 64, seed: int = 1, data: str = "auto", variant_names=("muP", "SP"),
             tail: int = 5, log=print) -> list[dict]:
    """Rows ``{variant, width, lr, loss}``: mean training loss over the last ``tail`` of ``steps`` steps
    at constant learning rate ``lr`` (times each group's multiplier); a diverged run gets ``nan``."""
    it, desc = batches(params, batch_size, seq_len, seed, data)
    data_batches = fixed_batches(it, steps)
    log(f"sweep: widths {widths}, lrs {lrs}, {steps} steps, data: {desc}")
    rows = []
    for lr in lrs:
        variants = variants_from_params(params, lr)
        for name in variant_names:
            for width in widths:
                model, optimizer, cfg = variants[name](width, seed)
                model.train()
                losses = []
                for batch in data_batches:
                    losses.append(_train_step(model, optimizer, cfg, batch))
                    if not math.isfinite(losses[-1]):
                        break
                final = losses[-tail:]
                loss = sum(final) / len(final) if all(math.isfinite(x) for x in final) else float("nan")
                rows.append(dict(variant=name, width=width, lr=lr, loss=loss))
                log(f"  {name} width {width} lr {lr:g}: loss {loss:.4f}")
    return rows


def best_lrs(rows: list[dict]) -> dict[tuple[str, int], float]:
    """``{(variant, width): lr with the lowest loss}`` (diverged runs never win)."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in rows:
        if not math.isfinite(r["loss"]):
            continue
        key = (r["variant"], r["width"])
        if key not in best or r["loss"] < best[key][1]:
            best[key] = (r["lr"], r["loss"])
    return {k: v[0] for k, v in best.items()}


def plot_sweep(rows: list[dict], path: str | Path) -> Path:
    """One panel per variant: training loss vs learning rate (log x), one line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.8), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    best = best_lrs(rows)
    for i, v in enumerate(variants):
        ax = axes[0][i]
        for k, w in enumerate(widths):
            pts = sorted((r["lr"], r["loss"]) for r in rows if r["variant"] == v and r["width"] == w)
            color = cmap(k / max(1, len(widths) - 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color, label=f"width {w}")
            if (v, w) in best:
                y = min(p[1] for p in pts if p[0] == best[(v, w)])
                ax.plot([best[(v, w)]], [y], marker="*", ms=10, color=color)
        ax.set_xscale("log")
        lrs = sorted({r["lr"] for r in rows})
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{v}: training loss vs learning rate (* = best)", fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, Path(path))

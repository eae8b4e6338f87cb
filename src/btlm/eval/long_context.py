"""``btlm eval-long``: average loss at every token position up to 32k tokens, with and without ALiBi
position interpolation (the BTLM model card's Figure 5).

Windows of ``--context`` + 1 tokens are cut from a token stream (HDF5 shards from ``btlm data``: the
``input_ids`` rows concatenated in file order, padding dropped; or ``.txt`` / ``.jsonl`` documents
tokenized and joined with ``<|endoftext|>``) with stride ``--context``, exactly like a Model Zoo row of
msl = context: ``context`` inputs, ``context`` labels. Every window is run once per scaling setting
through the memory-bounded (query-chunked SDPA) attention path, and the per-token cross-entropy is
computed from the final hidden states in position chunks, so a 32k-token window never materialises a
``[T, vocab]`` fp32 logits tensor. Position ``p`` (1 … context) is the loss of predicting token ``p``
from tokens ``0 … p-1``.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from btlm.eval.common import (
    EvalError, ScalingSetting, apply_scaling, load_for_context,
    model_label, parse_scaling, save_figure_atomic, write_atomic,
)

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


# ------------------------------------------------------------------------------------------ data


def _data_files(path: str) -> list[Path]:
    """The input files named by ``path``: one file, or the ``.h5`` / text files of a directory (sorted)."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"--data {path} does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    usable = [f for f in files if f.suffix == ".h5" or f.name.lower().endswith(TEXT_SUFFIXES)]
    if not usable:
        raise EvalError(f"--data {path}: no .h5 shards or .txt/.jsonl files found")
    return usable


def _h5_tokens(path: Path):
    """Yield the real tokens (``attention_mask == 1``) of each row of a ``btlm data`` shard, in order."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise EvalError(f"{path}: no dataset 'data' (expected a btlm data shard with [n, 3, msl] rows)")
            data = f["data"]
            if data.ndim != 3 or data.shape[1] != 3:
                raise EvalError(f"{path}: dataset 'data' has shape {data.shape}, expected [n, 3, msl]")
            for start in range(0, data.shape[0], 256):
                block = data[start:start + 256]
                for ids, mask in zip(block[:, 0], block[:, 1]):
                    yield ids[mask.astype(bool)].astype(np.int64)
    except OSError as err:
        raise EvalError(f"{path}: cannot read as HDF5 ({err})") from None


def _text_tokens(path: Path, tokenizer):
    """Yield the tokens of each document of a ``.txt`` (one document) or ``.jsonl`` (``text`` key) file,
    each followed by ``<|endoftext|>`` as in training data."""
    from btlm.data.readers import iter_records, where

    for rec in iter_records(str(path)):
        if rec.text is None:
            raise EvalError(f"{where(str(path), rec)}: {rec.problem} {rec.detail}".strip())
        yield np.asarray(tokenizer.encode(rec.text) + [tokenizer.eos_token_id], dtype=np.int64)


def _renamed_num_windows(num_windows, num_docs):
    """``num_docs`` is the old name of ``num_windows`` (it always counted windows): accepted, with a warning."""
    if num_docs is None:
        return num_windows
    warnings.warn("num_docs is deprecated: use num_windows (it counts windows, not documents)", DeprecationWarning,
                  stacklevel=3)
    return num_docs


def load_windows(data: str, context: int, num_windows: int | None = None, tokenizer=None, *,
                 num_docs: int | None = None) -> torch.Tensor:
    """Cut ``[n, context + 1]`` windows (``n <= num_windows``) from the token stream of ``data``.

    Window ``i`` is ``stream[i·context : i·context + context + 1]`` (consecutive windows share one token,
    as Model Zoo rows do): ``context`` inputs and ``context`` next-token labels.
    Raises :class:`EvalError` when the data holds fewer than ``context + 1`` tokens.
    """
    num_windows = _renamed_num_windows(num_windows, num_docs)
    if context < 2:
        raise EvalError(f"--context must be at least 2, got {context}")
    windows, buf, have = [], [], 0
    for path in _data_files(data):
        if path.suffix == ".h5":
            pieces = _h5_tokens(path)
        else:
            if tokenizer is None:
                from btlm.tokenizer import load_tokenizer

                tokenizer = load_tokenizer()
            pieces = _text_tokens(path, tokenizer)
        for piece in pieces:
            buf.append(piece)
            have += len(piece)
            while have >= context + 1:
                stream = np.concatenate(buf)
                windows.append(stream[:context + 1])
                buf, have = [stream[context:]], len(stream) - context
                if num_windows is not None and len(windows) >= num_windows:
                    return torch.from_numpy(np.stack(windows))
    if not windows:
        raise EvalError(f"--data {data} holds {have} tokens, fewer than one window of --context {context} "
                        f"(context + 1 tokens)")
    return torch.from_numpy(np.stack(windows))


# ------------------------------------------------------------------------------------------ loss


@torch.no_grad()
def per_token_loss(model, input_ids: torch.Tensor, logits_chunk: int = 1024) -> torch.Tensor:
    """Next-token cross-entropy of a window ``input_ids`` ``[B, T+1]`` → fp32 ``[B, T]``.

    The model reads the first ``T`` tokens; entry ``[:, p-1]`` is the loss of predicting token ``p``
    (p = 1 … T). One forward pass through the transformer (memory-bounded attention), then logits only
    for ``logits_chunk`` positions at a time.
    """
    hidden = model.transformer(input_ids[:, :-1], use_cache=False).last_hidden_state
    losses = []
    for c0 in range(0, input_ids.shape[1] - 1, logits_chunk):
        c1 = min(input_ids.shape[1] - 1, c0 + logits_chunk)
        logits = model.logits_from_hidden(hidden[:, c0:c1]).float()
        target = input_ids[:, c0 + 1:c1 + 1]
        losses.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    return torch.cat(losses, dim=1)


def position_curves(model, windows: torch.Tensor, settings: list[ScalingSetting], logits_chunk: int = 1024,
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Mean loss at every position over ``windows`` for each setting → ``{label: float64 [T-1]}``."""
    device = next(model.parameters()).device
    sums = {s.label: np.zeros(windows.shape[1] - 1, dtype=np.float64) for s in settings}
    bar = tqdm(total=len(settings) * len(windows), desc="eval-long", unit="window", disable=not progress)
    for setting in settings:
        apply_scaling(model, setting)
        for window in windows:
            sums[setting.label] += per_token_loss(model, window[None].to(device), logits_chunk)[0].double().cpu().numpy()
            bar.update(1)
    bar.close()
    return {label: total / len(windows) for label, total in sums.items()}


def smooth_log(values: np.ndarray, width: float = 0.05) -> np.ndarray:
    """Moving average whose window grows with position (``[p·(1-w), p·(1+w)]``), so the curve is equally
    smooth everywhere on a log-scaled position axis. Position ``p`` is index + 1."""
    pos = np.arange(1, len(values) + 1)
    lo = np.clip(np.floor(pos * (1 - width)).astype(int) - 1, 0, len(values) - 1)
    hi = np.clip(np.ceil(pos * (1 + width)).astype(int), 1, len(values))
    csum = np.concatenate([[0.0], np.cumsum(values)])
    return (csum[hi] - csum[lo]) / (hi - lo)


# ------------------------------------------------------------------------------------------ outputs


def write_results(out: Path, curves: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``loss_by_position.csv`` (one column per setting), ``loss_by_position.json`` and the PNG."""
    labels = list(curves)
    n = len(next(iter(curves.values())))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["position", *labels])
    for i in range(n):
        writer.writerow([i + 1, *(f"{curves[label][i]:.6f}" for label in labels)])
    write_atomic(out / "loss_by_position.csv", buf.getvalue())
    ref, diffs = differences(curves)
    summary = {
        **meta,
        "reference": ref,
        "settings": [
            {"label": label, "mean_loss": float(curves[label].mean()),
             **({"mean_loss_minus_reference": float(diffs[label].mean())} if label in diffs else {}),
             "loss_by_position": curves[label].round(6).tolist()}
            for label in labels
        ],
    }
    write_atomic(out / "loss_by_position.json", json.dumps(summary, indent=1))
    plot_curves(out / "loss_by_position.png", curves, meta)


def differences(curves: dict[str, np.ndarray]) -> tuple[str | None, dict[str, np.ndarray]]:
    """Each setting's curve minus the reference curve (``none`` if evaluated, else the first setting).

    Settings differ by 0.01–0.1 nats while the per-position loss itself spans ~0–17 nats, so only the
    paired difference (same windows, same positions) shows which setting is better where.
    Returns ``(reference label, {label: difference})``; no reference for a single setting.
    """
    if len(curves) < 2:
        return None, {}
    ref = "none" if "none" in curves else next(iter(curves))
    return ref, {label: values - curves[ref] for label, values in curves.items() if label != ref}


def make_figure(curves: dict[str, np.ndarray], meta: dict):
    """Loss vs token position on a log axis (raw mean faint, smoothed on top); with several settings a
    second panel shows each setting minus the reference (``none``) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, diffs = differences(curves)
    if diffs:
        fig, (ax, dax) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {label: (f"C{i}", ("-", "--", ":", "-.")[i % 4]) for i, label in enumerate(curves)}
    for label, values in curves.items():
        pos = np.arange(1, len(values) + 1)
        color, style = colors[label]  # styles keep coinciding curves visible
        ax.plot(pos, values, color=color, alpha=0.2, linewidth=0.6)
        ax.plot(pos, smooth_log(values), color=color, linestyle=style, linewidth=1.8,
                label=f"{label} (mean {values.mean():.3f})")
    axes = [ax]
    if diffs:
        dax.axhline(0.0, color=colors[ref][0], linewidth=1)
        for label, delta in diffs.items():
            pos = np.arange(1, len(delta) + 1)
            color, style = colors[label]
            dax.plot(pos, delta, color=color, alpha=0.15, linewidth=0.5)
            dax.plot(pos, smooth_log(delta), color=color, linestyle=style, linewidth=1.8,
                     label=f"{label} − {ref} (mean {delta.mean():+.4f})")
        smooth = np.concatenate([smooth_log(d) for d in diffs.values()])
        pad = max(float(np.abs(smooth).max()) * 1.15, 1e-3)  # scale to the smoothed curves, not the raw noise
        dax.set_ylim(-pad, pad)
        dax.set_ylabel(f"loss − {ref} (nats)")
        dax.legend(fontsize="small")
        axes.append(dax)
    for a in axes:
        if meta.get("trained_n_positions"):
            a.axvline(meta["trained_n_positions"], color="gray", linestyle="--", linewidth=1,
                      label="training length" if a is ax else None)
        a.set_xscale("log")
        a.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("token position")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{model_label(meta['model'])}: loss by position, {meta['num_windows']} window(s) of {meta['context']} tokens")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(path: Path, curves: dict[str, np.ndarray], meta: dict) -> None:
    """Write :func:`make_figure` as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    fig = make_figure(curves, meta)
    save_figure_atomic(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the run


def evaluate_long(model_path: str, data: str, out: str | Path, context: int = 32768, alibi_scaling=("none",),
                  num_windows: int = 8, logits_chunk: int = 1024, dtype="fp32", device=None, overwrite: bool = False,
                  progress: bool = True, *, num_docs: int | None = None) -> dict[str, np.ndarray]:
    """``btlm eval-long``: check the settings and ``out`` (before any compute), load the windows and the
    model, compute the loss curves and write them to ``out``. Returns ``{setting label: curve}``."""
    from btlm.io import check_output_dir

    num_windows = _renamed_num_windows(num_windows, num_docs)
    if num_windows < 1:
        raise EvalError(f"--num-windows must be at least 1, got {num_windows}")
    settings = [parse_scaling(s) for s in alibi_scaling]
    if len({s.label for s in settings}) != len(settings):
        raise EvalError(f"--alibi-scaling lists a setting twice: {list(alibi_scaling)}")
    check_output_dir(out, overwrite, what="--out")
    windows = load_windows(data, context, num_windows)
    model, trained = load_for_context(model_path, context, dtype=dtype, device=device)
    if int(windows.max()) >= model.config.vocab_size:
        raise EvalError(f"--data {data} has token id {int(windows.max())} >= the model's vocab_size "
                        f"{model.config.vocab_size}")
    curves = position_curves(model, windows, settings, logits_chunk, progress=progress)
    meta = {"model": str(model_path), "data": str(data), "context": context, "num_windows": len(windows),
            "trained_n_positions": trained}
    write_results(Path(out), curves, meta)
    return curves

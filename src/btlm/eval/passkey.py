"""``btlm passkey``: can the model retrieve a passkey hidden at a given depth of a long filler text?

The probe of Mohtashami & Jaggi (2023, "Landmark Attention"): a fixed instruction, repeated filler
sentences with one "The pass key is N. Remember it." sentence at a relative depth, and the question
"What is the pass key? The pass key is". The answer is generated greedily; a trial is correct when the
first number in the generated text equals the key. Prompts are built at the token level so every
prompt is at most the requested length, with the needle between whole filler sentences. Keys come from
``numpy.random.default_rng(seed)``, so a run is deterministic for a seed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from btlm.eval.common import (
    EvalError, apply_scaling, load_for_context, model_label,
    parse_lengths, parse_scaling, save_figure_atomic, write_atomic,
)

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class Trial:
    """One prompt: its token ids, the hidden key, and where it sits."""

    length: int
    depth: float
    key: int
    input_ids: list[int]


def build_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens with the needle at relative ``depth``.

    Raises :class:`EvalError` when ``length`` cannot hold the instruction, needle and question.
    """
    head = tokenizer.encode(INSTRUCTION)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    tail = tokenizer.encode(QUESTION)
    unit = tokenizer.encode(FILLER)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise EvalError(f"length {length} is too short for a passkey prompt (needs {length - budget} tokens)")
    n_units = budget // len(unit)
    before = round(depth * n_units)  # whole filler sentences before the needle
    return head + unit * before + needle + unit * (n_units - before) + tail


def make_trials(tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int) -> list[Trial]:
    """All prompts of a run; keys are 5-digit numbers drawn from one seeded generator in a fixed order."""
    rng = np.random.default_rng(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                out.append(Trial(length, depth, key, build_prompt(tokenizer, length, depth, key)))
    return out


def score(generated: str, key: int) -> bool:
    """True when the first whole number in ``generated`` is ``key`` (``" 68048."`` is right, ``" 680481"``
    and ``" 12 68048"`` are wrong)."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group() == str(key)


@torch.no_grad()
def answer(model, input_ids: list[int], max_new_tokens: int = 8) -> list[int]:
    """Greedy continuation token ids of one prompt (KV cache, memory-bounded attention)."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def run_trials(model, tokenizer, trials: list[Trial], progress: bool = True) -> list[dict]:
    """Generate and score every trial → rows with length, depth, key, generated text, correct."""
    rows = []
    for trial in tqdm(trials, desc="passkey", unit="prompt", disable=not progress):
        text = tokenizer.decode(answer(model, trial.input_ids))
        rows.append({"length": trial.length, "depth": trial.depth, "key": trial.key, "prompt_tokens": len(trial.input_ids),
                     "generated": text, "correct": score(text, trial.key)})
    return rows


def accuracy_table(rows: list[dict]) -> tuple[list[int], list[float], np.ndarray]:
    """``(lengths, depths, acc[depth, length])`` from trial rows (accuracy in [0, 1])."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    acc = np.zeros((len(depths), len(lengths)))
    for i, d in enumerate(depths):
        for j, n in enumerate(lengths):
            cell = [r["correct"] for r in rows if r["depth"] == d and r["length"] == n]
            acc[i, j] = sum(cell) / len(cell)
    return lengths, depths, acc


def markdown_table(lengths, depths, acc) -> str:
    """Accuracy (%) as a markdown table: one row per depth, one column per length, plus a mean row."""
    lines = ["| depth | " + " | ".join(f"{n} tok" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    lines += [f"| {d:.2f} | " + " | ".join(f"{100 * a:.0f}%" for a in acc[i]) + " |" for i, d in enumerate(depths)]
    lines.append("| **mean** | " + " | ".join(f"**{100 * a:.0f}%**" for a in acc.mean(0)) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """``passkey.csv`` (one row per trial), ``passkey.md``, ``passkey.json`` and ``passkey.png`` in ``out``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "passkey.csv", buf.getvalue())
    lengths, depths, acc = accuracy_table(rows)
    write_atomic(out / "passkey.md", f"Passkey retrieval accuracy, {meta['model']} ({meta['alibi_scaling']}, "
                                     f"{meta['trials']} trial(s) per cell, seed {meta['seed']})\n\n"
                                     + markdown_table(lengths, depths, acc))
    write_atomic(out / "passkey.json", json.dumps({**meta, "lengths": lengths, "depths": depths,
                                                   "accuracy": acc.tolist(), "trials_detail": rows}, indent=1))
    plot_heatmap(out / "passkey.png", lengths, depths, acc, meta)


def plot_heatmap(path: Path, lengths, depths, acc, meta: dict) -> None:
    """Accuracy heat map: depth (rows) × context length (columns), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{100 * acc[i, j]:.0f}%", ha="center", va="center", fontsize=9)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth")
    ax.set_title(f"passkey accuracy: {model_label(meta['model'])}, {meta['alibi_scaling']}")
    fig.colorbar(image, ax=ax, label="accuracy")
    save_figure_atomic(fig, path)
    plt.close(fig)


def _parse_depths(text: str) -> list[float]:
    try:
        depths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvalError(f"bad --depths {text!r}: expected comma-separated fractions in [0, 1] such as 0,0.5,1")
    return depths


def evaluate_passkey(model_path: str, out: str | Path, lengths: str = "1k,2k,4k,8k", depths: str = "0,0.25,0.5,0.75,1",
                     trials: int = 5, alibi_scaling=("none",), seed: int = 0, dtype="fp32", device=None,
                     overwrite: bool = False, progress: bool = True) -> dict[str, list[dict]]:
    """``btlm passkey``: check the settings and ``out`` (before any compute), run every trial for each
    ALiBi-scaling setting (the model is loaded once) and write the results: into ``out`` for one setting,
    into ``out/<setting>/`` (``:`` written as ``_``) for several. Returns ``{setting label: trial rows}``."""
    from btlm.io import check_output_dir, resolve_tokenizer

    if isinstance(alibi_scaling, str):
        alibi_scaling = [alibi_scaling]
    if trials < 1:
        raise EvalError(f"--trials must be at least 1, got {trials}")
    length_list, depth_list = parse_lengths(lengths), _parse_depths(depths)
    settings = [parse_scaling(s) for s in alibi_scaling]
    if not settings or len({s.label for s in settings}) != len(settings):
        raise EvalError(f"--alibi-scaling must list each setting once: {list(alibi_scaling)}")
    check_output_dir(out, overwrite, what="--out")
    tokenizer = resolve_tokenizer(model_path)
    trial_list = make_trials(tokenizer, length_list, depth_list, trials, seed)
    model, trained = load_for_context(model_path, max(length_list) + 16, dtype=dtype, device=device)
    results = {}
    for setting in settings:
        apply_scaling(model, setting)
        rows = run_trials(model, tokenizer, trial_list, progress=progress)
        meta = {"model": str(model_path), "alibi_scaling": setting.label, "trials": trials, "seed": seed,
                "trained_n_positions": trained}
        target = Path(out) if len(settings) == 1 else Path(out) / setting.label.replace(":", "_")
        write_results(target, rows, meta)
        results[setting.label] = rows
    return results

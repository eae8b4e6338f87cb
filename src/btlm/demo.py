"""``make demo`` / ``btlm demo``: the whole training pipeline on CPU in a few minutes, offline.

1. builds a small real-English corpus from the Python standard library's docstrings (on every machine
   with Python, no download), split into train / validation by module;
2. preprocesses it with ``btlm data LMData`` (GPT-2 BPE, packed rows of 128 tokens, HDF5 shards);
3. trains ``configs/params_btlm_tiny_cpu.yaml`` (a 4-layer BTLM with the 3B model's ALiBi/SwiGLU/muP
   recipe) with ``btlm run CPU --mode train``;
4. evaluates it (``--mode eval``: loss, perplexity, accuracy) and writes ``loss_curve.png``;
5. exports the checkpoint to the released HF layout (``btlm convert to-hf``), reloads it with
   ``AutoModelForCausalLM`` and generates a sample.

Everything goes to ``demo_out/`` (re-running resumes / reuses what is there; delete it to start over).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "configs" / "params_btlm_tiny_cpu.yaml"  # package data (configs/ in a checkout)


def _step(n: int, text: str) -> None:
    print(f"\n=== [{n}/5] {text}", flush=True)


def build_corpus(out: Path, val_every: int = 20, root: Path | None = None) -> tuple[int, int]:
    """The docstrings of the standard library (:func:`btlm.data.corpus.module_docstrings`), one ``.txt``
    document per module; every ``val_every``-th module goes to validation. Returns (train, val) character
    counts.

    ``root`` takes the docstrings of another source tree instead (e.g. an installed package, for text the
    demo model never saw: docs/long-context.md evaluates on ``transformers``' docstrings)."""
    from btlm.data.corpus import module_docstrings

    sizes = [0, 0]
    for split in ("train", "val"):
        (out / split).mkdir(parents=True, exist_ok=True)
    for i, (name, text) in enumerate(module_docstrings(root)):
        if not text:
            continue
        split = 1 if i % val_every == 0 else 0
        (out / ("train", "val")[split] / f"{name}.txt").write_text(text, encoding="utf-8")
        sizes[split] += len(text)
    return sizes[0], sizes[1]


def prepare_data(root: Path) -> None:
    from btlm.data.create_hdf5_dataset import run
    from btlm.data.options import load_config

    for split, out in (("train", "train_msl128"), ("val", "val_msl128")):
        target = root / "data" / out
        if list(target.glob("*.h5")):
            print(f"    {target} exists, reusing it")
            continue
        info = run(load_config(None, {"input_dir": str(root / "corpus" / split), "output_dir": str(target),
                                      "max_seq_length": 128, "processes": 2, "tokenizer_type": "GPT2Tokenizer"}))
        pp = info["post-process"]
        print(f"    wrote {pp['n_shards']} shards, {pp['n_examples']} rows of 128 tokens to {target}")


def plot_losses(losses: dict[int, float], eval_loss: float, step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*sorted(losses.items()))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, lw=0.8, alpha=0.45, label="train loss (every log_steps)")
    k = 5
    if len(values) > k:
        smooth = [sum(values[i - k:i]) / k for i in range(k, len(values) + 1)]
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"train loss (mean of {k} logged points)")
    ax.scatter([step], [eval_loss], color="red", zorder=3, label=f"validation loss {eval_loss:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Tiny BTLM on Python stdlib docstrings (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path = "demo_out", max_steps: int | None = None, train_minutes: float = 6.0) -> int:
    """The whole demo into ``out`` (re-running resumes / reuses what is there); returns an exit status.

    ``max_steps`` overrides the config's; training stops at a chunk boundary after ``train_minutes``."""
    root = Path(out).resolve()
    t0 = time.perf_counter()

    import yaml

    _step(1, "building an offline English corpus from the Python standard library's docstrings")
    if not (root / "corpus" / "train").is_dir():
        n_train, n_val = build_corpus(root / "corpus")
        print(f"    {n_train / 1e6:.1f} M characters for training, {n_val / 1e6:.2f} M for validation")
    else:
        print(f"    {root / 'corpus'} exists, reusing it")

    _step(2, "tokenising and packing it into HDF5 shards: btlm data LMData --max_seq_length 128")
    prepare_data(root)

    # The shipped config reads ./demo_out/...; point it at --out wherever that is.
    raw = yaml.safe_load(CONFIG.read_text())
    raw["train_input"]["data_dir"] = str(root / "data" / "train_msl128")
    raw["eval_input"]["data_dir"] = str(root / "data" / "val_msl128")
    params = root / "params_btlm_tiny_cpu.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    model_dir = root / "model_dir"

    _step(3, f"training: btlm run CPU --mode train --params {params.name} --model_dir {model_dir}")
    if train_in_chunks(params, model_dir, max_steps or raw["runconfig"]["max_steps"], train_minutes):
        return 1

    _step(4, "evaluating on the held-out modules: btlm run CPU --mode eval")
    from btlm.train.checkpoint import latest_checkpoint
    from btlm.train.config import load_params
    from btlm.train.trainer import Runner

    p, raw = load_params(params)
    runner = Runner(p, raw, model_dir)
    results = runner.evaluate()
    losses = _train_losses(model_dir)
    plot_losses(losses, results["loss"], results["global_step"], root / "loss_curve.png")
    values = [losses[k] for k in sorted(losses)]
    first, last = values[0], sum(values[-5:]) / len(values[-5:])
    print(f"    train loss {first:.3f} (step {min(losses)}) -> {last:.3f} (mean of the last 5 logged); validation loss "
          f"{results['loss']:.3f}, perplexity {results['eval/lm_perplexity']:.1f}, "
          f"accuracy {results['eval/accuracy']:.3f}")
    print(f"    loss curve: {root / 'loss_curve.png'}")

    _step(5, "exporting to the released HF layout (btlm convert to-hf) and generating from it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from btlm.train.convert import checkpoint_to_hf

    hf_dir = checkpoint_to_hf(latest_checkpoint(model_dir), root / "hf_model", overwrite=True)  # the demo's own dir
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = "Return a new list containing"
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False, no_repeat_ngram_size=3,
                         pad_token_id=tok.eos_token_id)
    print(f"    {hf_dir}: {sum(q.numel() for q in model.parameters()) / 1e6:.1f} M parameters")
    print(f"    prompt: {prompt!r}\n    sample: {tok.decode(out[0], skip_special_tokens=True)!r}")
    summary = {"train_loss_first": first, "train_loss_last": last, **results,
               "seconds": time.perf_counter() - t0}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndone in {summary['seconds']:.0f} s; outputs in {root}")
    return 0


def train_in_chunks(params: Path, model_dir: Path, max_steps: int, minutes: float, chunk: int = 25) -> int:
    """``btlm run --mode train --num_steps chunk`` until ``max_steps`` or the time budget; every chunk
    resumes from the previous chunk's checkpoint (the Model Zoo auto-resume). Returns an exit code."""
    from btlm.train.checkpoint import checkpoint_step, latest_checkpoint
    from btlm.train.launch import run

    deadline = time.perf_counter() + minutes * 60
    step = 0
    while step < max_steps:
        t0 = time.perf_counter()
        rc = run(str(params), "CPU", "train", {"model_dir": str(model_dir), "max_steps": max_steps,
                                               "num_steps": chunk}, argv=[])
        if rc:
            return rc
        step = checkpoint_step(latest_checkpoint(model_dir))
        if step < max_steps and time.perf_counter() + (time.perf_counter() - t0) > deadline:
            print(f"    stopping at step {step} of {max_steps} to stay within --train_minutes {minutes:g}; "
                  "run the demo again to continue from there")
            break
    return 0


def _train_losses(model_dir: Path) -> dict[int, float]:
    """Per-step train losses from the TensorBoard events of every train run in ``model_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(model_dir / "train"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss")}


if __name__ == "__main__":  # ``python -m btlm.demo`` (as before ``btlm demo`` existed)
    sys.exit(run_demo())

"""`btlm run` with ``model.lora_params`` vs the same run without (a full fine-tune): optimizer-step time and
peak memory of the same model, in the same invocation.

Each variant runs in a fresh process on the same params YAML (default: configs/params_btlm_3b_8k_lora.yaml,
optionally with fewer layers) and the same synthetic rows: the trainer's own step (``Runner._optimizer_step``:
forward under the run's autocast, the Model Zoo loss, backward, clipping, btlm's AdamW, schedule). Reported:
median step seconds after ``--warmup`` untimed steps, peak memory (GPU: allocated; CPU: RSS), trainable
parameters and their optimizer state.

    python benchmarks/lora_run.py --device GPU --layers 8 --seq 2048 --batch 2 --out benchmarks/results/lora_run.md
    .venv/bin/python benchmarks/lora_run.py --params configs/params_btlm_tiny_lora.yaml --device CPU --seq 64
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import lora_vs_full_rows  # the scripts' folder is on sys.path


def rows(path: Path, n: int, seq: int, vocab: int) -> str:
    import h5py

    path.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, vocab, (n, seq + 1), dtype=np.int32)
    data = np.stack([ids[:, :-1], np.ones((n, seq), np.int32), ids[:, 1:]], axis=1)
    with h5py.File(path / "examples_0_0.h5", "w") as f:
        f.create_dataset("data", data=data)
        f.attrs["n_examples"] = n
    return str(path)


def one(variant: str, params_path: str, layers: int | None, seq: int, batch: int, steps: int, warmup: int,
        device: str) -> dict:
    from btlm.train.config import load_params, parse_params
    from btlm.train.trainer import Runner, _endless

    _, raw = load_params(params_path)
    raw = copy.deepcopy(raw)
    if variant == "full":
        raw["model"].pop("lora_params")
    if layers:
        raw["model"]["num_hidden_layers"] = layers
    tmp = Path(tempfile.mkdtemp())
    raw["train_input"].update(data_dir=rows(tmp / "data", batch * (steps + warmup), seq, raw["model"]["vocab_size"]),
                              batch_size=batch, shuffle=False, num_workers=0)
    raw.pop("eval_input", None)
    raw["optimizer"]["grad_accum_steps"] = 1
    raw["runconfig"].update(max_steps=steps + warmup, peak_flops=1e15)
    runner = Runner(parse_params(raw), raw, tmp / "run", device)
    with runner._run("train"):
        run = runner._build_training()
        batches = _endless(run.loader)
        times = []
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            out = runner._optimizer_step(run, batches, None)
            if device == "GPU":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() if device == "GPU"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    opt = run.optimizer
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return {"variant": variant, "step_s": statistics.median(times), "peak_mib": mem, "trainable": trainable,
            "total": sum(p.numel() for p in run.model.parameters()), "optimizer_state_mib": state / 2**20,
            "loss": out.loss, "autocast": str(runner.autocast_dtype)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="configs/params_btlm_3b_8k_lora.yaml")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a slice of the model)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", choices=["CPU", "GPU"], default="CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.params, a.layers, a.seq, a.batch, a.steps, a.warmup, a.device)))
        return 0
    results = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--one", variant, *sys.argv[1:]]
        cmd = [c for i, c in enumerate(cmd) if not (c == "--out" or (i and cmd[i - 1] == "--out"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    name = f"{Path(a.params).name}" + (f", {a.layers} layers" if a.layers else "")
    dev = torch.cuda.get_device_name() if a.device == "GPU" else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    lines = [f"# `btlm run` step: LoRA (`model.lora_params`) vs full fine-tune, {name}, batch {a.batch} × {a.seq} "
             f"tokens, {dev}", "",
             "The trainer's own optimizer step (forward under the run's autocast, Model Zoo loss, backward, clipping, "
             "btlm's AdamW) of the same params with and without `lora_params`, each variant in a fresh process on the "
             f"same synthetic rows; median of {a.steps} steps after {a.warmup} untimed. Peak memory: "
             + ("allocated GPU memory." if a.device == "GPU" else "RSS of the process."), "",
             f"Command: `python benchmarks/lora_run.py {' '.join(sys.argv[1:])}`", "",
             "| variant | step s | vs full | peak MiB | vs full | trainable parameters | optimizer state MiB | autocast |",
             "|---|---|---|---|---|---|---|---|"]
    lines += lora_vs_full_rows(results, extra=("autocast",))
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

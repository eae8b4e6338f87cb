"""LoRA (peft, ``target_modules=["c_attn", "c_proj"]``) vs a full fine-tune: training-step time and memory
of the same BTLM in the same run (the HF route of docs/finetune.md).

Each variant runs in a fresh process on the same random weights and batch: forward with ``labels`` (the
HF loss), backward, ``torch.optim.AdamW`` over the trainable parameters (what ``transformers.Trainer``
builds), zero_grad. Reported: median step seconds, peak RSS of the process (CPU) or peak allocated
memory (GPU), trainable parameters and their optimizer state.

    .venv/bin/python benchmarks/finetune.py --out benchmarks/results/finetune.md
    .venv/bin/python benchmarks/finetune.py --device cuda --preset 3b --seq 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import lora_vs_full_rows  # the scripts' folder is on sys.path


def one(variant: str, preset: str, batch: int, seq: int, steps: int, device: str) -> dict:
    from peft import LoraConfig, get_peft_model

    from btlm.model import BTLMLMHeadModel, config_from_preset

    torch.manual_seed(0)
    model = BTLMLMHeadModel(config_from_preset(preset)).to(device).train()
    if variant == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for i in range(steps + 1):  # the first step (allocations, optimizer state) is not timed
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    mem = (torch.cuda.max_memory_allocated() if device == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"variant": variant, "step_s": statistics.median(times), "peak_mib": mem,
            "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
            "optimizer_state_mib": state / 2**20, "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.preset, a.batch, a.seq, a.steps, a.device)))
        return 0
    rows = []
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--one", variant, "--preset", a.preset, "--batch", str(a.batch),
               "--seq", str(a.seq), "--steps", str(a.steps), "--device", a.device]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        print(rows[-1], flush=True)
    mem = "peak allocated MiB" if a.device == "cuda" else "peak RSS MiB"
    lines = [f"# Fine-tuning step: LoRA (peft) vs full fine-tune, `{a.preset}` preset, batch {a.batch} × {a.seq} "
             f"tokens, fp32, {a.device}", "",
             "LoRA r=8 on `c_attn` and `c_proj` (attention QKV, attention output, MLP output) vs every weight "
             "trained; the same weights, batch and AdamW, each variant in a fresh process; median of "
             f"{a.steps} steps after one untimed step.", "",
             f"Command: `python benchmarks/finetune.py --preset {a.preset} --batch {a.batch} --seq {a.seq} "
             f"--steps {a.steps} --device {a.device} --out benchmarks/results/finetune.md`", "",
             f"| variant | step s | vs full | {mem} | vs full | trainable parameters | AdamW state MiB |",
             "|---|---|---|---|---|---|---|"]
    lines += lora_vs_full_rows(rows)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

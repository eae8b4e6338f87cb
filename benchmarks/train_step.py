"""Training-step throughput of a ~124M-parameter BTLM at sequence length 2048 (tokens/s and MFU).

Compares, in the same run and on the same weights:

* ``btlm``  — the runner's training step (``btlm.train``): query-chunked SDPA attention with the ALiBi
  bias built per chunk, fp32 (CPU) or bf16 autocast (GPU), cstorch AdamW, grad clipping;
* ``eager`` — the released remote code's approach: eager matmul-softmax attention with the whole
  ``[B, H, T, T]`` ALiBi bias materialised (``config._attn_implementation = "eager"``), same optimizer.

and measures the machine's own roofline in the same run (an n³ matmul in the training dtype and a
1 GiB memory read), so the MFU and the ratios mean something on any machine.

On CPU it reports fp32 and bf16 autocast (``--dtypes``), and what ``btlm run CPU`` with
``mixed_precision: true`` would choose here (:func:`btlm.precision.choose_cpu_dtype`): bf16 is many
times faster than fp32 on CPUs with AVX512-BF16 / AMX and many times slower on those without.

    .venv/bin/python benchmarks/train_step.py                 # CPU: fp32, and bf16 where the CPU has it natively
    .venv/bin/python benchmarks/train_step.py --dtypes fp32,bf16 --seq 512 --impls sdpa --out result.md
    .venv/bin/python benchmarks/train_step.py --device cuda   # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from btlm.train.config import load_params
from btlm.train.zoo_model import build_model, lm_loss
from btlm.train.optim import ScheduledLR, build_optimizer
from btlm.train.trainer import flops_per_token, measure_peak_flops


def memory_read_gbps(device: torch.device) -> float:
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32, device=device)  # 1 GiB
    x.sum()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        x.sum()
    sync(device)
    return 3 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(impl: str, params, device, dtype, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """Seconds per full training step (forward, loss, backward, clip, AdamW, schedule)."""
    model = build_model(params.model, params.optimizer, seed=0).to(device)
    model.config._attn_implementation = impl
    model.train()
    opt = build_optimizer(model, params.optimizer)
    sched = ScheduledLR(opt, params.optimizer.schedule())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, params.model.vocab_size, (batch, seq + 1), generator=gen).to(device)
    ids, labels, mask = x[:, :-1], x[:, 1:], torch.ones_like(x[:, 1:])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            logits = model(input_ids=ids, use_cache=False).logits
        loss = lm_loss(logits, labels, mask, params.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"  {impl}: step {i + 1}/{warmup + steps} {time.perf_counter() - t0:.2f} s loss {loss.item():.4f}",
              flush=True)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    n_params = sum(p.numel() for n, p in model.named_parameters() if "slopes" not in n)
    fpt = flops_per_token(model, seq)
    del model, opt
    return {"impl": impl, "step_s": min(times), "tokens_per_s": batch * seq / min(times),
            "flops_per_token": fpt, "params": n_params, "losses": losses, "peak_mem_gib": peak_mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="configs/params_btlm_100m.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impls", default="sdpa,eager")
    parser.add_argument("--dtypes", default="auto",
                        help="comma list of fp32,bf16 (bf16 = autocast); auto: bf16 on GPU; on CPU fp32, plus bf16 where "
                             "the CPU has native bf16 (an emulated bf16 step takes 14-33x longer)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    params, _ = load_params(args.params)
    lines = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    choice = None
    if device.type == "cpu":
        from btlm.precision import choose_cpu_dtype

        choice = choose_cpu_dtype()
        emit(f"`btlm run CPU` with mixed_precision: true chooses **{choice.name}** here: {choice.reason}.")
        emit()
    if args.dtypes == "auto":
        names = ["bf16"] if device.type == "cuda" else ["fp32"] + (["bf16"] if choice.measured else [])
    else:
        names = args.dtypes.split(",")
    mem = memory_read_gbps(device)
    from _common import machine_description

    emit(f"Machine: {machine_description() if device.type == 'cpu' else torch.cuda.get_device_name()}; "
         f"memory read {mem:.1f} GB/s.")
    emit()
    emit(f"| dtype | attention | matmul roofline GFLOP/s ({'4096' if device.type == 'cuda' else '2048'}³, same run) | "
         "step (s) | tokens/s | model TFLOP/step | achieved GFLOP/s | MFU vs that roofline | speed vs fp32 |")
    emit("|---|---|---|---|---|---|---|---|---|")
    all_rows = []
    for dname in names:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        peak = measure_peak_flops(device, dtype, n=4096 if device.type == "cuda" else 2048)
        for impl in args.impls.split(","):
            r = time_steps(impl, params, device, dtype, args.batch, args.seq, args.steps, args.warmup)
            flops = r["flops_per_token"] * args.batch * args.seq
            achieved = flops / r["step_s"]
            r.update(dtype=dname, peak_flops=peak, mfu=achieved / peak, achieved_gflops=achieved / 1e9, tflop=flops / 1e12)
            all_rows.append(r)
    for r in all_rows:
        base = next((b for b in all_rows if b["impl"] == r["impl"] and b["dtype"] == "fp32"), None)
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else "—"
        name = {"sdpa": "btlm (chunked SDPA)", "eager": "released approach (eager + full ALiBi bias)"}[r["impl"]]
        emit(f"| {r['dtype']}{' autocast' if r['dtype'] == 'bf16' else ''} | {name} | {r['peak_flops'] / 1e9:.1f} | "
             f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['tflop']:.2f} | {r['achieved_gflops']:.1f} | "
             f"{100 * r['mfu']:.1f}% | {speed} |")
    emit()
    emit(f"BTLM {all_rows[0]['params'] / 1e6:.0f}M params ({args.params}), batch {args.batch} x {args.seq} tokens, "
         f"best of {args.steps} steps after {args.warmup} warm-up; first-step losses: "
         + ", ".join(f"{r['dtype']}/{r['impl']} {r['losses'][0]:.6f}" for r in all_rows) + ".")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mem_gbps": mem, "choice": str(choice), "rows": all_rows}, f, indent=2)


if __name__ == "__main__":
    main()

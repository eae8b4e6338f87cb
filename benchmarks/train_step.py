"""Training-step throughput of a ~124M-parameter BTLM at sequence length 2048 (tokens/s and MFU).

Compares, in the same run and on the same weights:

* ``btlm``  — the runner's training step (``btlm.train``): query-chunked SDPA attention with the ALiBi
  bias built per chunk, fp32 (CPU) or bf16 autocast (GPU), cstorch AdamW, grad clipping;
* ``eager`` — the released remote code's approach: eager matmul-softmax attention with the whole
  ``[B, H, T, T]`` ALiBi bias materialised (``config._attn_implementation = "eager"``), same optimizer.

and measures the machine's own roofline in the same run (an n³ matmul in the training dtype and a
1 GiB memory read), so the MFU and the ratios mean something on any machine.

    .venv/bin/python benchmarks/train_step.py                 # CPU, fp32
    .venv/bin/python benchmarks/train_step.py --device cuda   # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from btlm.train.config import load_params
from btlm.train.modeling import build_model, lm_loss
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
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # fp32 on CPU (no bf16 units)
    params, _ = load_params(args.params)

    peak = measure_peak_flops(device, dtype, n=4096 if device.type == "cuda" else 2048)
    mem = memory_read_gbps(device)
    print(f"roofline: {peak / 1e9:.1f} GFLOP/s ({dtype} matmul), memory read {mem:.1f} GB/s; "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = [time_steps(impl, params, device, dtype, args.batch, args.seq, args.steps, args.warmup)
            for impl in args.impls.split(",")]
    base = next((r for r in rows if r["impl"] == "eager"), rows[-1])
    print(f"\nBTLM {rows[0]['params'] / 1e6:.0f}M params, batch {args.batch} x {args.seq} tokens, {dtype}, "
          f"{device.type} ({platform.processor() or platform.machine()})")
    print("| attention | step (s) | tokens/s | model TFLOP/step | achieved GFLOP/s | MFU vs roofline | speed-up vs eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flops = r["flops_per_token"] * args.batch * args.seq
        achieved = flops / r["step_s"]
        r.update(mfu=achieved / peak, achieved_gflops=achieved / 1e9)
        name = {"sdpa": "btlm (chunked SDPA)", "eager": "released approach (eager + full ALiBi bias)"}[r["impl"]]
        print(f"| {name} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {flops / 1e12:.2f} | {achieved / 1e9:.1f} | "
              f"{100 * r['mfu']:.1f}% | {base['step_s'] / r['step_s']:.2f}x |")
    if rows[0]["losses"][0] and len(rows) > 1:
        print(f"first-step loss sdpa {rows[0]['losses'][0]:.6f} vs eager {rows[1]['losses'][0]:.6f} (same weights/data)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "mem_gbps": mem, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

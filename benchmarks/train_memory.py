"""Peak memory of one training step (forward + loss + backward) at T = 2k, 4k, 8k tokens, per attention path.

Paths, on the same small BTLM (2 layers, width 256, 4 heads, SwiGLU, ALiBi; vocabulary 8192 so the logits do
not hide the attention's share):

* ``chunked``: today's default ``sdpa`` path: query chunks whose backward pass recomputes one chunk at a
  time, its ALiBi bias included, instead of keeping every chunk's bias.
* ``chunked-keep-bias``: the same query-chunked SDPA as it was before per-chunk recomputation, loaded from
  the git ref ``--old-ref`` (its ``src/`` is extracted with ``git archive`` into a temporary directory).
  Autograd keeps every chunk's bias, ``H·T²/2`` values per layer.
* ``eager``: the released remote code's approach, full ``[B, H, T, T]`` scores and bias.

Every measurement runs in a fresh process. On CPU the step's memory is the rise of the process's peak RSS
over its RSS just before the step (the peak is reset through ``/proc/self/clear_refs`` first); on CUDA it is
``torch.cuda.max_memory_allocated()`` over the memory allocated before the step. The step memory includes
the activations autograd keeps, the transient peaks of the backward pass and the parameter gradients.

    python benchmarks/train_memory.py [--lengths 2048,4096,8192] [--paths chunked,chunked-keep-bias,eager]
                                      [--device cpu|cuda] [--old-ref REF] [--repeats N]
                                      [--out benchmarks/results/train_memory.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
#: The last commit whose chunked SDPA path kept every chunk's bias for backward.
DEFAULT_OLD_REF = "a36545d"
PATH_NAMES = {
    "chunked": "chunked SDPA, bias recomputed per chunk (default)",
    "chunked-keep-bias": "chunked SDPA, bias kept for backward (before)",
    "eager": "eager (remote-code approach)",
}

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
import btlm
from btlm.model import BTLMLMHeadModel, config_from_preset

T, attn, device = int(sys.argv[1]), sys.argv[2], torch.device(sys.argv[3])
torch.manual_seed(0)
cfg = config_from_preset("tiny", n_embd=256, n_head=4, n_inner=682, n_layer=2, vocab_size=8192,
                         n_positions=max(T, 8192))
model = BTLMLMHeadModel._from_config(cfg, attn_implementation=attn).to(device).train()
x = torch.randint(0, cfg.vocab_size, (1, T), device=device)

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")

def step():
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()

step_small = lambda: model(x[:, :256], labels=x[:, :256], use_cache=False).loss.backward()
step_small()  # warm-up: thread pools, kernels, parameter gradients allocated once
model.zero_grad(set_to_none=True)
if device.type == "cuda":
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter(); step(); torch.cuda.synchronize(); dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
else:
    before = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter(); step(); dt = time.perf_counter() - t0
    peak = rss("VmHWM")
print(json.dumps({"seconds": dt, "before": before, "peak": peak, "step": peak - before,
                  "btlm": str(Path(btlm.__file__).resolve().parent)}))
"""


def extract_ref(ref: str, dest: Path) -> Path:
    """``src/`` of git ``ref`` extracted into ``dest``; returns the directory to put on ``PYTHONPATH``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    return dest / "src"


def measure(T: int, path: str, device: str, old_src: Path | None) -> dict:
    attn = "eager" if path == "eager" else "sdpa"
    env = dict(os.environ)
    if path == "chunked-keep-bias":
        env["PYTHONPATH"] = os.pathsep.join([str(old_src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = subprocess.run([sys.executable, "-c", CHILD, str(T), attn, device], capture_output=True, text=True, env=env)
    if res.returncode:
        return {"error": (res.stderr.strip().splitlines() or ["exit code %d" % res.returncode])[-1]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = old_src if path == "chunked-keep-bias" else ROOT / "src"
    if Path(out["btlm"]) != (Path(expected) / "btlm").resolve():
        raise RuntimeError(f"{path}: the child imported btlm from {out['btlm']}, not from {expected}")
    return out


def machine_info(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = f"{names[0]} ×{len(names)}" if names else cpu
    except OSError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {total:.0f} GiB RAM, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average before the run {os.getloadavg()[0]:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--paths", default="chunked,chunked-keep-bias,eager", help=f"comma-separated: {', '.join(PATH_NAMES)}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--old-ref", default=DEFAULT_OLD_REF, help="git ref of the chunked-keep-bias path")
    ap.add_argument("--repeats", type=int, default=1, help="measure each row this often (median memory, best time)")
    ap.add_argument("--out", default=None, help="write the results table (markdown) here")
    args = ap.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATH_NAMES))
    if unknown:
        ap.error(f"unknown path(s) {unknown}; choose from {list(PATH_NAMES)}")
    info = machine_info(args.device)
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="btlm-old-") as tmp:
        old_src = extract_ref(args.old_ref, Path(tmp)) if "chunked-keep-bias" in paths else None
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeats):  # paths interleaved, so a busy spell on the machine hits all of them
            for T in lengths:
                for path in paths:
                    t0 = time.perf_counter()
                    r = measure(T, path, args.device, old_src)
                    runs.setdefault((path, T), []).append(r)
                    shown = r.get("error") or f"step {r['step'] / MIB:.0f} MiB, {r['seconds']:.1f} s"
                    print(f"{path:18s} T={T:6d}: {shown} ({time.perf_counter() - t0:.0f} s wall)", flush=True)
        for key, results in runs.items():  # median memory, fastest time
            ok = [r for r in results if "error" not in r]
            if not ok:
                rows[key] = results[-1]
                continue
            steps = sorted(r["step"] for r in ok)
            rows[key] = dict(ok[0], step=steps[(len(steps) - 1) // 2], seconds=min(r["seconds"] for r in ok))

    first = lengths[0]
    lines = [
        "# Training-step memory: linear in T with per-chunk bias recomputation",
        "",
        "One training step (forward, loss, backward; no optimizer) of a small BTLM (2 layers, width 256, 4 heads, "
        "SwiGLU, ALiBi, vocabulary 8192) on one sequence of T tokens, fp32, each measurement in a fresh process. "
        + ("Step memory = peak RSS during the step − RSS before it (the peak is reset just before the step)."
           if args.device != "cuda" else "Step memory = `max_memory_allocated` during the step − allocated before it.")
        + f" `chunked SDPA, bias kept for backward (before)` is the code at git ref `{args.old_ref}`."
        + (f" Each row was measured {args.repeats} times, paths interleaved: the median memory and the fastest "
           "step are shown." if args.repeats > 1 else ""),
        "",
        f"Command: `python benchmarks/train_memory.py --lengths {args.lengths} --paths {','.join(paths)} "
        f"--device {args.device} --repeats {args.repeats}"
        f"{' --old-ref ' + args.old_ref if args.old_ref != DEFAULT_OLD_REF else ''}`",
        "",
        f"Machine: {info}.",
        "",
        f"| path | T | step memory MiB | × the T={first} figure | step s |",
        "|---|---|---|---|---|",
    ]
    for path in paths:
        for T in lengths:
            r = rows[path, T]
            if "error" in r:
                lines.append(f"| {PATH_NAMES[path]} | {T} | failed: {r['error']} | | |")
                continue
            base = rows[path, first]
            ratio = f"{r['step'] / base['step']:.2f}×" if "error" not in base else "—"
            lines.append(f"| {PATH_NAMES[path]} | {T} | {r['step'] / MIB:.0f} | {ratio} | {r['seconds']:.1f} |")
    last = lengths[-1]
    if ("chunked", first) in rows and ("chunked", last) in rows and all("error" not in rows["chunked", t] for t in (first, last)):
        growth = rows["chunked", last]["step"] / rows["chunked", first]["step"]
        target = 4.5 * (last / first) / 4  # the target: 4.5× for 4× the tokens (2k -> 8k)
        verdict = "meets" if growth <= target else "MISSES"
        lines += ["", f"Default path, T={first} → {last}: step memory × {growth:.2f} ({last // first}× the tokens); "
                  f"target ≤ {target:.1f}×: {verdict} it."]
    for path in paths:
        steps = [rows[path, T].get("step") for T in lengths]
        if len(lengths) >= 3 and None not in steps:
            added = [b - a for a, b in zip(steps, steps[1:])]
            lines.append(f"- {PATH_NAMES[path]}: each step up in T adds "
                         + ", ".join(f"{x / MIB:.0f}" for x in added) + " MiB (×"
                         + ", ×".join(f"{b / a:.2f}" for a, b in zip(added, added[1:]))
                         + " per doubling: 2 is linear, 4 quadratic).")
    lines += ["", "FlexAttention (an ALiBi `score_mod`) was the other candidate: in torch 2.13 its backward is not "
              "implemented on CPU, eager or compiled (`NotImplementedError: FlexAttention does not support backward "
              "on CPU`), so training recomputes each chunk, bias included, in a custom autograd function instead, on "
              "every device."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

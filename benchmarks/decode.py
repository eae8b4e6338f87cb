"""Prefill and decode speed of BTLM-3B on this CPU: fp32, bf16, int4 (and int8), next to the released
remote code's approach (eager attention with a materialised ALiBi bias), with the memory-bandwidth roofline.

Decoding one token has to read every weight once, so memory bandwidth bounds it: roofline tok/s =
measured read bandwidth / weight bytes. The bandwidth (best-of-5 `torch.sum` over 1 GiB, all threads) is
measured in the same run and each variant's fraction of its roofline is reported.

Uses the random-weight 3B checkpoints that benchmarks/memory.py writes (built here if missing). Each
variant runs in a fresh process: load, one warm-up forward, a --prompt-len prefill (timed), then
--new-tokens greedy decode steps with the KV cache (timed).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode.py [--variants fp32,eager,bf16,int4] [--prompt-len 128]
                                                        [--new-tokens 32] [--out benchmarks/results/decode.md]

`eager` = fp32 weights with attn_implementation="eager" (the remote code's attention). llama.cpp is not
installed here (`pip install llama-cpp-python` builds it for ~13 minutes); see docs/quant.md for running
it as a peer through its JAIS architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: benchmark row → (checkpoint variant, attention implementation, label)
ROWS = {
    "fp32": ("fp32", "sdpa", "fp32 (btlm, chunked SDPA)"),
    "eager": ("fp32", "eager", "fp32, remote-code approach (eager attention + materialised bias)"),
    "bf16": ("bf16", "sdpa", "bf16 (btlm)"),
    "int8": ("int8", "sdpa", "int8 weight-only (btlm quantize --bits 8)"),
    "int4": ("int4", "sdpa", "int4 g128 weight-only (btlm quantize --bits 4)"),
    "llamacpp": ("fp32", "llama.cpp", "llama.cpp Q4_0, JAIS architecture (btlm export-gguf --outtype q4_0; peer)"),
    # the same int4 model through generate(), timed as generate(1 + n tokens) − generate(1 token)
    "int4-generate": ("int4", "generate", "int4 g128, `generate()` with transformers' DynamicCache"),
    "int4-static": ("int4", "generate-static", "int4 g128, `generate(cache_implementation=\"static\")`"),
}


def linears_seconds(model, repeats: int) -> float:
    """Best-of-``repeats`` seconds that one decode step spends in the weight matmuls alone: every block
    linear and the LM head applied to one random row, with nothing else (attention, norms, cache, Python
    overhead of the model). Decode tok/s can at best reach 1 / this with these kernels."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from btlm.quant.modules import Int4Conv1D, Int8Conv1D, TiedInt8Head

    def in_width(m) -> int:
        if isinstance(m, Conv1D):
            return m.weight.shape[0]
        if isinstance(m, TiedInt8Head):
            return m.embedding.embedding_dim
        return m.in_features

    mods = [m for m in model.modules() if isinstance(m, (Conv1D, Int4Conv1D, Int8Conv1D))] + [model.lm_head]
    inputs = [torch.randn(1, 1, in_width(m), dtype=model.dtype) for m in mods]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m, x in zip(mods, inputs):
                m(x)
            best = min(best, time.perf_counter() - t0)
    return best


def llamacpp_child(gguf_path: str, prompt_len: int, new_tokens: int) -> None:
    """The same prefill + greedy decode measurement through llama-cpp-python on a GGUF file."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    n_ctx = prompt_len + new_tokens + 8  # n_batch = n_ctx: llama-cpp-python keeps last-token logits in an n_batch buffer
    llm = Llama(model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, verbose=False)
    prompt = torch.randint(0, 50000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(prompt[:8])  # warm-up, as for the btlm rows
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_s = time.perf_counter() - t0
    print(json.dumps(dict(prefill_tok_s=prompt_len / prefill_s, decode_tok_s=new_tokens / decode_s,
                          linears_tok_s=None, weight_bytes=os.path.getsize(gguf_path), threads=threads,
                          capability="llama.cpp's own")))


#: op name (as the profiler reports it) → where a decode step's time goes
PROFILE_GROUPS = {
    "aten::_weight_int4pack_mm_for_cpu": "int4 kernel (block linears)",
    "aten::_weight_int8pack_mm": "int8 kernel (LM head / int8 linears)",
    "aten::addmm": "fp32/bf16 matmuls", "aten::mm": "fp32/bf16 matmuls", "aten::linear": "fp32/bf16 matmuls",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    "aten::cat": "KV cache append (torch.cat)", "aten::index_copy_": "KV cache write (static)",
    "aten::native_layer_norm": "LayerNorm",
}


def profile_steps(model, cache, token, steps: int) -> tuple[dict[str, float], float]:
    """Self CPU time per op group over ``steps`` decode steps (``PROFILE_GROUPS``; the rest is "other ops"),
    and the wall time; wall minus all ops is Python / framework overhead between the kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        wall = time.perf_counter() - t0
    groups: dict[str, float] = {}
    for ev in prof.key_averages():
        name = PROFILE_GROUPS.get(ev.key, "other ops")
        groups[name] = groups.get(name, 0.0) + ev.self_cpu_time_total / 1e6
    return groups, wall


def child(path: str, variant: str, attn: str, prompt_len: int, new_tokens: int, profile: int = 0) -> None:
    import torch

    if attn == "llama.cpp":
        return llamacpp_child(path, prompt_len, new_tokens)
    if attn.startswith("generate"):
        return generate_child(path, variant, "static" if attn == "generate-static" else None, prompt_len, new_tokens)

    from _common import load_for_benchmark, weight_bytes
    from btlm.quant.kernels import cpu_capability

    model = load_for_benchmark(path, variant, attn=attn)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50000, (1, prompt_len), generator=gen)
    with torch.no_grad():
        model(prompt[:, :8], use_cache=False)  # warm-up: int4 layout conversion, thread pools
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
        breakdown = profile_steps(model, cache, token, profile) if profile else None
    linears_s = linears_seconds(model, repeats=1 if variant == "bf16" else 5)
    print(json.dumps(dict(prefill_tok_s=prompt_len / prefill_s, decode_tok_s=new_tokens / decode_s,
                          linears_tok_s=1 / linears_s, capability=cpu_capability(), profile=breakdown,
                          weight_bytes=weight_bytes(model), threads=torch.get_num_threads())))


def generate_child(path: str, variant: str, cache: str | None, prompt_len: int, new_tokens: int) -> None:
    """Prefill and per-token decode time through ``model.generate`` (greedy) with ``cache_implementation=cache``:
    decode = (generate(1 + n new tokens) − generate(1 new token)) / n, each the best of two."""
    import torch

    from _common import load_for_benchmark, weight_bytes
    from btlm.quant.kernels import cpu_capability

    model = load_for_benchmark(path, variant)
    prompt = torch.randint(0, 50000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, cache_implementation=cache) if cache else dict(do_sample=False)

    def seconds(ids, n: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    with torch.no_grad():
        seconds(prompt[:, :8], 2)  # warm-up
        one = min(seconds(prompt, 1) for _ in range(2))
        total = min(seconds(prompt, 1 + new_tokens) for _ in range(2))
    print(json.dumps(dict(prefill_tok_s=prompt_len / one, decode_tok_s=new_tokens / (total - one), linears_tok_s=None,
                          capability=cpu_capability(), profile=None, weight_bytes=weight_bytes(model),
                          threads=torch.get_num_threads())))


def ensure_gguf(fp32_dir: Path, preset: str) -> Path | None:
    """The Q4_0 GGUF of the random checkpoint for the llama.cpp row (written once), or None without llama_cpp."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from btlm.quant.gguf import export_gguf

    path = Path(fp32_dir).parent / f"{preset}-q4_0.gguf"
    if not path.is_file():
        export_gguf(fp32_dir, path, outtype="q4_0")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fp32,eager,bf16,int4", help=f"comma list of {list(ROWS)}")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--bf16-new-tokens", type=int, default=2,
                   help="decode steps timed for bf16 (default 2: a bf16 Conv1D decode step of the 3B model takes ~1 minute on AVX2)")
    p.add_argument("--bf16-prompt-len", type=int, default=8,
                   help="prompt length for bf16 (default 8: bf16 matmuls run at ~0.3 GFLOP/s on AVX2, so a 128-token "
                        "3B prefill would take ~30 minutes)")
    p.add_argument("--capabilities", default="",
                   help="comma list of ATEN_CPU_CAPABILITY values (default,avx2,avx512) to run the int4/int8 rows under, "
                        "one row each (default: only the CPU's own; the generate rows always run at the CPU's own)")
    p.add_argument("--profile", type=int, default=8,
                   help="decode steps profiled per int4 row for the 'where the time goes' table (0: none)")
    from _common import add_checkpoint_arguments

    add_checkpoint_arguments(p, Path(__file__).parent / "results" / "decode.md")
    args = p.parse_args(argv)
    rows = args.variants.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(ROWS)}", file=sys.stderr)
        return 2

    from _common import (DEFAULT_WORKDIR, ensure_checkpoints, load_average, machine_description,
                                      memory_read_bandwidth, run_child, write_result)

    dirs = ensure_checkpoints(args.workdir or DEFAULT_WORKDIR, sorted({ROWS[r][0] for r in rows}), preset=args.preset)
    bandwidth = memory_read_bandwidth()
    print(f"memory read bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    results = []
    capabilities = [c for c in args.capabilities.split(",") if c]
    for r in rows:
        variant, attn, label = ROWS[r]
        for cap in (capabilities or [None]) if variant in ("int4", "int8") and attn == "sdpa" else [None]:
            print(f"measuring {r}{' under ' + cap if cap else ''} …", file=sys.stderr, flush=True)
            steps = args.bf16_new_tokens if variant == "bf16" else args.new_tokens
            prompt_len = args.bf16_prompt_len if variant == "bf16" else args.prompt_len
            profile = args.profile if variant == "int4" else 0
            cached = (args.workdir or DEFAULT_WORKDIR) / f"decode-{args.preset}-{r}-{prompt_len}-{steps}-{cap or 'native'}-p{profile}.json"
            if args.reuse and cached.is_file():
                results.append(dict(json.loads(cached.read_text()), reused=True))
                continue
            path = dirs[variant]
            if r == "llamacpp":
                path = ensure_gguf(dirs[variant], args.preset)
                if path is None:
                    print("llama.cpp: llama_cpp (pip install llama-cpp-python) is not importable; row skipped",
                          file=sys.stderr)
                    continue
            res = run_child(__file__, path, variant, attn, prompt_len, steps, profile, capability=cap)
            if "error" in res:
                print(f"error: {r}: {res['error']}", file=sys.stderr)
                return 1
            res.update(row=r, label=label, steps=steps, prompt_len=prompt_len, bandwidth=bandwidth)
            cached.write_text(json.dumps(res))
            results.append(res)
            print(json.dumps(res), file=sys.stderr)
    bandwidth_after = memory_read_bandwidth()

    policy = os.environ.get("OMP_WAIT_POLICY")
    lines = [
        f"## Decode speed: BTLM-3B shape on this CPU ({results[0]['threads']} threads)",
        "",
        f"Prompt {args.prompt_len} tokens (prefill, one forward; bf16: {args.bf16_prompt_len}), then {args.new_tokens} "
        f"greedy decode steps (bf16: {args.bf16_new_tokens}) with the "
        "KV cache; random weights of the released shape, loaded with `from_pretrained` in a fresh process each. "
        f"Roofline = measured memory-read bandwidth / bytes of weights read per decoded token; the bandwidth is the "
        f"one measured by the invocation that measured the row ({bandwidth:.1f} GB/s before this invocation's runs, "
        f"{bandwidth_after:.1f} GB/s after"
        + (", " + ", ".join(sorted({f"{res['bandwidth']:.1f} GB/s" for res in results if res.get("reused") and "bandwidth" in res}))
           + " for the reused rows" if any(res.get("reused") for res in results) else "") + ").",
        "",
        f"Machine: {machine_description()}.",
        "",
        "| variant | CPU capability (kernels) | weights read / token | prefill tok/s (prompt tokens) | decode tok/s (steps timed) | decode roofline tok/s | "
        "fraction of roofline | linears alone tok/s | decode / linears alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        res["roofline"] = res.get("bandwidth", bandwidth) * 1e9 / res["weight_bytes"]
        lines.append(f"| {res['label']} | {res.get('capability', 'not recorded')} | {res['weight_bytes'] / 1e9:.2f} GB | {res['prefill_tok_s']:.2f} ({res.get('prompt_len', args.prompt_len)}) | "
                     f"{res['decode_tok_s']:.2f} ({res['steps']}) | {res['roofline']:.2f} | {res['decode_tok_s'] / res['roofline']:.0%} | "
                     + (f"{res['linears_tok_s']:.2f} | {res['decode_tok_s'] / res['linears_tok_s']:.0%} |"
                        if res.get("linears_tok_s") else "— | — |"))
    lines += ["", "'Linears alone' times only the weight matmuls of one decode step (every block linear and the LM head on "
                  "one row, best of 5; 1 for bf16): the kernels' own limit, so 'decode / linears alone' is the share of the "
                  "step spent in them and the linears' tok/s over the roofline is the kernels' bandwidth fraction."]
    profiled = [res for res in results if res.get("profile")]
    for res in profiled:
        groups, wall = res["profile"]
        ops = sum(groups.values())
        lines += ["", f"Where an int4 decode step's time goes ({res.get('capability')}; torch.profiler self CPU time over "
                      f"{args.profile} steps, {wall / args.profile * 1e3:.0f} ms per step under the profiler):", "",
                  "| part | ms / step | share of the step |", "|---|---|---|"]
        for name, sec in sorted(groups.items(), key=lambda kv: -kv[1]) + [("Python / framework between ops", wall - ops)]:
            lines.append(f"| {name} | {sec / args.profile * 1e3:.1f} | {sec / wall:.0%} |")
    reused = [res["row"] for res in results if res.get("reused")]
    if reused:
        lines += ["", f"Rows {', '.join(reused)} were measured by an earlier invocation with the same settings (`--reuse`); "
                      "the bandwidth above is this invocation's."]
    if not any(res["row"] == "llamacpp" for res in results):
        lines += ["", "llama.cpp: not installed on this machine (`pip install llama-cpp-python` enables the `llamacpp` row); "
                      "an earlier run on a 2-core AVX2 machine measured Q4_0 (FFN padded to 6912) at 5.84 tok/s decode "
                      "against 2.50 for int4 there (0.43×); not measured in this run, so no ratio on this machine."]
    lines += [
              "", f"Command: `{'OMP_WAIT_POLICY=' + policy + ' ' if policy else ''}python benchmarks/decode.py "
                  f"--preset {args.preset} --variants {args.variants} --prompt-len {args.prompt_len} "
                  f"--new-tokens {args.new_tokens} --bf16-new-tokens {args.bf16_new_tokens} --bf16-prompt-len {args.bf16_prompt_len}"
                  f"{' --capabilities ' + args.capabilities if args.capabilities else ''} --profile {args.profile}"
                  f"{' --reuse' if args.reuse else ''}` (machine shared with other jobs; load average "
                  f"{load_average()} at the end).", ""]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
}


def child(path: str, variant: str, attn: str, prompt_len: int, new_tokens: int) -> None:
    import torch

    from btlm.quant.benchutil import load_for_benchmark, weight_bytes

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
    print(json.dumps(dict(prefill_tok_s=prompt_len / prefill_s, decode_tok_s=new_tokens / decode_s,
                          weight_bytes=weight_bytes(model), threads=torch.get_num_threads())))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fp32,eager,bf16,int4", help=f"comma list of {list(ROWS)}")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--bf16-new-tokens", type=int, default=2,
                   help="decode steps timed for bf16 (default 2: a bf16 Conv1D decode step of the 3B model takes ~1 minute on AVX2)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse rows measured by an earlier run with the same settings (kept in --workdir)")
    p.add_argument("--preset", default="3b", help="model shape (3b; small for a quick check)")
    p.add_argument("--workdir", type=Path, default=None, help="where the random checkpoints are kept")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.md")
    args = p.parse_args(argv)
    rows = args.variants.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(ROWS)}", file=sys.stderr)
        return 2

    from btlm.quant.benchutil import DEFAULT_WORKDIR, ensure_checkpoints, load_average, memory_read_bandwidth, run_child

    dirs = ensure_checkpoints(args.workdir or DEFAULT_WORKDIR, sorted({ROWS[r][0] for r in rows}), preset=args.preset)
    bandwidth = memory_read_bandwidth()
    print(f"memory read bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    results = []
    for r in rows:
        variant, attn, label = ROWS[r]
        print(f"measuring {r} …", file=sys.stderr, flush=True)
        steps = args.bf16_new_tokens if variant == "bf16" else args.new_tokens
        cached = (args.workdir or DEFAULT_WORKDIR) / f"decode-{args.preset}-{r}-{args.prompt_len}-{steps}.json"
        if args.reuse and cached.is_file():
            results.append(dict(json.loads(cached.read_text()), reused=True))
            continue
        res = run_child(__file__, dirs[variant], variant, attn, args.prompt_len, steps)
        if "error" in res:
            print(f"error: {r}: {res['error']}", file=sys.stderr)
            return 1
        res.update(row=r, label=label, steps=steps)
        cached.write_text(json.dumps(res))
        results.append(res)
        print(json.dumps(res), file=sys.stderr)
    bandwidth_after = memory_read_bandwidth()

    policy = os.environ.get("OMP_WAIT_POLICY")
    lines = [
        f"## Decode speed: BTLM-3B shape on this CPU ({results[0]['threads']} threads)",
        "",
        f"Prompt {args.prompt_len} tokens (prefill, one forward), then {args.new_tokens} greedy decode steps with the "
        "KV cache; random weights of the released shape, loaded with `from_pretrained` in a fresh process each. "
        f"Roofline = measured memory-read bandwidth ({bandwidth:.1f} GB/s before the runs, {bandwidth_after:.1f} "
        "GB/s after) / bytes of weights read per decoded token.",
        "",
        "| variant | weights read / token | prefill tok/s | decode tok/s (steps timed) | decode roofline tok/s | fraction of roofline |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        res["roofline"] = bandwidth * 1e9 / res["weight_bytes"]
        lines.append(f"| {res['label']} | {res['weight_bytes'] / 1e9:.2f} GB | {res['prefill_tok_s']:.2f} | "
                     f"{res['decode_tok_s']:.2f} ({res['steps']}) | {res['roofline']:.2f} | {res['decode_tok_s'] / res['roofline']:.0%} |")
    reused = [res["row"] for res in results if res.get("reused")]
    if reused:
        lines += ["", f"Rows {', '.join(reused)} were measured by an earlier invocation with the same settings (`--reuse`); "
                      "the bandwidth above is this invocation's."]
    lines += ["", "llama.cpp: not installed on this machine (see docs/quant.md); machine_facts.md reports Q4_0 with the "
                  "FFN padded to 6912 at 8.8 tok/s prefill / 5.4 tok/s decode on the same 2-core CPU (not measured in this run).",
              "", f"Command: `{'OMP_WAIT_POLICY=' + policy + ' ' if policy else ''}python benchmarks/decode.py "
                  f"--preset {args.preset} --variants {args.variants} --prompt-len {args.prompt_len} "
                  f"--new-tokens {args.new_tokens} --bf16-new-tokens {args.bf16_new_tokens}{' --reuse' if args.reuse else ''}` (2-core AVX2 CPU shared with other jobs; load average "
                  f"{load_average()} at the end).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

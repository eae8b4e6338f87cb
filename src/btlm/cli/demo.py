"""``btlm demo`` (``make demo``)."""

from __future__ import annotations

from btlm.cli.common import Parser

DESCRIPTION = """\
The whole training pipeline on CPU in a few minutes, offline: a corpus from the Python standard library's
docstrings, btlm data LMData (128-token rows), btlm run train and eval on configs/params_btlm_tiny_cpu.yaml,
a loss plot, btlm convert to-hf, and a sample generated through AutoModelForCausalLM.

Everything goes to --out; re-running resumes / reuses what is there (delete it to start over)."""


def build_parser(name: str = "demo") -> Parser:
    p = Parser(prog="btlm demo", description=DESCRIPTION)
    p.add_argument("--out", default="demo_out", help="output directory (the demo's own; reused when run again)")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--train-minutes", type=float, default=6.0,
                   help="stop training (at a chunk boundary) after this many minutes, so the demo stays under 10 "
                        "minutes on a slow or busy machine; re-running resumes")
    return p


def execute(name: str, args) -> int:
    from btlm.demo import run_demo

    return run_demo(args.out, args.max_steps, args.train_minutes)

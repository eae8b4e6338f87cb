"""``btlm mup coord-check`` / ``btlm mup sweep``: check a params YAML's muP before spending compute.

The logic is in :mod:`btlm.train.mup`; this module only parses arguments."""

from __future__ import annotations

import argparse

from btlm.cli.common import Parser, add_overwrite, add_seed

DESCRIPTION = """\
Check a params YAML's muP before spending compute.

  btlm mup coord-check --params X.yaml [--widths 64,128,256,512] [--steps 5] [--out DIR]
      RMS of every layer's output vs width over the first steps, muP beside SP: coord_check.csv,
      coord_check.png and one verdict line per layer (exit status 1 when a muP layer grows)
  btlm mup sweep --params X.yaml --widths 64,128,256 --lrs 1e-3,3e-3,1e-2 [--steps 50] [--out DIR]
      training loss vs learning rate per width: sweep.csv, sweep.png and the best LR per width"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive widths, got {text!r}")
    return sorted(set(values))


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return sorted(set(values))


def _common(p: Parser) -> None:
    p.add_argument("--params", "-p", required=True, help="Model Zoo params YAML (either muP spelling)")
    p.add_argument("--out", "-o", default="mup_out", help="output directory")
    add_overwrite(p)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 4 coord-check, 8 sweep)")
    p.add_argument("--seq-len", type=int, default=64, help="sequence length of random-token batches")
    p.add_argument("--data", choices=("auto", "params", "random"), default="auto",
                   help="params: the train_input shards; random: random tokens; auto: shards if present")
    add_seed(p, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def build_parser(name: str = "mup") -> Parser:
    p = Parser(prog="btlm mup", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, metavar="{coord-check,sweep}")
    cc = sub.add_parser("coord-check", help="activation size per layer vs width (muP vs SP)",
                        description="RMS of every layer's output vs width over the first steps, muP beside SP.")
    _common(cc)
    cc.add_argument("--widths", type=_ints, default=[64, 128, 256, 512], help="comma-separated widths")
    cc.add_argument("--steps", type=int, default=5, help="training steps recorded")
    cc.add_argument("--lr", type=float, default=None, help="constant LR (default: the schedule's peak)")
    cc.add_argument("--seeds", type=int, default=1, help="average each point over this many initialisations")
    sw = sub.add_parser("sweep", help="training loss vs learning rate per width",
                        description="Training loss vs learning rate per width; the best LR per width.")
    _common(sw)
    sw.add_argument("--widths", type=_ints, required=True, help="comma-separated widths")
    sw.add_argument("--lrs", type=_floats, required=True, help="comma-separated learning rates")
    sw.add_argument("--steps", type=int, default=50, help="training steps per run")
    return p


def execute(name: str, args) -> int:
    from pathlib import Path

    import torch

    from btlm.train import mup
    from btlm.train.config import load_params

    if args.threads:
        torch.set_num_threads(args.threads)
    from btlm.io import check_output_file

    params, _ = load_params(args.params)
    out = Path(args.out)
    stem = "coord_check" if args.command == "coord-check" else "sweep"
    for name in (f"{stem}.csv", f"{stem}.png"):  # before the runs: never replace a file unasked
        check_output_file(out / name, args.overwrite)
    if args.command == "coord-check":
        rows = mup.coord_check(params, args.widths, steps=args.steps, batch_size=args.batch_size or 4,
                               seq_len=args.seq_len, lr=args.lr, seed=args.seed, data=args.data, seeds=args.seeds)
        print(f"wrote {mup.write_csv(rows, out / 'coord_check.csv')}")
        print(f"wrote {mup.plot_coord_check(rows, out / 'coord_check.png')}")
        entries = mup.verdict(rows)
        print(mup.format_verdict(entries))
        growing = [e["layer"] for e in entries if e["variant"] == "muP" and e["grows"]]
        print("muP verdict: " + (f"FAIL, growing layers: {', '.join(growing)}" if growing
                                 else "OK, no layer grows with width"))
        return 1 if growing else 0
    rows = mup.lr_sweep(params, args.widths, args.lrs, steps=args.steps, batch_size=args.batch_size or 8,
                        seq_len=args.seq_len, seed=args.seed, data=args.data)
    print(f"wrote {mup.write_csv(rows, out / 'sweep.csv')}")
    print(f"wrote {mup.plot_sweep(rows, out / 'sweep.png')}")
    for (variant, width), lr in sorted(mup.best_lrs(rows).items()):
        print(f"best lr  {variant:<4} width {width:>5}: {lr:g}")
    return 0

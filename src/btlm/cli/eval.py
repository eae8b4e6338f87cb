"""``btlm eval-long`` and ``btlm passkey``."""

from __future__ import annotations

import argparse
import sys

from btlm.cli.common import Parser, add_device, add_dtype, add_model, add_out, add_progress, add_seed, progress_enabled

SCALING_HELP = ("none | fixed:F (divide the ALiBi slopes by F) | dynamic:L (divide by K/L past L tokens, L = the "
                "training length, e.g. dynamic:8192)")


class _NumWindows(argparse._StoreAction):
    """``--num-windows``; its old name ``--num-docs`` (it always counted windows) still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in ("--num-docs", "--num_docs"):
            print("warning: --num-docs is deprecated: use --num-windows (it counts windows, not documents)",
                  file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def _common(p: Parser) -> None:
    add_model(p, "model directory (released HF layout)")
    add_out(p)
    add_dtype(p, help_="compute dtype")
    add_device(p)
    add_progress(p)


def build_parser(name: str) -> Parser:
    if name == "eval-long":
        p = Parser(prog="btlm eval-long", description=(
            "Average loss at every token position over windows of --context tokens, for each ALiBi scaling\n"
            "setting, written as loss_by_position.csv / .json / .png in --out (the model card's Figure 5).\n"
            "n_positions is raised to --context automatically."))
        _common(p)
        p.add_argument("--data", required=True,
                       help="a btlm data .h5 shard, a directory of shards, or one .txt / .jsonl file")
        p.add_argument("--context", type=int, default=32768,
                       help="positions scored per window: windows of context+1 tokens (like a Model Zoo row of msl N)")
        p.add_argument("--alibi-scaling", nargs="+", default=["none"], metavar="SETTING",
                       help=f"one or more settings, each: {SCALING_HELP}")
        p.add_argument("--num-windows", "--num-docs", type=int, default=8, action=_NumWindows,
                       help="number of windows to average over (--num-docs: deprecated name)")
        p.add_argument("--logits-chunk", type=int, default=1024, help="positions per logits chunk (memory bound)")
        return p
    p = Parser(prog="btlm passkey", description=(
        "Passkey retrieval: a 5-digit key hidden at several depths of filler text, answered by greedy\n"
        "generation. Writes passkey.csv (per trial), passkey.md (accuracy table), passkey.json and a heat map\n"
        "passkey.png to --out. Deterministic for a --seed."))
    _common(p)
    p.add_argument("--lengths", default="1k,2k,4k,8k", help="prompt lengths in tokens, e.g. 1k,2k,4k,8k,16k")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="relative needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="prompts (different keys) per length and depth")
    p.add_argument("--alibi-scaling", nargs="+", default=["none"], metavar="SETTING",
                   help=f"one or more settings, each: {SCALING_HELP}; with several, each one's files go to "
                        "--out/<setting> (':' written as '_')")
    add_seed(p, help_="seed of the passkeys")
    return p


def execute(name: str, args) -> int:
    progress = progress_enabled(args.progress)
    if name == "eval-long":
        from btlm.eval.long_context import differences, evaluate_long

        curves = evaluate_long(args.model, args.data, args.out, context=args.context, alibi_scaling=args.alibi_scaling,
                               num_windows=args.num_windows, logits_chunk=args.logits_chunk, dtype=args.dtype,
                               device=args.device, overwrite=args.overwrite, progress=progress)
        ref, diffs = differences(curves)
        for label, values in curves.items():
            delta = f" ({diffs[label].mean():+.4f} vs {ref})" if label in diffs else ""
            print(f"{label:>16}: mean loss {values.mean():.4f}{delta}")
        print(f"wrote {args.out}/loss_by_position.csv, .json and .png")
        return 0
    from btlm.eval.passkey import accuracy_table, evaluate_passkey, markdown_table

    results = evaluate_passkey(args.model, args.out, lengths=args.lengths, depths=args.depths, trials=args.trials,
                               alibi_scaling=args.alibi_scaling, seed=args.seed, dtype=args.dtype,
                               device=args.device, overwrite=args.overwrite, progress=progress)
    for label, rows in results.items():
        if len(results) > 1:
            print(f"\nalibi-scaling {label}:")
        print(markdown_table(*accuracy_table(rows)), end="")
    where = args.out if len(results) == 1 else f"{args.out}/<setting>"
    print(f"wrote {where}/passkey.md, .csv, .json and .png")
    return 0

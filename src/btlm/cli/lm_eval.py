"""``btlm lm-eval``: lm-eval's own command line with BTLM registered (see :mod:`btlm.eval.lm_eval_cli`).

Every argument goes to lm-eval (``--help`` shows lm-eval's help); a ``--model`` that is a directory becomes
``--model hf --model_args pretrained=DIR``."""

from __future__ import annotations

import argparse

from btlm.cli.common import Parser


class _PassThrough(Parser):
    """A parser that hands every argument on untouched (lm-eval parses them itself)."""

    def parse_args(self, args=None, namespace=None):
        return argparse.Namespace(argv=list(args or []))


def build_parser(name: str) -> Parser:
    return _PassThrough(prog="btlm lm-eval", add_help=False, description=(
        "Run lm-eval's command line with BTLM registered, so `--model DIR` (or pretrained=DIR) needs no\n"
        "remote code. All arguments are lm-eval's; needs the optional extra .[eval]."))


def execute(name: str, args) -> int:
    from btlm.eval.lm_eval_cli import run_lm_eval

    return run_lm_eval(args.argv)

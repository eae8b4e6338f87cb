"""The ``btlm`` command line: every parser lives in this package, one module per command group.

Each command module has ``build_parser(name)`` and ``execute(name, args)``; the modules only parse,
validate and call library functions (:mod:`btlm.io`, :mod:`btlm.inference`, :mod:`btlm.train`, …), and
this dispatcher owns the one error path: a :class:`btlm.errors.BTLMError` (or an ``OSError``) is printed
as ``error: <one line>`` with exit status 1 (2 for usage errors, as argparse does); ``BTLM_DEBUG=1``
re-raises it with its traceback. Importing this package does not import torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    help: str


COMMANDS: dict[str, Command] = {
    "init": Command("btlm.cli.model", "write a randomly initialised BTLM (+ tokenizer) in the released HF layout"),
    "generate": Command("btlm.cli.model", "generate text from a BTLM checkpoint (local dir or hub id)"),
    "data": Command("btlm.cli.data", "raw text or prompt/completion pairs -> HDF5 shards (Model Zoo LMData, Summarization), inspect, shuffle"),
    "run": Command("btlm.cli.run", "train / eval a Model Zoo YAML config on CPU or GPU(s)"),
    "convert": Command("btlm.cli.convert", "convert training checkpoints to / from the released HF layout"),
    "eval-long": Command("btlm.cli.eval", "loss at every token position up to 32k tokens (position interpolation)"),
    "passkey": Command("btlm.cli.eval", "passkey retrieval accuracy by context length and depth"),
    "quantize": Command("btlm.cli.quant", "weight-only int4 / int8 quantisation for CPU inference"),
    "quality": Command("btlm.cli.quant", "KL divergence and perplexity change of int8 / int4 quantisation"),
    "export-gguf": Command("btlm.cli.quant", "write a GGUF file llama.cpp loads through its JAIS architecture"),
    "mup": Command("btlm.cli.mup", "muP checks: coordinate check and LR-transfer sweep across widths"),
    "serve": Command("btlm.cli.serve", "OpenAI-compatible HTTP server (torch engine with batching, or llama.cpp)"),
    "lm-eval": Command("btlm.cli.lm_eval", "lm-eval's command line with BTLM registered (--model DIR; extra .[eval])"),
    "demo": Command("btlm.cli.demo", "the whole pipeline on CPU in minutes: corpus, data, train, eval, export, sample"),
}

EXIT_CODES = {0: "success, or --help / --version", 1: "runtime error (bad file, missing checkpoint, failed run)",
              2: "usage error (unknown command or option, value out of range)", 130: "interrupted (Ctrl-C)"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: btlm <command> [options]   (btlm <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def build_parser(name: str):
    """The argparse parser of one command (used by the dispatcher and the docs/cli.md generator)."""
    return importlib.import_module(COMMANDS[name].module).build_parser(name)


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages are joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one ``btlm`` command; returns the exit status (see :data:`EXIT_CODES`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(version("btlm"))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"btlm: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from btlm.errors import BTLMError

    module = importlib.import_module(COMMANDS[name].module)
    try:
        args = module.build_parser(name).parse_args(rest)
        return module.execute(name, args) or 0
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (BTLMError, OSError) as err:
        if os.environ.get("BTLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 1)

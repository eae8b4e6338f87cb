"""``btlm`` command line: a thin dispatcher to the subcommand modules.

Each subcommand lives in its own module with a ``main(argv)`` that owns its argparse parser, so
``btlm data …`` and ``python -m btlm.data.create_hdf5_dataset …`` run the same code, and importing the
CLI stays fast (torch is imported only by the subcommand that needs it).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("btlm.inference", "write a randomly initialised BTLM (+ tokenizer) in the released HF layout"),
    "generate": ("btlm.inference", "generate text from a BTLM checkpoint (local dir or hub id)"),
    "data": ("btlm.data.cli", "raw text -> HDF5 shards (Model Zoo LMData), inspect, shuffle"),
    "run": ("btlm.run", "train / eval a Model Zoo YAML config on CPU or GPU(s)"),
    "convert": ("btlm.train.convert", "convert training checkpoints to / from the released HF layout"),
    "eval-long": ("btlm.eval.long_context", "loss at every token position up to 32k tokens (position interpolation)"),
    "passkey": ("btlm.eval.passkey", "passkey retrieval accuracy by context length and depth"),
    "quantize": ("btlm.quant.cli", "weight-only int4 / int8 quantisation for CPU inference"),
    "export-gguf": ("btlm.quant.gguf", "write a GGUF file llama.cpp loads through its JAIS architecture"),
    "mup": ("btlm.train.mup_cli", "muP checks: coordinate check and learning-rate transfer sweep across widths"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: btlm <command> [options]   (btlm <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(version("btlm"))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"btlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Modules serving several commands (init/generate) take the command name first.
    if getattr(module, "MULTI_COMMAND", False):
        return module.main([name, *rest]) or 0
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

"""Render ``docs/cli.md`` from the parsers: ``python -m btlm.cli.docs > docs/cli.md``.

A test compares the file with :func:`render`, so the reference never drifts from the code."""

from __future__ import annotations

import argparse
import sys

from btlm.cli import COMMANDS, EXIT_CODES, build_parser
from btlm.cli.common import HelpFormatter


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
        return ""
    if isinstance(action, argparse._StoreConstAction) and action.const is False:
        return ""
    return f"`{action.default}`"


def _table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | description |", "|---|---|---|"]
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(f"`{s}`" for s in action.option_strings)
            args = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            name += f" `{args}`" if args else ""
        else:
            name = f"`{action.metavar or action.dest}`"
        choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
        rows.append(f"| {name} | {_cell(_default(action))} | {_cell(action.help or '')}{_cell(choices)} |")
    return rows


def _summary(parser: argparse.ArgumentParser) -> str:
    """The description's first paragraph, on one line."""
    return " ".join((parser.description or "").split("\n\n")[0].split())


def _sections(parser: argparse.ArgumentParser, title: str) -> list[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    out = [f"## `{title}`", "", _summary(parser), ""]
    if not subs:
        return out + [*_table(parser), ""]
    for name, sub in subs[0].choices.items():
        out += [f"### `{title} {name}`", "", _summary(sub), "", *_table(sub), ""]
    return out


def render() -> str:
    """The whole of ``docs/cli.md``."""
    lines = ["# The `btlm` command line", "",
             "Generated from the parsers by `python -m btlm.cli.docs > docs/cli.md` (a test checks it is current).",
             "", "Conventions, for every command:", "",
             "- options are kebab-case, and the snake_case spelling is accepted too (`--model-dir` = `--model_dir`);",
             "- a boolean option takes the bare flag or a value: `--strict`, `--strict True`, `--strict false`;",
             "- `--dtype` takes `fp32`, `bf16`, `fp16` (or `float32`, `bfloat16`, `float16`), as far as the command "
             "supports them;",
             "- long commands show progress bars when stderr is a terminal; `--progress` / `--no-progress` decide;",
             "- a command that writes refuses a non-empty output directory (or an existing output file) unless "
             "`--overwrite`, which replaces only the files btlm writes; a file where a directory is expected (or "
             "the reverse) is refused before any work;",
             "- errors are one line, `error: <what is wrong>`; `BTLM_DEBUG=1` shows the traceback.", "",
             "## Exit codes", "", "| code | meaning |", "|---|---|"]
    lines += [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items()]
    lines += ["", "## Commands", "", "| command | what it does |", "|---|---|"]
    lines += [f"| `btlm {name}` | {_cell(cmd.help)} |" for name, cmd in COMMANDS.items()]
    lines.append("")
    for name in COMMANDS:
        lines += _sections(build_parser(name), f"btlm {name}")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())

"""Conventions shared by every ``btlm`` command, and the option groups that several commands take.

* Every long option is kebab-case, and its snake_case spelling is accepted too (``--model-dir`` and
  ``--model_dir``: Model Zoo users type the one, Hugging Face users the other).
* A boolean option accepts the bare flag and an explicit value: ``--strict``, ``--strict True``,
  ``--strict false``.
* Help shows every default.
* ``--dtype`` takes one vocabulary everywhere (fp32 / bf16 / fp16, or float32 / bfloat16 / float16).
* ``--progress`` / ``--no-progress`` on every long command; default: on when stderr is a terminal.
* Commands that write take ``--overwrite`` (see the output-path policy in :mod:`btlm.io`).
"""

from __future__ import annotations

import argparse
import sys

from btlm.io import DTYPE_ALIASES


def str2bool(value) -> bool:
    """``True``/``False`` (also yes/no, 1/0, any case) → bool; the Model Zoo passes booleans this way."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _spellings(names: tuple[str, ...]) -> list[str]:
    out = []
    for name in names:
        if name.startswith("--"):
            kebab, snake = "--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")
            out += [kebab] + ([snake] if snake != kebab else [])
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def _conventions(names: tuple[str, ...], kwargs: dict) -> tuple[list[str], dict]:
    kwargs = dict(kwargs)
    if kwargs.get("action") == "store_true":  # bare flag or an explicit value
        kwargs.pop("action")
        kwargs.setdefault("default", False)
        kwargs["type"] = str2bool
    if kwargs.get("type") is str2bool and "nargs" not in kwargs:
        kwargs.update(nargs="?", const=True, metavar="BOOL")
    if not names[0].startswith("-"):
        return list(names), kwargs
    return _spellings(names), kwargs


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks, shows defaults, and prints an option's spellings once
    followed by its argument (``--max-new-tokens, --max_new_tokens N``)."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        default = action.default
        if ("%(default)" in help_ or action.required or default in (None, argparse.SUPPRESS)
                or not action.option_strings or isinstance(action, argparse._HelpAction)):
            return help_
        if isinstance(action, argparse._StoreConstAction) and action.const is False:
            return help_  # the --no-X half of a pair: the default is shown on the X half
        return f"{help_} (default: %(default)s)"

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return ", ".join(action.option_strings) + " " + self._format_args(action, self._get_default_metavar_for_optional(action))


class _Group(argparse._ArgumentGroup):
    def add_argument(self, *names, **kwargs):
        names, kwargs = _conventions(names, kwargs)
        return super().add_argument(*names, **kwargs)


class _ExclusiveGroup(argparse._MutuallyExclusiveGroup):
    def add_argument(self, *names, **kwargs):
        names, kwargs = _conventions(names, kwargs)
        return super().add_argument(*names, **kwargs)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with btlm's conventions applied to every option it is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        names, kwargs = _conventions(names, kwargs)
        return super().add_argument(*names, **kwargs)

    def add_mutually_exclusive_group(self, **kwargs):
        group = _ExclusiveGroup(self, **kwargs)
        self._mutually_exclusive_groups.append(group)
        return group

    def add_argument_group(self, *args, **kwargs):
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group


# ------------------------------------------------------------------------------------ option groups


def add_model(parser, help_: str = "BTLM model directory (config.json + weights, released HF layout)") -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help=help_)


def add_overwrite(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing output; only the files btlm writes are replaced")


def add_out(parser, kind: str = "dir", help_: str | None = None) -> None:
    """``--out`` (a directory or a file, per ``kind``) and ``--overwrite``."""
    default_help = {"dir": "output directory (must be empty or new unless --overwrite)",
                    "file": "output file (must be new unless --overwrite)"}[kind]
    parser.add_argument("--out", required=True, metavar="DIR" if kind == "dir" else "FILE",
                        help=help_ or default_help)
    add_overwrite(parser)


def dtype_type(choices):
    """An argparse ``type`` accepting the one ``--dtype`` vocabulary, restricted to ``choices``."""
    def parse(value: str) -> str:
        canonical = DTYPE_ALIASES.get(str(value).strip().lower())
        if canonical is None or canonical not in choices:
            raise argparse.ArgumentTypeError(f"invalid dtype {value!r}; choose one of {', '.join(choices)}")
        return canonical

    parse.__name__ = "dtype"
    return parse


def add_dtype(parser, default: str = "fp32", choices=("fp32", "bf16", "fp16"), help_: str = "dtype") -> None:
    parser.add_argument("--dtype", default=default, type=dtype_type(choices), metavar="{" + ",".join(choices) + "}",
                        help=f"{help_} (also float32 / bfloat16 / float16)")


def add_device(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu; always cpu for quantised models)")


def add_seed(parser, default: int = 0, help_: str = "random seed") -> None:
    parser.add_argument("--seed", type=int, default=default, help=help_)


def add_progress(parser, dest: str = "progress", aliases: tuple[str, ...] = ()) -> None:
    """``--progress [BOOL]`` (and ``aliases``, e.g. the Model Zoo's ``--display_pbar``) / ``--no-progress``;
    unset means: on when stderr is a terminal."""
    parser.add_argument("--progress", *aliases, dest=dest, action="store_true", default=None,
                        help="show progress bars (default: when stderr is a terminal)")
    parser.add_argument("--no-progress", dest=dest, action="store_const", const=False, help="no progress bars")


def progress_enabled(value: bool | None) -> bool:
    """The ``--progress`` setting, or whether stderr is a terminal when it was not given."""
    return sys.stderr.isatty() if value is None else bool(value)


def positive(name: str, value, minimum=1) -> None:
    """Usage error unless ``value >= minimum`` (the option is named as the user spelt it)."""
    from btlm.errors import UsageError

    if value is not None and value < minimum:
        raise UsageError(f"--{name} {value}: expected an integer >= {minimum}")

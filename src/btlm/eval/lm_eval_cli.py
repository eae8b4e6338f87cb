"""``btlm lm-eval``: lm-eval's own command line with BTLM registered, so ``pretrained=DIR`` needs no remote code.

``btlm lm-eval --model DIR --tasks hellaswag …`` runs ``lm-eval run --model hf --model_args pretrained=DIR
--tasks hellaswag …``: a ``--model`` that is a directory becomes lm-eval's ``hf`` model with that directory
(merged with any ``--model_args``); every other argument goes to lm-eval unchanged. ``import btlm``
registers the BTLM classes with transformers' Auto classes first. lm-eval is the optional extra
``.[eval]``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def lm_eval_argv(argv: list[str]) -> list[str]:
    """lm-eval ``run`` arguments for ``btlm lm-eval`` arguments (see the module docstring)."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name not in ("--model", "-M"):
            continue
        if not eq:
            if i + 1 >= len(out):
                break
            value = out[i + 1]
        if Path(value).is_dir():
            replacement = ["--model", "hf", "--model_args", f"pretrained={value}"]
            out[i:i + (1 if eq else 2)] = replacement
        break
    return ["run", *out] if out and out[0] not in ("run", "ls", "validate", "-h", "--help") else out


def run_lm_eval(argv: list[str]) -> int:
    """Run lm-eval's command line on ``btlm lm-eval`` arguments; returns lm-eval's exit status."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        from btlm.errors import BTLMError

        raise BTLMError("btlm lm-eval needs lm-eval: pip install 'btlm[eval]'") from None
    import btlm  # noqa: F401  (registers BTLM with the transformers Auto classes)

    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(argv)]
    try:
        cli_evaluate()
    except SystemExit as exit_:  # argparse / lm-eval exits: pass the status on
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    return 0

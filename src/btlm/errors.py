"""The errors btlm raises for bad input, settings or files.

Every error a user can cause derives from :class:`BTLMError`; its message is one line that names the
file, key or value and says what was expected. The ``btlm`` command prints ``error: <message>`` for
these and exits 1 (2 for a :class:`UsageError`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BTLMError(Exception):
    """Base of every error caused by input, settings or the environment (exit status 1)."""

    exit_code = 1


class UsageError(BTLMError, ValueError):
    """A command-line value out of range or inconsistent with another (exit status 2, like argparse)."""

    exit_code = 2


class OutputPathError(BTLMError, FileExistsError):
    """An output path that would overwrite or delete something btlm did not write."""


class LockError(BTLMError, RuntimeError):
    """A model directory another ``btlm run`` process is using."""

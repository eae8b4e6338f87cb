"""An offline English corpus that every Python install has: the docstrings of a source tree (by default the
standard library's), one document per module. The demo trains on it, ``btlm quality --tiny-trained``
trains its byte model on part of it, and ``benchmarks/data_prep.py`` measures data preparation on it.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

#: folders left out: test suites (code more than English), IDLE, vendored packages, the 2to3 fixers
SKIP = ("test", "tests", "idlelib", "site-packages", "lib2to3")


def module_docstrings(root: str | Path | None = None, min_chars: int = 80, skip: tuple[str, ...] = SKIP,
                      names: set[str] | None = None) -> Iterator[tuple[str, str]]:
    """``(name, text)`` for every ``.py`` file below ``root`` (default: the standard library), in sorted path
    order: ``name`` is the module path joined by ``_`` (``json___init__``, ``email_parser``) and ``text`` its
    module, class and function docstrings longer than ``min_chars`` (shorter ones are mostly identifiers,
    little English), joined by blank lines; ``""`` for a file with none or one that does not parse.
    ``names``: only these modules (the others are not parsed)."""
    src = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, filenames in os.walk(src):  # skipped folders are not entered (site-packages is big)
        subfolders[:] = [d for d in subfolders if d not in skip]
        files += [Path(folder, f) for f in filenames if f.endswith(".py") and f not in skip]
    files.sort()
    for path in files:
        name = "_".join(path.relative_to(src).with_suffix("").parts)
        if names is not None and name not in names:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            yield name, ""
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > min_chars:
                    docs.append(doc.strip())
        yield name, "\n\n".join(docs)

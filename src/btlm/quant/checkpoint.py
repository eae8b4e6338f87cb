"""Read single tensors of a safetensors checkpoint into fresh memory (``pread``), by parameter name.

``from_pretrained`` leaves parameters as views of the memory-mapped files; reading such a view pages the
file into this process (and counts in its RSS for as long as the mapping lives). The loader of quantised
models reads what it must convert (int4 codes to pack, int8 weights to align) through here instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open


class TensorReader:
    """``reader.for_module(prefix)(name)`` → tensor ``prefix.name`` read from whichever file holds it,
    or None where no file does (then the caller uses the loaded parameter). Falsy without files."""

    def __init__(self, files):
        self.files = [str(f) for f in files if str(f).endswith(".safetensors") and Path(f).is_file()]
        self._handles: list = []
        self._where: dict[str, object] = {}

    def __enter__(self) -> "TensorReader":
        for f in self.files:
            try:
                handle = safe_open(f, framework="pt", backend="pread")
            except TypeError:  # a safetensors without the pread backend
                handle = safe_open(f, framework="pt")
            self._handles.append(handle)
            self._where.update(dict.fromkeys(handle.keys(), handle))
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()
        self._where.clear()

    def __bool__(self) -> bool:
        return bool(self.files)

    def get(self, key: str) -> torch.Tensor | None:
        handle = self._where.get(key)
        return None if handle is None else handle.get_tensor(key)

    def for_module(self, prefix: str) -> Callable[[str], torch.Tensor | None]:
        return lambda name: self.get(f"{prefix}.{name}" if prefix else name)

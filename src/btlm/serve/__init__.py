"""``btlm serve``: an OpenAI-compatible HTTP server for BTLM models (optional extra ``.[serve]``).

* :mod:`btlm.serve.engine` — the engine interface and :class:`~btlm.serve.engine.TorchEngine`, which batches
  concurrent requests continuously over one KV cache (CPU or GPU; fp32, bf16, int8, int4 directories).
* :mod:`btlm.serve.llama_engine` — the llama.cpp engine for ``.gguf`` files from ``btlm export-gguf``
  (optional extra ``.[llama]``).
* :mod:`btlm.serve.app` — the FastAPI application (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/health``), :mod:`btlm.serve.protocol` — request validation and errors.
* :func:`load_engine` / :func:`serve` — what ``btlm serve`` calls.
"""

from __future__ import annotations

import os
from pathlib import Path

from btlm.errors import BTLMError, UsageError


def check_dependencies() -> None:
    """One clear error when the ``serve`` extra (FastAPI, uvicorn) is not installed."""
    import importlib.util

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise BTLMError(f"btlm serve needs {module!r}: pip install 'btlm[serve]'")


def load_engine(model: str | os.PathLike, engine: str = "auto", dtype=None, device: str | None = None,
                max_batch_size: int = 32, n_ctx: int | None = None, n_threads: int | None = None):
    """The engine for ``model``: a btlm model directory (torch) or a ``.gguf`` file (llama.cpp).

    ``engine="auto"`` picks llama.cpp for a ``.gguf`` file and torch otherwise.
    """
    path = Path(model)
    if engine == "auto":
        engine = "llama.cpp" if path.suffix == ".gguf" else "torch"
    if engine == "torch":
        if path.suffix == ".gguf":
            raise BTLMError(f"{path} is a GGUF file: serve it with --engine llama.cpp (the torch engine takes a "
                             "btlm model directory)")
        from .engine import TorchEngine

        return TorchEngine.from_path(path, dtype=dtype, device=device, max_batch_size=max_batch_size)
    if engine == "llama.cpp":
        from .llama_engine import LlamaCppEngine

        return LlamaCppEngine.from_path(path, n_ctx=n_ctx, n_threads=n_threads)
    raise UsageError(f"unknown engine {engine!r}; choose torch or llama.cpp")


def default_model_name(model: str | os.PathLike) -> str:
    """The model id served for a path: its directory or file name (without ``.gguf``)."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def serve(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the HTTP server in the foreground until interrupted; the engine is closed on the way out."""
    check_dependencies()
    import uvicorn

    from .app import create_app

    try:
        uvicorn.run(create_app(engine, model_name), host=host, port=port, log_level=log_level)
    finally:
        engine.close()

"""Files btlm reads and writes: atomic writes, the output-path policy, model directories, the
tokenizer of a directory, devices, and the lock of a training directory.

The output-path policy, used by every command that writes:

* a path that is a file where a directory is expected (or the reverse) is refused before any compute;
* an existing, non-empty output directory (or an existing output file) is refused unless
  ``overwrite=True``;
* with ``overwrite=True`` only the files btlm writes are replaced: a model directory loses its old
  weights / config / tokenizer files (so no stale shard is mixed with the new ones) and keeps
  everything else (notes, checkpoints, logs).

Nothing here imports torch at module load, so the data pipeline and the command line stay light.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from btlm.errors import BTLMError, LockError, OutputPathError, UsageError

#: Files of a model directory that btlm writes (``save_pretrained`` + the tokenizer); ``--overwrite``
#: replaces these and nothing else.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "added_tokens.json", "chat_template.jinja")

#: dtype names every command accepts (``--dtype``), with their long spellings.
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                 "float16": "fp16", "auto": "auto"}


class ModelLoadError(BTLMError, RuntimeError):
    """A model directory or checkpoint that cannot be loaded as BTLM (the message says why)."""


# ------------------------------------------------------------------------------------ atomic writes


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path of ``path``; renamed onto ``path`` when the block succeeds.

    A killed or failing writer leaves ``path`` as it was (absent or the previous complete file) and no
    temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # the mode open() would give, not mkstemp's private 0600
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary sibling and ``os.replace``
    (``fsync=False`` skips the flush to disk, for small files rewritten often)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def _owned(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, owned=MODEL_FILES):
    """Yield a temporary directory whose files become ``out_dir``'s when the block succeeds.

    A missing or empty ``out_dir`` is replaced by the temporary directory in one rename. An existing
    one is refused (:class:`OutputPathError`) unless ``overwrite``; then the files matching ``owned``
    that the new set does not contain are removed, the new files are renamed in one by one
    (``config.json`` last, so a directory never looks complete before its weights are there), and
    every other file is kept."""
    out = Path(out_dir).absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(tmp, out)
            return
        new = sorted(p.name for p in tmp.iterdir())
        for old in out.iterdir():
            if old.is_file() and _owned(old.name, owned) and old.name not in new:
                old.unlink()
        for name in sorted(new, key=lambda n: n == "config.json"):
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ output-path policy


def _check_parent(p: Path, what: str) -> None:
    """The nearest existing ancestor of ``p`` must be a directory (else nothing can be written there)."""
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{what} {p}: {parent} is a file, not a directory")
            return


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "output directory") -> Path:
    """Refuse (before any compute) an output directory that is a file, or that holds files, unless
    ``overwrite``. Returns the path."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what} {p} is a file; expected a directory")
    if p.is_dir() and not overwrite:
        entries = sorted(e.name for e in p.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputPathError(f"{what} {p} is not empty ({shown}); pass --overwrite to replace the files "
                                  "btlm writes there (other files are kept), or choose another directory")
    _check_parent(p, what)
    return p


def check_output_file(path: str | os.PathLike, overwrite: bool = False, what: str = "output file") -> Path:
    """Refuse (before any compute) an output file path that is a directory, or an existing file unless
    ``overwrite``. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{what} {p} is a directory; expected a file name")
    if p.exists() and not overwrite:
        raise OutputPathError(f"{what} {p} already exists; pass --overwrite to replace it")
    _check_parent(p, what)
    return p


# ------------------------------------------------------------------------------------ dtype, device


def dtype_name(name: str | None) -> str | None:
    """The canonical spelling (``fp32``/``bf16``/``fp16``/``auto``) of a ``--dtype`` value."""
    if name is None:
        return None
    key = str(name).strip().lower()
    if key not in DTYPE_ALIASES:
        raise UsageError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16 (or float32, bfloat16, float16)")
    return DTYPE_ALIASES[key]


def parse_dtype(name):
    """``"fp32"``/``"bf16"``/``"fp16"``/``"auto"`` (or a ``torch.dtype``) → what ``from_pretrained`` takes."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    canonical = dtype_name(name)
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}[canonical]


def resolve_device(spec: str | None = None, model_path: str | os.PathLike | None = None):
    """The device to run on: ``spec`` if given (``"cuda:N"`` is checked against the visible GPUs), else
    CUDA when available, else CPU.

    With ``model_path`` a quantised (int4/int8) model directory the answer is always CPU: its kernels are
    PyTorch's weight-only CPU kernels, so it defaults to CPU even on a GPU machine and asking for another
    device is one :class:`ModelLoadError`."""
    import torch

    bits = _quantized_bits(model_path) if model_path is not None else None
    if bits is not None:
        if spec is not None and _device_type(spec) != "cpu":
            raise ModelLoadError(f"{model_path} is an int{bits} quantised model, which runs on CPU only; "
                                 f"got device {spec!r} (use --device cpu or leave it out)")
        return torch.device("cpu")
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BTLMError(f"--device {spec}: this PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            raise BTLMError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0 … cuda:{count - 1})")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise UsageError(f"--device {spec!r} is not supported (expected cpu, cuda or cuda:N)")
    return device


def resolve_auto_dtype(dtype, device, log=None):
    """``--dtype auto`` on CPU: bf16 where this CPU has native bf16 and measures it faster, else fp32
    (:func:`btlm.precision.choose_cpu_dtype`; ``log`` gets the choice and why). On other devices, and for
    any other value, ``dtype`` is returned unchanged (``auto`` then means the checkpoint's dtype)."""
    if dtype != "auto" or _device_type(device) != "cpu":
        return dtype
    from btlm.precision import choose_cpu_dtype

    choice = choose_cpu_dtype()
    if log is not None:
        log(f"--dtype auto: {choice}")
    return choice.dtype


def _device_type(spec) -> str:
    import torch

    try:
        return torch.device(spec).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device (expected cpu, cuda or cuda:N)") from None


def _quantized_bits(model_path: str | os.PathLike) -> int | None:
    """The weight bits of a quantised model directory (``quantization_config.bits``), else None."""
    import json

    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        quant = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # reported properly when the model is loaded
    return quant.get("bits", "?") if isinstance(quant, dict) and quant else None


# ------------------------------------------------------------------------------- model directories


def _looks_like_hub_id(path: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", path) is not None


def check_model_dir(path: str) -> None:
    """Fail early, naming the path, for a local directory that cannot hold a model.

    A string that is not an existing path but has the hub form ``owner/name`` is left to the hub
    machinery (e.g. ``cerebras/btlm-3b-8k-base``)."""
    p = Path(path)
    if not p.exists():
        if _looks_like_hub_id(path):
            return
        raise ModelLoadError(f"model directory {path} does not exist")
    if not p.is_dir():
        raise ModelLoadError(f"{path} is a file; expected a model directory")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model directory")
    if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{path} has no weights (model*.safetensors or pytorch_model*.bin)")


def read_config(path: str | os.PathLike, **overrides):
    """``BTLMConfig`` of a model directory; a malformed or mistyped ``config.json`` is a
    :class:`ModelLoadError` naming the file and the value."""
    import json

    from btlm.model import BTLMConfig

    config_file = Path(path) / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{config_file} is not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{config_file}: expected a JSON object")
        for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = raw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ModelLoadError(f"{config_file}: {key} = {value!r}; expected a positive integer")
    try:
        return BTLMConfig.from_pretrained(str(path), **overrides)
    except (ValueError, TypeError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{Path(path) / 'config.json'}: not a valid BTLM config ({first})") from None


def load_model(path: str | os.PathLike, dtype=None, device=None, **config_overrides):
    """Load a BTLM checkpoint (a local directory or a hub id) in the released HF layout.

    Accepts ``pytorch_model.bin`` (loaded with ``weights_only``), ``model.safetensors`` and sharded
    variants; legacy ``attn.bias``/``attn.masked_bias`` buffers are ignored. Missing keys or wrong
    shapes raise :class:`ModelLoadError` naming them, instead of leaving randomly initialised weights;
    so do an unreadable (e.g. truncated) weights file and a malformed ``config.json``.
    ``config_overrides`` edit the config before loading (e.g. ``n_positions=16384,
    alibi_scaling={"type": "linear", "train_seq_len": 8192}``).
    """
    from btlm.model import BTLMLMHeadModel

    path = str(path)
    check_model_dir(path)
    config = read_config(path, **config_overrides)
    validate_config(config, path)
    # ignore_mismatched_sizes only defers the shape check to us, so the error can name the keys.
    try:
        model, info = BTLMLMHeadModel.from_pretrained(
            path, config=config, dtype=parse_dtype(dtype) or "auto", output_loading_info=True,
            ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, EOFError) as err:
        if isinstance(err, BTLMError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path}: cannot read the weights ({type(err).__name__}: {first})") from None
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        if type(err).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"{path}: cannot read the weights (safetensors: {err})") from None
    missing = sorted(k for k in info["missing_keys"] if k != "lm_head.weight")
    mismatched = [f"{k[0]} (checkpoint {list(k[1])}, model {list(k[2])})" if isinstance(k, tuple) and len(k) == 3
                  else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise ModelLoadError(
            f"checkpoint {path} does not match its config.json: missing keys {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}; wrong shapes {mismatched[:8]}"
        )
    if device is not None:
        model = model.to(device)
    return model.eval()


def validate_config(config, path: str) -> None:
    """Types and ranges of the config fields the model needs (a string ``n_head`` otherwise fails deep
    inside model construction)."""
    where = f"{Path(path) / 'config.json'}" if Path(path).is_dir() else path
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = getattr(config, key, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"{where}: {key} = {value!r}; expected a positive integer")
    if config.n_embd % config.n_head:
        raise ModelLoadError(f"{where}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")


def resolve_tokenizer(model_dir: str | os.PathLike | None = None):
    """The tokenizer stored next to a model's weights, or BTLM's GPT-2 BPE when the directory has none."""
    from btlm.tokenizer import load_tokenizer

    if model_dir is not None and Path(model_dir, "tokenizer_config.json").is_file():
        return load_tokenizer(model_dir)
    return load_tokenizer()


def save_model(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False, **save_kwargs) -> Path:
    """Write ``model`` (config.json + safetensors in the released layout) and the tokenizer to ``out_dir``.

    ``tokenizer``: the one to bundle (default GPT-2's), or ``False`` for none (a model whose vocabulary
    GPT-2's ids do not fit).

    The files are written into a temporary sibling directory and moved into place when complete (see
    :func:`atomic_dir`), so a killed process never leaves a half-written model that looks finished, and
    an existing ``out_dir`` is refused unless ``overwrite`` (which replaces only model files).
    """
    from btlm.tokenizer import save_tokenizer

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not False:
            save_tokenizer(tmp, tokenizer)
    return Path(out_dir).absolute()


# --------------------------------------------------------------------------------- training lock

LOCK_NAME = ".btlm-run.lock"


@contextlib.contextmanager
def model_dir_lock(model_dir: str | os.PathLike):
    """Hold ``<model_dir>/.btlm-run.lock`` for the duration of a training run.

    The lock is an ``flock`` on the file, which the kernel releases when the holder exits however it
    ends, so the lock of a killed run is recovered by the next run; the file names the holder's pid so
    the refusal can say who holds it."""
    import fcntl

    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise OutputPathError(f"--model_dir {model_dir} is a file; expected a directory")
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        raise LockError(f"{model_dir} is in use by another btlm run ({holder}, lock {path}); wait for it to "
                        "finish or use another --model_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock

"""The built wheel works on its own: installed into a fresh virtual environment (its dependencies borrowed
from this one), ``btlm demo`` runs from a directory outside the repository with the YAML configs that ship
inside the package, and btlm is imported from the install, not from the source tree."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the project (the build writes build/ and *.egg-info beside its sources)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src" / "btlm", tree / "src" / "btlm", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(tree)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("btlm-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed (no btlm of this environment's in sight) that finds the other
    dependencies in this environment's site-packages (a path, so its .pth files, the editable btlm's among
    them, are not read)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_deps_from_test_env.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    return venv


def test_the_demo_runs_from_an_installed_wheel(tmp_path):
    wheel = _build_wheel(tmp_path)
    venv = _fresh_venv(tmp_path, wheel)
    run_dir = tmp_path / "elsewhere"
    # a small corpus where the demo looks for it, so the run takes seconds (the demo reuses a corpus it finds)
    rng = random.Random(0)
    words = "the model reads a list of tokens and returns the next one with its weights".split()
    for split, n_docs in (("train", 12), ("val", 6)):
        (run_dir / "demo" / "corpus" / split).mkdir(parents=True)
        for i in range(n_docs):
            (run_dir / "demo" / "corpus" / split / f"{i}.txt").write_text(" ".join(rng.choices(words, k=300)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import btlm.demo as d; print(d.__file__); "
                            "print(d.CONFIG.is_file())"], cwd=run_dir, env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    assert Path(where[0]).is_relative_to(venv) and where[1] == "True", where

    res = subprocess.run([str(venv / "bin" / "btlm"), "demo", "--out", "demo", "--max-steps", "2"], cwd=run_dir,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done in" in res.stdout and (run_dir / "demo" / "hf_model" / "config.json").is_file()
    assert (run_dir / "demo" / "model_dir" / "checkpoint_2.mdl").is_file()

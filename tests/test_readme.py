"""The README's data-and-training quickstart runs as written from a fresh directory (the repository's
configs/ beside it), with 2 training steps instead of 200 and a small corpus."""

from __future__ import annotations

import random
import re
import shlex
from pathlib import Path

import torch

from btlm.cli import main as btlm

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart: data and training"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("btlm ")]


def test_data_and_training_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    rng = random.Random(0)
    words = "the model reads a list of tokens and returns the next one with its weights".split()
    for split, n_docs in (("train", 12), ("val", 4)):
        (tmp_path / "raw" / split).mkdir(parents=True)
        for i in range(n_docs):
            (tmp_path / "raw" / split / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    commands = _quickstart_commands()
    assert [c.split()[1] for c in commands] == ["data", "data", "data", "run", "run", "convert", "generate"]
    for line in commands:
        line = line.replace("--max-steps 200", "--max-steps 2").replace("checkpoint_200", "checkpoint_2")
        assert btlm(shlex.split(line)[1:]) == 0, (line, capsys.readouterr().err[-2000:])
    assert (tmp_path / "runs" / "tiny-hf" / "model.safetensors").is_file()
    assert "Return a new list" in capsys.readouterr().out


def test_the_layout_section_names_what_is_in_the_tree():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    named = set(re.findall(r"(?:src/btlm/|^|\s)([\w./]+)", block, re.M))
    for path in re.findall(r"src/btlm/[\w./]*", block):
        assert (ROOT / path).exists(), f"README layout names {path}, which is not in the tree"
    for entry in (ROOT / "src" / "btlm").iterdir():
        if entry.name in ("__init__.py", "__main__.py", "__pycache__"):
            continue
        shown = entry.name + ("/" if entry.is_dir() else "")
        assert any(n.rstrip("/").endswith(entry.name) for n in named), f"README layout lacks src/btlm/{shown}"
    for top in ("benchmarks", "docs", "tests"):
        assert top + "/" in block and (ROOT / top).is_dir()
    assert (ROOT / "configs").resolve() == (ROOT / "src" / "btlm" / "configs").resolve()

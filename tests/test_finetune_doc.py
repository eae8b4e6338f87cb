"""docs/finetune.md runs as written from a fresh directory: init, Summarization data, the LoRA script
(peft + Trainer), generate from the merged model; with 2 steps instead of 200 and rows of 64 tokens."""

from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import torch

from btlm.cli import main as btlm

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_recipe_runs_as_written(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    text = (ROOT / "docs" / "finetune.md").read_text()
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in bash.splitlines()]
    lines = [line for line in lines if line.startswith(("btlm ", "python "))]
    assert [line.split()[1] for line in lines] == ["init", "data", "data", "finetune.py", "generate"]
    script = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "max_steps=200" in script
    (tmp_path / "finetune.py").write_text(script.replace("max_steps=200", "max_steps=2"))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "qa.jsonl").write_text("".join(
        json.dumps({"prompt": f"Q: What is {i} plus {i}?\nA:", "completion": f" {2 * i}."}) + "\n" for i in range(20)))
    monkeypatch.chdir(tmp_path)
    for line in lines:
        if line.startswith("python "):
            runpy.run_path(str(tmp_path / "finetune.py"), run_name="__main__")
        else:
            line = line.replace("--max_seq_length 256", "--max_seq_length 64")
            assert btlm(shlex.split(line)[1:]) == 0, (line, capsys.readouterr().err[-2000:])
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "ft" / "merged" / "model.safetensors").is_file()
    assert "Q: What is the capital of France?" in capsys.readouterr().out


def test_btlm_run_lora_recipe_runs_as_written(tmp_path, monkeypatch, capsys):
    """The `btlm run` route of docs/finetune.md with its config: a fresh base in place of the demo's trained one
    and 2 training steps instead of 40."""
    from btlm.train.checkpoint import atomic_torch_save
    from btlm.train.config import load_params
    from btlm.train.zoo_model import build_model

    torch.set_num_threads(1)
    text = (ROOT / "docs" / "finetune.md").read_text()
    section = text[text.index("### The `btlm run` route"):]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in bash.splitlines()]
    lines = [line for line in lines if line.startswith(("btlm ", "python "))]
    assert [line.split()[1] for line in lines] == ["demo", "make_pairs.py", "data", "data", "run", "convert",
                                                   "convert", "generate"]
    (tmp_path / "make_pairs.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        if line == "btlm demo":  # the demo's trained base, replaced by a fresh one of the same config
            params, _ = load_params(ROOT / "configs" / "params_btlm_tiny_cpu.yaml")
            (tmp_path / "demo_out" / "model_dir").mkdir(parents=True)
            atomic_torch_save({"model": build_model(params.model, params.optimizer, seed=1).state_dict(),
                               "global_step": 0}, tmp_path / "demo_out" / "model_dir" / "checkpoint_200.mdl")
        elif line.startswith("python "):
            runpy.run_path(str(tmp_path / "make_pairs.py"), run_name="__main__")
        else:
            line = line.replace("checkpoint_40.mdl", "checkpoint_2.mdl")
            argv = shlex.split(line)[1:] + (["--max_steps", "2"] if line.startswith("btlm run") else [])
            assert btlm(argv) == 0, (line, capsys.readouterr().err[-2000:])
    run_dir = tmp_path / "runs" / "tiny_lora"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "merged" / "model.safetensors").is_file() and (run_dir / "eval").is_dir()
    assert "Q: What is 3 plus 4?" in capsys.readouterr().out

"""``btlm run`` / ``btlm convert``: one trainer per model_dir, nothing unpickled on an automatic path, bad data
and bad settings refused with one line before any compute."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import yaml

from btlm.cli import main as btlm_main
from btlm.io import LOCK_NAME, model_dir_lock
from tests.train.conftest import write_h5_dir


def run(argv):
    return btlm_main(["run", *argv])


def _params(tiny_raw, tmp_path, **runconfig):
    tiny_raw["runconfig"].update(max_steps=2, checkpoint_steps=2, **runconfig)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return str(path)


def _error(capsys) -> str:
    """The one error line (``btlm run`` logs its progress to stderr before it; in-process runs leave logging
    handlers on pytest's closed capture streams, whose "Logging error" reports are not the CLI's)."""
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    return err.splitlines()[-1]


def test_a_second_run_on_a_locked_model_dir_is_refused_naming_the_pid(tiny_raw, tmp_path, capsys):
    params, md = _params(tiny_raw, tmp_path), tmp_path / "run"
    with model_dir_lock(md):
        assert run(["CPU", "--mode", "train", "--params", params, "--model_dir", str(md)]) == 1
        assert f"pid {os.getpid()}" in _error(capsys)
    assert not list(md.glob("checkpoint_*"))
    # eval modes do not take the lock (they write nothing a trainer reads)
    assert run(["CPU", "--mode", "train", "--params", params, "--model_dir", str(md)]) == 0
    assert (md / "checkpoint_2.mdl").is_file()


def test_the_lock_of_a_killed_run_is_recovered(tiny_raw, tmp_path):
    md = tmp_path / "run"
    code = ("import os, sys; from btlm.io import model_dir_lock\n"
            f"cm = model_dir_lock({str(md)!r}); cm.__enter__(); print('locked', flush=True); os.kill(os.getpid(), 9)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "locked" and res.returncode == -9
    assert "pid" in (md / LOCK_NAME).read_text()  # the killed holder left its lock file behind
    params = _params(tiny_raw, tmp_path)
    assert run(["CPU", "--mode", "train", "--params", params, "--model_dir", str(md)]) == 0


def _crafted_dcp(path, marker):
    """A checkpoint_<n>.dcp directory whose .metadata pickle would create ``marker`` when unpickled."""
    path.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))


def test_auto_resume_and_convert_never_unpickle_a_dcp_directory(tiny_raw, tmp_path, capsys):
    params, md, marker = _params(tiny_raw, tmp_path), tmp_path / "run", tmp_path / "pwned"
    _crafted_dcp(md / "checkpoint_9.dcp", marker)
    for mode in ("train", "eval"):
        assert run(["CPU", "--mode", mode, "--params", params, "--model_dir", str(md)]) == 1
        assert "--allow_unpickle" in _error(capsys)
    assert btlm_main(["convert", "to-hf", str(md / "checkpoint_9.dcp"), str(tmp_path / "hf")]) == 1
    assert "--allow-unpickle" in _error(capsys)
    assert not marker.exists()


def test_bad_data_and_settings_fail_before_compute(tiny_raw, tmp_path, capsys):
    md = tmp_path / "run"
    # token ids >= vocab_size
    tiny_raw["model"]["vocab_size"] = 50
    assert run(["CPU", "--mode", "train", "--params", _params(tiny_raw, tmp_path), "--model_dir", str(md)]) == 1
    assert "outside the model's vocab_size 50" in _error(capsys)
    tiny_raw["model"]["vocab_size"] = 97
    # rows longer than max_position_embeddings
    tiny_raw["model"]["max_position_embeddings"] = 8
    assert run(["CPU", "--mode", "train", "--params", _params(tiny_raw, tmp_path), "--model_dir", str(md)]) == 1
    assert "exceed the model's max_position_embeddings 8" in _error(capsys)
    tiny_raw["model"]["max_position_embeddings"] = 16
    # float32 rows
    floats = tmp_path / "floats"
    floats.mkdir()
    with h5py.File(floats / "x.h5", "w") as h:
        h.create_dataset("data", data=np.ones((8, 3, 16), dtype=np.float32))
    tiny_raw["train_input"]["data_dir"] = str(floats)
    assert run(["CPU", "--mode", "train", "--params", _params(tiny_raw, tmp_path), "--model_dir", str(md)]) == 1
    assert "dtype float32; expected int32" in _error(capsys)
    assert not list(md.glob("checkpoint_*"))
    # eval of an empty or mistyped model_dir
    tiny_raw["train_input"]["data_dir"] = str(write_h5_dir(tmp_path / "train2", 8, 16))
    params = _params(tiny_raw, tmp_path)
    for mode in ("eval", "eval_all"):
        assert run(["CPU", "--mode", mode, "--params", params, "--model_dir", str(tmp_path / "typo")]) == 1
        assert "nothing to evaluate" in _error(capsys)
    assert not (tmp_path / "typo").exists()
    # a model_dir that is a file
    (tmp_path / "file").write_text("x")
    assert run(["CPU", "--mode", "train", "--params", params, "--model_dir", str(tmp_path / "file")]) == 1
    assert "is a file" in _error(capsys)


def test_gpu_without_cuda_is_one_line(tiny_raw, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert run(["GPU", "--mode", "train", "--params", _params(tiny_raw, tmp_path), "--model_dir",
                str(tmp_path / "r")]) == 1
    assert "no CUDA GPU" in _error(capsys)


def test_convert_refuses_to_overwrite_a_run_directory(tiny_raw, tmp_path, capsys):
    params, md = _params(tiny_raw, tmp_path), tmp_path / "run"
    assert run(["CPU", "--mode", "train", "--params", params, "--model_dir", str(md)]) == 0
    before = sorted(p.name for p in md.iterdir())
    ckpt = str(md / "checkpoint_2.mdl")
    assert btlm_main(["convert", "to-hf", ckpt, str(md)]) == 1
    assert "not empty" in _error(capsys) and sorted(p.name for p in md.iterdir()) == before
    # --overwrite writes the model files next to the run's and keeps every other file
    assert btlm_main(["convert", "to-hf", ckpt, str(md), "--overwrite"]) == 0
    after = {p.name for p in md.iterdir()}
    # (no tokenizer: GPT-2's 50257 ids do not fit this run's vocab_size 97)
    assert set(before) <= after and {"config.json", "model.safetensors"} <= after
    # from-hf: the output is a file; a directory there, or an existing file, is refused before loading
    assert btlm_main(["convert", "from-hf", str(md), str(tmp_path)]) == 1
    assert "is a directory" in _error(capsys)
    assert btlm_main(["convert", "from-hf", str(md), ckpt]) == 1
    assert "already exists" in _error(capsys)


def test_the_torchrun_relaunch_repeats_the_command_line():
    from btlm.cli import build_parser
    from btlm.cli.run import _argv
    from btlm.train.launch import RUNCONFIG_OVERRIDES

    parser = build_parser("run")
    args = parser.parse_args(["GPU", "--mode", "train", "--params", "p.yaml", "--model_dir", "runs/x", "--max-steps",
                              "7", "--disable_strict_checkpoint_loading", "--allow-unpickle", "false", "--no-progress"])
    again = parser.parse_args(_argv(args, {k: getattr(args, k, None) for k in RUNCONFIG_OVERRIDES}))
    assert vars(again) == vars(args)

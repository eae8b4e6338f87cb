"""The command layer: one error path, one set of conventions, the output-path policy of every writing
command, fast start-up, and docs/cli.md generated from the parsers."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from btlm import cli
from btlm.cli import main as btlm
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def _error(capsys, code_line: str | None = None) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from btlm.io import save_model

    return save_model(make_model(), tmp_path_factory.mktemp("m") / "model")


# ------------------------------------------------------------------------------------ conventions


def _all_parsers():
    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        yield from ((f"{name} {s}", p) for s, p in subs[0].choices.items()) if subs else [(name, parser)]


def test_every_long_option_has_kebab_and_snake_spellings_and_help_shows_defaults():
    for name, parser in _all_parsers():
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            for s in longs:
                assert "--" + s[2:].replace("_", "-") in longs and "--" + s[2:].replace("-", "_") in longs, (name, s)
        assert "(default: " in parser.format_help() or name in ("data inspect", "lm-eval"), name


def test_booleans_take_the_bare_flag_and_an_explicit_value():
    parser = cli.build_parser("data")
    for argv, want in ((["--strict"], True), (["--strict", "True"], True), (["--strict", "false"], False), ([], None)):
        assert parser.parse_args(["LMData", *argv]).strict is want
    gen = cli.build_parser("generate")
    base = ["--model", "m", "--prompt", "p"]
    assert gen.parse_args([*base, "--do-sample"]).do_sample is True
    assert gen.parse_args([*base, "--do_sample", "no"]).do_sample is False
    assert gen.parse_args([*base, "--max_new_tokens", "3"]).max_new_tokens == 3  # the snake_case alias
    run = cli.build_parser("run")
    args = run.parse_args(["CPU", "--mode", "train", "--params", "p.yaml", "--model-dir", "a", "--max_steps", "4"])
    assert args.model_dir == "a" and args.max_steps == 4


def test_one_dtype_vocabulary():
    for name in ("init", "generate", "eval-long", "passkey", "quantize"):
        parser = cli.build_parser(name)
        base = {"init": ["--out", "o"], "generate": ["--model", "m", "--prompt", "p"],
                "quantize": ["--model", "m", "--out", "o"]}.get(name, ["--model", "m", "--out", "o", "--data", "d"])
        if name == "passkey":
            base = ["--model", "m", "--out", "o"]
        assert parser.parse_args([*base, "--dtype", "float32"]).dtype == "fp32"
        assert parser.parse_args([*base, "--dtype", "BF16"]).dtype == "bf16"


def test_progress_default_follows_the_terminal():
    from btlm.cli.common import progress_enabled

    parser = cli.build_parser("export-gguf")
    base = ["--model", "m", "--out", "o.gguf"]
    assert parser.parse_args(base).progress is None and progress_enabled(None) is sys.stderr.isatty()
    assert parser.parse_args([*base, "--no-progress"]).progress is False
    assert parser.parse_args([*base, "--progress"]).progress is True


def test_exit_codes(capsys):
    assert btlm([]) == 2 and "usage: btlm" in capsys.readouterr().err
    assert btlm(["data"]) == 2 and btlm(["convert"]) == 2 and btlm(["nope"]) == 2
    assert btlm(["--help"]) == 0 and btlm(["--version"]) == 0 and btlm(["data", "--help"]) == 0
    assert btlm(["generate", "--prompt", "x"]) == 2  # --model missing: argparse's usage error
    capsys.readouterr()


def test_btlm_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "btlm", "data", "inspect", str(tmp_path / "missing")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 1 and quiet.stderr.strip().startswith("error: ") and "Traceback" not in quiet.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "BTLM_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "DataError" in loud.stderr


def test_presets_and_choices_spelt_out_in_the_parsers_match_the_library():
    from btlm.cli import model as model_cli
    from btlm.cli import quant as quant_cli
    from btlm.model import PRESETS
    from btlm.quant.gguf import OUTTYPES
    from btlm.quant.packing import INT4_GROUP_SIZES

    assert sorted(model_cli.PRESET_NAMES) == sorted(PRESETS)
    assert quant_cli.INT4_GROUP_SIZES == INT4_GROUP_SIZES and quant_cli.GGUF_OUTTYPES == OUTTYPES


def test_docs_cli_md_is_generated_from_the_parsers():
    from btlm.cli.docs import render

    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python -m btlm.cli.docs > docs/cli.md"


# ------------------------------------------------------------------------------------ start-up


def test_the_cli_and_the_data_pipeline_do_not_import_torch(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text("the data pipeline needs no torch " * 200)
    code = ("import sys, btlm, btlm.cli\n"
            "from btlm.cli import COMMANDS, build_parser, main\n"
            "[build_parser(n) for n in COMMANDS]\n"
            f"assert main(['data', 'LMData', '--input-dir', {str(tmp_path / 'raw')!r}, '--output-dir', "
            f"{str(tmp_path / 'out')!r}, '--processes', '2', '--max-seq-length', '32']) == 0\n"
            f"assert main(['data', 'inspect', {str(tmp_path / 'out')!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    res.stdout = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_import_btlm_registers_the_model_and_exposes_submodules_lazily(model_dir):
    code = ("import btlm\n"
            "from transformers import AutoModelForCausalLM, AutoConfig\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
            "print(type(m).__name__, type(btlm.inference.load_model).__name__, btlm.BTLMConfig.model_type)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["BTLMLMHeadModel", "function", "btlm"], res.stderr


# ------------------------------------------------------------------------------------ output-path policy


def test_init_never_deletes_user_files(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mywork.py").write_text("precious")
    assert btlm(["init", "--out", str(work)]) == 1
    assert "not empty" in _error(capsys) and sorted(os.listdir(work)) == ["mywork.py"]
    assert btlm(["init", "--out", str(work), "--overwrite"]) == 0
    assert (work / "mywork.py").read_text() == "precious" and (work / "config.json").is_file()
    # --overwrite replaces btlm's own files: a stale shard index of an older model goes, user files stay
    (work / "model.safetensors.index.json").write_text("{}")
    assert btlm(["init", "--out", str(work), "--overwrite", "--seed", "1"]) == 0
    assert not (work / "model.safetensors.index.json").exists() and (work / "mywork.py").exists()
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    assert btlm(["init", "--out", str(tmp_path / "afile")]) == 1
    assert "is a file" in _error(capsys) and (tmp_path / "afile").read_text() == "x"
    assert btlm(["init", "--out", str(tmp_path / "afile" / "sub")]) == 1
    assert "is a file" in _error(capsys)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_quantize_and_export_gguf_refuse_existing_outputs_before_work(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert btlm(["quantize", "--model", str(model_dir), "--out", str(out)]) == 1
    assert "not empty" in _error(capsys) and os.listdir(out) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert btlm(["quantize", "--model", str(model_dir), "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in _error(capsys) and (tmp_path / "file").read_text() == "x"
    assert btlm(["export-gguf", "--model", str(model_dir), "--out", str(tmp_path / "file")]) == 1
    assert "already exists; pass --overwrite" in _error(capsys) and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("command", ["eval-long", "passkey"])
def test_eval_outputs_are_checked_before_the_compute(command, model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    extra = ["--data", str(tmp_path / "missing.h5")] if command == "eval-long" else []
    # the model and the data are not even read: the output path is refused first
    assert btlm([command, "--model", str(tmp_path / "no-model"), *extra, "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in _error(capsys)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("k")
    assert btlm([command, "--model", str(tmp_path / "no-model"), *extra, "--out", str(full)]) == 1
    assert "not empty" in _error(capsys)


def test_data_commands_refuse_a_file_as_output_directory(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("hello world " * 50)
    (tmp_path / "file").write_text("x")
    assert btlm(["data", "LMData", "--input-dir", str(raw), "--output-dir", str(tmp_path / "file"),
                 "--processes", "1"]) == 1
    assert "is a file" in _error(capsys) and (tmp_path / "file").read_text() == "x"
    assert btlm(["data", "LMData", "--input_dir", str(raw), "--output_dir", str(tmp_path / "d"), "--processes", "1",
                 "--max_seq_length", "16", "--eos_id", "99999999"]) == 1
    assert "eos_id = 99999999" in _error(capsys)
    assert btlm(["data", "LMData", "--input_dir", str(raw), "--output_dir", str(tmp_path / "d"), "--processes", "1",
                 "--max_seq_length", "16", "--no-progress"]) == 0
    capsys.readouterr()
    assert btlm(["data", "shuffle", str(tmp_path / "d"), str(tmp_path / "file"), "--seed", "1"]) == 1
    assert "is a file" in _error(capsys)


def test_data_inspect_rejects_float_rows_and_foreign_ids(tmp_path, capsys):
    for name, data in (("floats", np.ones((4, 3, 8), dtype=np.float32)),
                       ("ids", np.full((4, 3, 8), 60000, dtype=np.int32))):
        (tmp_path / name).mkdir()
        with h5py.File(tmp_path / name / "x.h5", "w") as h:
            h.create_dataset("data", data=data)
            h.attrs["n_examples"] = 4
        assert btlm(["data", "inspect", str(tmp_path / name)]) == 1
        assert ("dtype float32" if name == "floats" else "token id 60000") in _error(capsys)


# ------------------------------------------------------------------------------------ model inputs


def _truncated_copy(model_dir, dest):
    dest.mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (dest / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return dest


def test_bad_model_directories_are_one_line_in_every_command(model_dir, tmp_path, capsys):
    broken = _truncated_copy(model_dir, tmp_path / "truncated")
    typed = _truncated_copy(model_dir, tmp_path / "typed")
    (typed / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    cfg = json.loads((typed / "config.json").read_text())
    (typed / "config.json").write_text(json.dumps({**cfg, "n_head": "four"}))
    for bad, words in ((broken, "cannot read the weights"), (typed, "n_head")):
        for argv in (["generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "1"],
                     ["quantize", "--model", str(bad), "--out", str(tmp_path / "q")],
                     ["convert", "from-hf", str(bad), str(tmp_path / "c.mdl")],
                     ["export-gguf", "--model", str(bad), "--out", str(tmp_path / "x.gguf")]):
            assert btlm(argv) == 1, argv
            assert words in _error(capsys), argv
    assert not any((tmp_path / n).exists() for n in ("q", "c.mdl", "x.gguf"))


@pytest.mark.parametrize("argv, code, words", [
    (["--num-beams", "0"], 2, "--num-beams 0"),
    (["--top-p", "2"], 2, "--top-p 2.0"),
    (["--temperature", "0"], 2, "--temperature 0.0"),
    (["--max-new-tokens", "0"], 2, "--max-new-tokens 0"),
    (["--prompt", ""], 2, "--prompt is empty"),
    (["--device", "cuda:7"], 1, "cuda:7"),
    (["--device", "banana"], 2, "banana"),
])
def test_generate_settings_are_checked_before_the_model_runs(model_dir, capsys, argv, code, words):
    import torch

    if argv[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    base = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "2"]
    assert btlm([*base, *argv]) == code
    assert words in _error(capsys)


def test_data_shuffle_refuses_a_non_empty_output(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("shuffle me please " * 100)
    assert btlm(["data", "LMData", "--input-dir", str(raw), "--output-dir", str(tmp_path / "d"), "--processes", "1",
                 "--max-seq-length", "16", "--no-progress"]) == 0
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert btlm(["data", "shuffle", str(tmp_path / "d"), str(out), "--seed", "1"]) == 1
    assert "not empty" in _error(capsys)
    assert btlm(["data", "shuffle", str(tmp_path / "d"), str(out), "--seed", "1", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "shuffle_params.json").is_file()


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    """Files written through a temporary sibling are readable like any file the user's umask allows,
    not mkstemp's private 0600."""
    import os
    import stat

    from btlm.io import atomic_write

    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644

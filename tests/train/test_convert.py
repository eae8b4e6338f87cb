"""`btlm convert`: a training checkpoint exports to the released HF layout with identical logits, and HF
weights import as a starting checkpoint."""

from __future__ import annotations

import copy

import torch
import yaml
from transformers import AutoModelForCausalLM

import btlm  # noqa: F401  (registers model_type "btlm" with the Auto classes)
from btlm.train import checkpoint as ckpt
from btlm.train.config import parse_params
from btlm.cli import main as btlm_main
from btlm.train.modeling import build_model
from btlm.train.trainer import Runner


def test_export_then_import_round_trip(tiny_raw, tmp_path, capsys):
    raw = copy.deepcopy(tiny_raw)
    raw["runconfig"].update(max_steps=2, checkpoint_steps=0)
    Runner(parse_params(raw), raw, tmp_path / "run").train()
    hf_dir = tmp_path / "hf"
    assert convert_main(["to-hf", str(tmp_path / "run" / "checkpoint_2.mdl"), str(hf_dir)]) == 0

    # The exported model gives the trained model's logits exactly.
    params = parse_params(raw)
    ours = build_model(params.model, params.optimizer)
    ours.load_state_dict(ckpt.load_checkpoint_file(tmp_path / "run" / "checkpoint_2.mdl")["model"])
    ours.eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert hf.config.mup_width_scale == 0.2 and abs(hf.config.output_logits_scale - 0.444) < 1e-12
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=0, atol=0)

    # Import: HF dir -> checkpoint + params sections -> fine-tune start with identical weights.
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "ft" / "start.mdl"),
                         "--params-out", str(tmp_path / "model.yaml")]) == 0
    sections = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert sections["optimizer"]["adjust_learning_rate"] == {"decoder_kernel": 0.2}
    assert abs(sections["model"]["output_logits_scale"] - 0.444) < 1e-12
    imported = ckpt.load_checkpoint_file(tmp_path / "ft" / "start.mdl")
    assert imported["global_step"] == 0
    for k, v in ours.state_dict().items():
        assert torch.equal(imported["model"][k], v), k
    ft = copy.deepcopy(raw)
    ft["runconfig"].update(max_steps=1, checkpoint_path=str(tmp_path / "ft" / "start.mdl"),
                           load_checkpoint_states="model")
    assert sorted(Runner(parse_params(ft), ft, tmp_path / "ft").train()["losses"]) == [1]

    capsys.readouterr()
    assert convert_main(["to-hf", str(tmp_path / "missing.mdl"), str(tmp_path / "x")]) == 1
    assert "error: " in capsys.readouterr().err


def convert_main(argv: list[str]) -> int:
    """``btlm convert ARGV`` in this process."""
    return btlm_main(["convert", *argv])

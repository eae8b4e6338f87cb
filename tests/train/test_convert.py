"""`btlm convert`: a training checkpoint exports to the released HF layout with identical logits, and HF
weights import as a starting checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import btlm  # noqa: F401  (registers model_type "btlm" with the Auto classes)
from btlm.train import checkpoint as ckpt
from btlm.train.config import parse_params
from btlm.cli import main as btlm_main
from btlm.train.zoo_model import build_model
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
    assert "loss_weight" not in sections["model"]  # depends on the fine-tuning data's msl (--msl)
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


def _word_tokenizer(path, n_tokens: int, eos_id: int):
    """A small HF tokenizer (words "t0" … ; "<eos>" at eos_id) saved to ``path``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(n_tokens)}
    vocab.pop(f"t{eos_id}")
    vocab["<eos>"] = eos_id
    core = Tokenizer(WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", bos_token="<eos>").save_pretrained(str(path))
    return path


def test_to_hf_token_ids_come_from_the_data_and_the_tokenizer_must_fit(tiny_raw, tmp_path, capsys):
    """A vocab-97 run: eos/bos come from the data's data_params.json (not GPT-2's 50256), GPT-2's tokenizer
    is not bundled (its ids do not fit), a fitting --tokenizer is, and an unfitting one is refused in one line."""
    import json

    from btlm.tokenizer import save_tokenizer

    raw = copy.deepcopy(tiny_raw)
    (tmp_path / "train").mkdir(exist_ok=True)
    # what `btlm data` / create_hdf5_dataset.py write next to the shards
    (tmp_path / "train" / "data_params.json").write_text(json.dumps({"post-process": {"eos_id": 7, "pad_id": 7}}))
    raw["runconfig"].update(max_steps=1, checkpoint_steps=0)
    Runner(parse_params(raw), raw, tmp_path / "run").train()
    checkpoint = str(tmp_path / "run" / "checkpoint_1.mdl")

    capsys.readouterr()
    assert convert_main(["to-hf", checkpoint, str(tmp_path / "plain")]) == 0
    assert "no tokenizer bundled" in capsys.readouterr().err
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (7, 7)
    assert not (tmp_path / "plain" / "tokenizer_config.json").exists()

    gpt2 = tmp_path / "gpt2_tok"
    save_tokenizer(gpt2)
    assert convert_main(["to-hf", checkpoint, str(tmp_path / "bad"), "--tokenizer", str(gpt2)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "50257 tokens" in err and "vocab_size 97" in err
    assert not (tmp_path / "bad").exists()

    other_eos = _word_tokenizer(tmp_path / "tok5", 97, eos_id=5)
    assert convert_main(["to-hf", checkpoint, str(tmp_path / "mismatch"), "--tokenizer", str(other_eos)]) == 1
    assert "eos id 5 differs from eos_id 7" in capsys.readouterr().err

    tok = _word_tokenizer(tmp_path / "tok7", 97, eos_id=7)
    assert convert_main(["to-hf", checkpoint, str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["vocab_size"]) == (7, 7, 97)
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    capsys.readouterr()
    # the converted model generates with its bundled tokenizer (GPT-2 ids were outside its vocabulary)
    assert btlm_main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "t3 t4 t5",
                           "--max-new-tokens", "4", "--no-stream", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("t3 t4 t5")


def test_from_hf_params_loss_weight_follows_the_data_msl(tiny_raw, tmp_path):
    """--params-out no longer writes loss_weight = 1/n_positions: without --msl the loss keys are left out
    (the default is the per-token mean at any msl), with --msl N it is BTLM's batch_size form, 1/N."""
    from btlm.inference import save_model
    from btlm.model import BTLMLMHeadModel
    from btlm.train.zoo_model import btlm_config_from_params

    params = parse_params(tiny_raw)
    config = btlm_config_from_params(params.model, params.optimizer, n_positions=1024)  # msl of the data: 16
    save_model(BTLMLMHeadModel(config), tmp_path / "hf", tokenizer=False)
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "a.mdl"),
                         "--params-out", str(tmp_path / "a.yaml")]) == 0
    text = (tmp_path / "a.yaml").read_text()
    sections = yaml.safe_load(text)
    assert "loss_weight" not in sections["model"] and "loss_scaling" not in sections["model"]
    assert text.startswith("# loss_scaling / loss_weight are left out")
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "b.mdl"),
                         "--params-out", str(tmp_path / "b.yaml"), "--msl", "16"]) == 0
    with_msl = yaml.safe_load((tmp_path / "b.yaml").read_text())["model"]
    assert (with_msl["loss_scaling"], with_msl["loss_weight"]) == ("batch_size", 1 / 16)

    # Fine-tuning with either section logs the per-token mean loss, as the original run's params do.
    losses = []
    for name, model_section in (("orig", tiny_raw["model"]), ("a", sections["model"]), ("b", with_msl)):
        raw = copy.deepcopy(tiny_raw)
        raw["model"] = dict(model_section)
        raw["runconfig"].update(max_steps=1, checkpoint_steps=0, checkpoint_path=str(tmp_path / "a.mdl"),
                                load_checkpoint_states="model")
        losses.append(Runner(parse_params(raw), raw, tmp_path / f"ft_{name}").train()["losses"][1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)
    assert losses[0] > 3.0  # ~log(97): a per-token mean, not one scaled by 16/1024

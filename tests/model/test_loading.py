"""The released HF layout: round trips, Auto classes without remote code, legacy files, bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import btlm  # noqa: F401  (registers the Auto classes)
from btlm.errors import OutputPathError
from btlm.inference import ModelLoadError, load_model, save_model
from btlm.model import BTLMLMHeadModel, BTLMModel
from tests.conftest import make_model

# The released config.json (cerebras/btlm-3b-8k-base) with small dimensions.
RELEASED_CONFIG = {
    "_name_or_path": "cerebras/btlm-3b-8k-base",
    "activation_function": "swiglu",
    "architectures": ["BTLMLMHeadModel"],
    "attn_pdrop": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_btlm.BTLMConfig",
        "AutoModel": "modeling_btlm.BTLMModel",
        "AutoModelForCausalLM": "modeling_btlm.BTLMLMHeadModel",
        "AutoModelForQuestionAnswering": "modeling_btlm.BTLMForQuestionAnswering",
        "AutoModelForSequenceClassification": "modeling_btlm.BTLMForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_btlm.BTLMForTokenClassification",
    },
    "bos_token_id": 50256,
    "embd_pdrop": 0.0,
    "mup_embeddings_scale": 14.6,
    "eos_token_id": 50256,
    "initializer_range": 0.073,
    "layer_norm_epsilon": 1e-05,
    "model_type": "btlm",
    "n_embd": 64,
    "n_head": 4,
    "n_inner": 170,
    "n_layer": 2,
    "n_positions": 256,
    "mup_output_alpha": 2.2200000000000003,
    "position_embedding_type": "alibi",
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.0,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "mup_scale_qk_dot_by_d": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.30.0",
    "use_cache": True,
    "vocab_size": 97,
    "mup_width_scale": 0.1,
}

X = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))


def released_style_dir(tmp_path, model, legacy_buffers=False):
    """Write a directory like the Hub's: released config.json + a bf16 pickle ``pytorch_model.bin`` without
    ``lm_head.weight`` (optionally with the old causal-mask buffers)."""
    d = tmp_path / "released"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    sd = {k: v.to(torch.bfloat16).clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if legacy_buffers:
        for i in range(model.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 256, 256, dtype=torch.uint8).tril()
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, d / "pytorch_model.bin")
    return d, sd


@pytest.mark.parametrize("legacy_buffers", [False, True])
def test_auto_classes_load_released_layout_without_remote_code(tmp_path, legacy_buffers):
    model = make_model("sdpa")
    d, sd = released_style_dir(tmp_path, model, legacy_buffers)
    assert isinstance(AutoConfig.from_pretrained(d), btlm.BTLMConfig)
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype="auto")
    assert isinstance(loaded, BTLMLMHeadModel) and loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    # bf16-rounded slopes are used as stored
    torch.testing.assert_close(loaded.transformer.relative_pe.slopes, sd["transformer.relative_pe.slopes"])
    fp32 = load_model(d, dtype="fp32")
    ref = model.to(torch.bfloat16).float()  # the same bf16-rounded weights, in fp32
    ref.config.mup_width_scale = 0.1
    ref.config.mup_output_alpha = 2.2200000000000003
    torch.testing.assert_close(fp32(X).logits, ref(X).logits, atol=1e-4, rtol=1e-4)
    base = AutoModel.from_pretrained(d)
    assert isinstance(base, BTLMModel)


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_save_load_round_trip_safetensors(tmp_path, shard):
    model = make_model("sdpa")
    kwargs = {"max_shard_size": shard} if shard else {}
    out = save_model(model, tmp_path / "m", **kwargs)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "tokenizer.json" in files
    if shard:
        assert "model.safetensors.index.json" in files
    else:
        keys = set(load_file(out / "model.safetensors"))
        assert "transformer.relative_pe.slopes" in keys and "transformer.h.0.mlp.c_fc2.weight" in keys
        assert "lm_head.weight" not in keys  # tied: stored once, as wte (the released layout)
        assert load_file(out / "model.safetensors")["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    loaded = load_model(out)
    torch.testing.assert_close(loaded(X).logits, model(X).logits)
    # save -> load -> save writes the same tensors
    again = save_model(loaded, tmp_path / "again")
    if not shard:
        a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_model_replaces_directory_atomically(tmp_path):
    out = tmp_path / "m"
    save_model(make_model("sdpa", seed=1), out)
    with pytest.raises(OutputPathError, match="not empty"):  # never replaced without overwrite=True
        save_model(make_model("sdpa", seed=2), out)
    save_model(make_model("sdpa", seed=2), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old directories left behind
    torch.testing.assert_close(load_model(out)(X).logits, make_model("sdpa", seed=2)(X).logits)


def test_missing_keys_and_wrong_shapes_are_errors(tmp_path):
    model = make_model("sdpa")
    d, sd = released_style_dir(tmp_path, model)
    del sd["transformer.h.1.mlp.c_fc2.weight"]
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="transformer.h.1.mlp.c_fc2.weight"):
        load_model(d)
    sd["transformer.h.1.mlp.c_fc2.weight"] = torch.zeros(64, 171, dtype=torch.bfloat16)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="c_fc2"):
        load_model(d)


def test_bad_model_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("source", ["released", "saved"])
def test_alibi_slopes_stay_frozen_for_a_plain_optimizer(tmp_path, source):
    """After loading (the released bf16 pickle, or a btlm safetensors dir) the slopes are still a frozen
    Parameter in the state dict under the released key, and one step of torch.optim.AdamW over
    model.parameters() leaves them exactly as loaded (they moved 0.0039 -> 0.0029 when loading unfroze them)."""
    model = make_model("sdpa")
    d = released_style_dir(tmp_path, model)[0] if source == "released" else save_model(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    slopes = loaded.transformer.relative_pe.slopes
    assert isinstance(slopes, torch.nn.Parameter) and not slopes.requires_grad
    assert loaded.state_dict()["transformer.relative_pe.slopes"].shape == (loaded.config.n_head, 1)
    before = slopes.detach().clone()
    opt = torch.optim.AdamW(loaded.parameters(), lr=0.1, weight_decay=0.1)
    loaded(X, labels=X).loss.backward()
    opt.step()
    assert torch.equal(loaded.transformer.relative_pe.slopes, before)
    assert not torch.equal(loaded.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
    again = save_model(loaded, tmp_path / "again", tokenizer=False)
    assert torch.equal(load_file(again / "model.safetensors")["transformer.relative_pe.slopes"], before)

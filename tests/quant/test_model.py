"""Quantised BTLM models: closeness to fp32, save → load round trip, CLI and its errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import btlm  # noqa: F401  (registers the model classes)
from btlm.quant import QuantizationError, load_quantized, quantize_model, register, save_quantized
from btlm.cli import main as btlm_main
from btlm.quant import modules
from btlm.quant.modules import Int4Conv1D, Int8Conv1D, Int8Embedding, TiedInt8Head
from tests.conftest import make_model

register()


def _kl(ref_logits, q_logits):
    return F.kl_div(F.log_softmax(q_logits.float(), -1), F.log_softmax(ref_logits.float(), -1),
                    log_target=True, reduction="batchmean").item()


@pytest.fixture(scope="module")
def model():
    return make_model(vocab_size=300)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 300, (2, 24))


@pytest.mark.parametrize("bits,group_size,embedding_bits,max_kl", [(4, 32, 8, 2e-4), (4, 64, None, 2e-4),
                                                                   (8, 128, 8, 5e-5)])
def test_quantised_logits_stay_close(model, ids, bits, group_size, embedding_bits, max_kl):
    ref = model(ids).logits
    q = quantize_model(copy.deepcopy(model), bits=bits, group_size=group_size, embedding_bits=embedding_bits,
                       progress=False)
    linear_cls = Int4Conv1D if bits == 4 else Int8Conv1D
    assert isinstance(q.transformer.h[1].mlp.c_proj, linear_cls)
    assert isinstance(q.transformer.wte, Int8Embedding) == (embedding_bits == 8)
    out = q(ids).logits
    kl = _kl(ref.view(-1, 300), out.view(-1, 300))
    assert 0 < kl < max_kl
    # int4 is visibly lossy, int8 much less so: the test would notice a no-op "quantiser"
    assert (out - ref).abs().max() > 1e-4


def test_dense_prefill_path_matches_kernel(model, ids, monkeypatch):
    q = quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    kernel = q(ids).logits
    monkeypatch.setattr(modules, "DEQUANT_MIN_ROWS", 1)  # every call takes the dequantise + F.linear route
    dense = q(ids).logits
    assert torch.allclose(kernel, dense, atol=0.05 * kernel.abs().max().item())
    assert not torch.equal(kernel, dense)  # the routes differ (bf16 vs fp32 activations): both really ran


def test_incremental_decoding_matches_full_forward(model, ids):
    q = quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    full = q(ids[:1]).logits
    out = q(ids[:1, :20], use_cache=True)
    step = q(ids[:1, 20:21], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.allclose(step[0, -1], full[0, 20], atol=0.03 * full.abs().max().item())


def test_save_load_round_trip(model, ids, tmp_path):
    q = quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False)
    expected = q(ids).logits
    save_quantized(q, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == dict(quant_method="btlm_woq", bits=4, group_size=32,
                                                 embedding_bits=8, format_version=2)
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.0.mlp.c_fc.qweight").dtype == torch.uint8
        assert f.get_tensor("transformer.wte.weight_int8").dtype == torch.int8
    assert "transformer.h.0.mlp.c_fc.weight" not in keys and "lm_head.weight" not in keys

    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "q"), load_quantized(tmp_path / "q")):
        assert isinstance(loaded.transformer.h[0].mlp.c_fc, Int4Conv1D)
        assert isinstance(loaded.lm_head, TiedInt8Head)
        assert loaded.lm_head.embedding is loaded.transformer.wte
        assert torch.equal(loaded(ids).logits, expected)
        generated = loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, 9)


def test_cli_quantize_and_errors(model, ids, tmp_path, capsys):
    from btlm.inference import save_model

    fp_dir = save_model(model, tmp_path / "fp")
    assert btlm_main(["quantize", "--model", str(fp_dir), "--bits", "8", "--embedding", "keep", "--out", str(tmp_path / "q8")]) == 0
    q8 = load_quantized(tmp_path / "q8")
    assert isinstance(q8.transformer.h[0].attn.c_attn, Int8Conv1D)
    assert isinstance(q8.transformer.wte, torch.nn.Embedding)
    assert _kl(model(ids).logits.view(-1, 300), q8(ids).logits.view(-1, 300)) < 2e-4

    def error(argv, code=1):
        assert btlm_main(["quantize", *argv]) == code
        return capsys.readouterr().err

    # out-of-range settings are usage errors (exit 2) named by argparse
    assert "invalid choice: 3" in error(["--model", str(fp_dir), "--bits", "3", "--out", str(tmp_path / "x")], 2)
    assert "invalid choice: 100" in error(["--model", str(fp_dir), "--group-size", "100", "--out",
                                                         str(tmp_path / "x")], 2)
    assert "does not exist" in error(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type 'gpt2'" in error(["--model", str(gpt2), "--out", str(tmp_path / "x")])
    assert "already quantised" in error(["--model", str(tmp_path / "q8"), "--out", str(tmp_path / "x")])
    with pytest.raises(QuantizationError, match="no btlm quantization_config"):
        load_quantized(fp_dir)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def int4_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    save_quantized(quantize_model(copy.deepcopy(model), bits=4, group_size=32, progress=False), out)
    return out


def test_quantised_models_default_to_cpu_on_a_gpu_machine(int4_dir, model, tmp_path, monkeypatch, capsys):
    """generate / eval-long / passkey choose CPU for int4/int8 models (their kernels are CPU-only) even where
    CUDA is available, and refuse another device in one line."""
    from btlm import inference
    from btlm.eval.common import load_for_context

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    fp_dir = tmp_path / "fp"
    inference.save_model(model, fp_dir)
    assert inference.choose_device(int4_dir) == "cpu" and inference.choose_device(fp_dir) == "cuda"
    assert inference.choose_device(fp_dir, "cpu") == "cpu"

    devices = []

    def fake_load(path, dtype=None, device=None, **overrides):
        devices.append(device)
        raise inference.ModelLoadError("stop here")

    import btlm.io

    monkeypatch.setattr(inference, "load_model", fake_load)
    monkeypatch.setattr(btlm.io, "load_model", fake_load)
    assert btlm_main(["generate", "--model", str(int4_dir), "--prompt", "hi"]) == 1
    with pytest.raises(inference.ModelLoadError, match="stop here"):
        load_for_context(str(int4_dir), 64)
    devices = [str(d) for d in devices]
    assert devices == ["cpu", "cpu"]
    capsys.readouterr()
    assert btlm_main(["generate", "--model", str(int4_dir), "--prompt", "hi", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "int4 quantised model, which runs on CPU only" in err and devices == ["cpu", "cpu"]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_text_uses_a_static_cache_on_cpu_with_the_same_output(model, tokenizer, num_beams):
    """`btlm generate` decodes over a pre-allocated cache on CPU (measured faster for int4: no per-token
    torch.cat of the whole cache); the text is the one the dynamic cache gives."""
    from btlm.inference import generate_text

    big = make_model(vocab_size=50257)
    q = quantize_model(copy.deepcopy(big), bits=4, group_size=32, progress=False)
    seen = []
    original = q.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return original(*args, **kwargs)

    q.generate = spy
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    static = generate_text(q, tokenizer, "Hello world", **kw)
    dynamic = generate_text(q, tokenizer, "Hello world", cache_implementation="dynamic", **kw)
    assert seen == ["static", "dynamic"] and static == dynamic and len(static) > len("Hello world")

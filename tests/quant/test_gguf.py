"""``btlm export-gguf``: the GGUF file read back with the ``gguf`` package's reader.

The strongest check is :func:`jais_forward`, a plain numpy re-implementation of llama.cpp's JAIS graph
(``src/models/jais.cpp``) that uses nothing but the GGUF file — its tensors and its metadata, with the ALiBi
slopes derived from ``max_alibi_bias`` the way ``ggml_soft_max_ext`` derives them — and reproduces the
BTLM model's logits.
"""

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch

from btlm.cli import main as btlm_main
from btlm.inference import save_model
from btlm.quant import gguf as export
from btlm.quant.gguf import GGUFExportError, export_gguf
from tests.conftest import make_model

T = gguf.GGMLQuantizationType
VOCAB = 50257  # the tokenizer's; the GGUF vocabulary must cover it


# ------------------------------------------------------------------------------------------------
# Reading a GGUF file back
# ------------------------------------------------------------------------------------------------


def read(path):
    """(metadata dict, {name: (float32 array in numpy [out, in] order, GGML type)})."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = (data.reshape(tuple(int(n) for n in reversed(t.shape))), t.tensor_type)
    return meta, tensors


def alibi_slopes_llama(n_head, max_bias):
    """``ggml_soft_max_ext``'s slopes: m0^(h+1) for h < n', then m1^(2(h-n')+1)."""
    n_pow2 = 2 ** math.floor(math.log2(n_head))
    m0, m1 = 2.0 ** (-max_bias / n_pow2), 2.0 ** (-max_bias / 2.0 / n_pow2)
    return np.array([m0 ** (h + 1) if h < n_pow2 else m1 ** (2 * (h - n_pow2) + 1) for h in range(n_head)])


def jais_forward(meta, tensors, ids):
    """Logits [T, V] of llama.cpp's JAIS graph for one sequence, from the GGUF contents alone (float64)."""
    W = {name: data.astype(np.float64) for name, (data, _) in tensors.items()}
    n_layer, n_head = meta["jais.block_count"], meta["jais.attention.head_count"]
    eps, max_bias = meta["jais.attention.layer_norm_epsilon"], meta["jais.attention.max_alibi_bias"]
    n_embd = meta["jais.embedding_length"]
    d = n_embd // n_head
    slopes = alibi_slopes_llama(n_head, max_bias)

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * W[name + ".weight"] + W[name + ".bias"]

    def linear(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    n = len(ids)
    pos = np.arange(n)
    kq_mask = np.where(pos[None, :] <= pos[:, None], -np.abs(pos[:, None] - pos[None, :]), -np.inf)  # [q, k]
    x = W["token_embd.weight"][ids]  # the embedding scale is folded in
    for i in range(n_layer):
        b = f"blk.{i}."
        qkv = linear(norm(x, b + "attn_norm"), b + "attn_qkv")
        q, k, v = (qkv[:, j * n_embd:(j + 1) * n_embd].reshape(n, n_head, d).transpose(1, 0, 2) for j in range(3))
        scores = q @ k.transpose(0, 2, 1) * (1.0 / d) + slopes[:, None, None] * kq_mask  # kq_scale = 1/n_embd_head
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(n, n_embd)
        x = x + linear(attn, b + "attn_output")
        h = norm(x, b + "ffn_norm")
        up, gate = linear(h, b + "ffn_up"), linear(h, b + "ffn_gate")
        x = x + linear(up * (gate / (1.0 + np.exp(-gate))), b + "ffn_down")  # LLM_FFN_SILU, LLM_FFN_PAR
    return norm(x, "output_norm") @ W["output.weight"].T  # the logits scale is folded in


# ------------------------------------------------------------------------------------------------
# Fixtures: tiny random models exported once per module
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def model():
    return make_model(vocab_size=VOCAB)  # 4 heads, n_inner 170 (padded to 256)


@pytest.fixture(scope="module")
def model_dir(workdir, model):
    return save_model(model, workdir / "m")


@pytest.fixture(scope="module")
def exported(workdir, model_dir):
    """outtype -> (metadata, tensors), each file written once.

    Only the f32 file (and the 6-head model's) carries the tokenizer: ``GGUFReader`` needs ~4 s to parse
    50k tokens + 50k merges, so the files that check tensor types and values are written without it."""
    cache = {}

    def get(outtype):
        if outtype not in cache:
            with pytest.MonkeyPatch.context() as mp:
                if outtype != "f32":
                    mp.setattr(export, "_add_vocab", lambda *args: None)
                path = export_gguf(model_dir, workdir / f"m-{outtype}.gguf", outtype=outtype, progress=False)
            cache[outtype] = read(path)
        return cache[outtype]

    return get


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(3)
    return torch.randint(0, VOCAB, (1, 19))


def model_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].double().numpy()


# ------------------------------------------------------------------------------------------------
# Layout and metadata
# ------------------------------------------------------------------------------------------------


def expected_shapes(n_layer, D, F, V):
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output_norm.bias": (D,), "output.weight": (V, D)}
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (D,), b + "attn_norm.bias": (D,),
            b + "attn_qkv.weight": (3 * D, D), b + "attn_qkv.bias": (3 * D,),
            b + "attn_output.weight": (D, D), b + "attn_output.bias": (D,),
            b + "ffn_norm.weight": (D,), b + "ffn_norm.bias": (D,),
            b + "ffn_up.weight": (F, D), b + "ffn_up.bias": (F,),
            b + "ffn_gate.weight": (F, D), b + "ffn_gate.bias": (F,),
            b + "ffn_down.weight": (D, F), b + "ffn_down.bias": (D,),
        })
    return shapes


def test_metadata_and_tensor_layout(exported, model):
    meta, tensors = exported("f32")
    cfg = model.config
    assert meta["general.architecture"] == "jais"
    assert meta["jais.block_count"] == cfg.n_layer
    assert meta["jais.context_length"] == cfg.n_positions
    assert meta["jais.embedding_length"] == cfg.n_embd
    assert meta["jais.feed_forward_length"] == 256  # 170 padded to a multiple of 256
    assert meta["jais.attention.head_count"] == cfg.n_head
    assert meta["jais.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    assert meta["jais.attention.max_alibi_bias"] == 8.0
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    # tokenizer, as convert_hf_to_gguf.py's _set_vocab_gpt2 writes a GPT-2 BPE
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    assert tokens[15496] == "Hello" and tokens[50256] == "<|endoftext|>"
    assert types[50256] == gguf.TokenType.CONTROL and types[0] == gguf.TokenType.NORMAL
    assert len(meta["tokenizer.ggml.merges"]) == 50000 and meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 50256
    assert meta["tokenizer.ggml.add_bos_token"] is False
    # exactly the tensors llama.cpp's JAIS loader creates, every one required, in its shapes
    shapes = expected_shapes(cfg.n_layer, cfg.n_embd, 256, VOCAB)
    assert {name: data.shape for name, (data, _) in tensors.items()} == shapes
    assert all(qtype == T.F32 for _, qtype in tensors.values())


def test_mup_multipliers_are_folded(exported, model):
    _, tensors = exported("f32")
    wte = model.transformer.wte.weight.detach().numpy()
    cfg = model.config
    np.testing.assert_allclose(tensors["token_embd.weight"][0], wte * np.float32(cfg.mup_embeddings_scale), rtol=1e-6)
    np.testing.assert_allclose(tensors["output.weight"][0], wte * np.float32(cfg.mup_output_alpha * cfg.mup_width_scale),
                               rtol=1e-6)
    c_attn = model.transformer.h[1].attn.c_attn.weight.detach().numpy()  # Conv1D [in, out] -> [out, in]
    np.testing.assert_array_equal(tensors["blk.1.attn_qkv.weight"][0], c_attn.T)


def test_ffn_padding_is_zero(exported, model):
    _, tensors = exported("f32")
    mlp = model.transformer.h[0].mlp
    F = model.config.n_inner
    up, gate, down = (tensors[f"blk.0.ffn_{k}.weight"][0] for k in ("up", "gate", "down"))
    np.testing.assert_array_equal(up[:F], mlp.c_fc.weight.detach().numpy().T)  # c_fc -> FFN_UP
    np.testing.assert_array_equal(gate[:F], mlp.c_fc2.weight.detach().numpy().T)  # c_fc2 -> FFN_GATE
    np.testing.assert_array_equal(down[:, :F], mlp.c_proj.weight.detach().numpy().T)
    for pad in (up[F:], gate[F:], down[:, F:], tensors["blk.0.ffn_up.bias"][0][F:], tensors["blk.0.ffn_gate.bias"][0][F:]):
        assert pad.size and not pad.any()


# ------------------------------------------------------------------------------------------------
# The numpy JAIS forward reproduces the model
# ------------------------------------------------------------------------------------------------


def test_jais_forward_from_gguf_matches_model(exported, model, ids):
    meta, tensors = exported("f32")
    ref = model_logits(model, ids)
    got = jais_forward(meta, tensors, ids[0].numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_llama_cpp_itself_computes_the_model_logits(workdir, model_dir, model, ids):
    """Where llama-cpp-python is installed (it is not a dependency: it compiles llama.cpp for ~13 minutes),
    llama.cpp loads the exported file through its JAIS architecture and reproduces the model's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(model_dir, workdir / "m-llama.gguf", outtype="f32", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[: ids.shape[1]], dtype=np.float64)
    np.testing.assert_allclose(got, model_logits(model, ids), atol=1e-3, rtol=1e-3)


def test_bin_checkpoint_non_power_of_two_heads_dynamic_alibi_scaling(workdir, caplog, monkeypatch):
    """A ``pytorch_model.bin`` (with the tied ``lm_head.weight`` and a legacy ``attn.bias`` buffer) and no
    tokenizer files; 6 heads (llama.cpp's m1 slopes for heads past n'=4); another FFN width and padding; and
    dynamic ALiBi scaling, which llama.cpp cannot do: the file declares context_length = train_seq_len, up to
    which the model is exact."""
    model = make_model(vocab_size=VOCAB, seed=1, n_embd=96, n_head=6, n_inner=200,
                       alibi_scaling={"type": "linear", "train_seq_len": 128})
    d = workdir / "bin6"
    d.mkdir()
    model.config.to_json_file(d / "config.json")
    state = dict(model.state_dict())  # includes lm_head.weight
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.uint8)  # dropped
    torch.save(state, d / "pytorch_model.bin")
    from btlm.tokenizer import load_tokenizer

    supplied = []  # the vocabulary itself is checked on the f32 file; here only where it comes from
    monkeypatch.setattr(export, "_add_vocab",
                        lambda writer, tok_dir, vocab_size: supplied.append(load_tokenizer(tok_dir)("Hello").input_ids))
    meta, tensors = read(export_gguf(d, workdir / "bin6.gguf", outtype="f32", pad_ffn_to=32, progress=False))
    assert "no tokenizer files" in caplog.text and "context_length=128" in caplog.text
    assert supplied == [[15496]]  # BTLM's GPT-2 BPE, written to a temporary tokenizer directory
    assert meta["jais.attention.max_alibi_bias"] == 8.0
    assert meta["jais.context_length"] == 128
    assert meta["jais.feed_forward_length"] == 224
    assert {name: data.shape for name, (data, _) in tensors.items()} == expected_shapes(2, 96, 224, VOCAB)
    np.testing.assert_allclose(alibi_slopes_llama(6, 8.0), model.transformer.relative_pe.slopes.detach().numpy()[:, 0],
                               rtol=1e-6)
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 23))
    np.testing.assert_allclose(jais_forward(meta, tensors, ids[0].numpy()), model_logits(model, ids), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Other output types
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype,qtype,file_type,rtol", [("f16", T.F16, gguf.LlamaFileType.MOSTLY_F16, 1e-3),
                                                          ("bf16", T.BF16, gguf.LlamaFileType.MOSTLY_BF16, 8e-3)])
def test_half_precision_types(exported, outtype, qtype, file_type, rtol):
    meta, tensors = exported(outtype)
    _, ref = exported("f32")
    assert meta["general.file_type"] == file_type
    for name, (data, t) in tensors.items():
        assert t == (T.F32 if data.ndim == 1 else qtype), name  # norms and biases stay F32
        np.testing.assert_allclose(data, ref[name][0], rtol=rtol, atol=1e-6 if data.ndim == 1 else 1e-4)


@pytest.mark.parametrize("outtype,linear,embed,max_rel", [("q8_0", T.Q8_0, T.Q8_0, 0.01), ("q4_0", T.Q4_0, T.Q8_0, 0.15)])
def test_quantized_types_dequantize_close(exported, model, ids, outtype, linear, embed, max_rel):
    meta, tensors = exported(outtype)
    _, ref = exported("f32")
    assert meta["general.file_type"] == {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    for name, (data, t) in tensors.items():
        if data.ndim == 1:
            assert t == T.F32, name
            np.testing.assert_array_equal(data, ref[name][0])
            continue
        assert t == (embed if name in ("token_embd.weight", "output.weight") else linear), name
        err = np.linalg.norm(data - ref[name][0]) / np.linalg.norm(ref[name][0])
        assert err < max_rel, (name, err)
    # the padded FFN stays exactly zero after quantisation (zero blocks have scale 0)
    F = model.config.n_inner
    assert not tensors["blk.0.ffn_down.weight"][0][:, F:].any() and not tensors["blk.0.ffn_up.weight"][0][F:].any()
    # and the quantised network still computes nearly the same distribution
    ref_logits = model_logits(model, ids)
    got = jais_forward(meta, tensors, ids[0].numpy())
    assert np.abs(got - ref_logits).max() < (0.05 if outtype == "q8_0" else 0.5) * ref_logits.std()


# ------------------------------------------------------------------------------------------------
# The CLI and errors
# ------------------------------------------------------------------------------------------------


def test_cli(workdir, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(export, "_add_vocab", lambda *args: None)  # tested above; keeps the reader fast
    out = workdir / "cli" / "model.gguf"
    assert btlm_main(["export-gguf", "--model", str(model_dir), "--out", str(out), "--outtype", "Q8_0",
                      "--no-progress"]) == 0
    assert "architecture jais" in capsys.readouterr().out
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(os.listdir(out.parent)) == ["model.gguf"]  # no temporary file left
    assert btlm_main(["export-gguf", "--help"]) == 0
    assert "--outtype" in capsys.readouterr().out


def _config_dir(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_bad_inputs(workdir, model_dir, model, capsys):
    out = workdir / "bad.gguf"
    with pytest.raises(GGUFExportError, match="does not exist"):
        export_gguf(workdir / "nope", out)
    with pytest.raises(GGUFExportError, match="no config.json"):
        export_gguf(workdir, out)
    with pytest.raises(GGUFExportError, match="not a BTLM model"):
        export_gguf(_config_dir(workdir / "gpt2", model_type="gpt2"), out)
    quantized = _config_dir(workdir / "int4", model_type="btlm",
                            quantization_config={"quant_method": "btlm_woq", "bits": 4})
    with pytest.raises(GGUFExportError, match="already quantised.*export from the fp32/bf16 model"):
        export_gguf(quantized, out)
    with pytest.raises(GGUFExportError, match="unsupported outtype 'q4_k'"):
        export_gguf(model_dir, out, outtype="q4_k")
    assert btlm_main(["export-gguf", "--model", str(model_dir), "--out", str(out), "--outtype", "q2_k"]) == 2
    assert "invalid choice: 'q2_k'" in capsys.readouterr().err
    with pytest.raises(GGUFExportError, match="is a directory"):
        export_gguf(model_dir, workdir)
    # a config llama.cpp's JAIS graph cannot compute
    cfg = model.config.to_dict()
    with pytest.raises(GGUFExportError, match="kq_scale = 1/head_dim"):
        export_gguf(_config_dir(workdir / "sqrt", **{**cfg, "mup_scale_qk_dot_by_d": False}), out)
    with pytest.raises(GGUFExportError, match="fixed factor"):
        export_gguf(_config_dir(workdir / "fixed", **{**cfg, "alibi_scaling": {"type": "linear", "factor": 2.0}}), out)
    # weights that do not match config.json: nothing is written
    wrong = _config_dir(workdir / "wrong", **{**cfg, "n_layer": 3})
    os.symlink(model_dir / "model.safetensors", wrong / "model.safetensors")
    with pytest.raises(GGUFExportError, match=r"missing \['h.2"):
        export_gguf(wrong, out)
    assert not out.exists() and not [p for p in os.listdir(workdir) if p.startswith(".bad.gguf")]

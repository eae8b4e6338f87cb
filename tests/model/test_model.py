"""Parity of every compute path with the float64 reference, KV cache, interpolation, padding, muP."""

import copy
import math

import pytest
import torch

from btlm.model import BTLMConfig, BTLMLMHeadModel, alibi_slopes, config_from_preset
from tests.conftest import make_model, with_attn
from tests.reference import reference_forward

TOL = dict(atol=2e-4, rtol=1e-4)


def ids(B, T, vocab=97, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_head", [4, 2, 8, 1])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_parity_with_float64_reference(attn, n_head):
    model = make_model(attn, n_head=n_head, n_embd=48 if n_head != 8 else 64)
    x = ids(2, 33)
    want, _ = reference_forward(model, x)
    got = model(x).logits
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_parity_non_power_of_two_heads(attn):
    model = make_model(attn, n_head=6, n_embd=48)
    assert alibi_slopes(6) == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    x = ids(1, 20)
    torch.testing.assert_close(model(x).logits.double(), reference_forward(model, x)[0], **TOL)


def test_slopes_match_spec_for_32_heads():
    s = alibi_slopes(32)
    assert s[0] == pytest.approx(2 ** -0.25) and s[-1] == pytest.approx(2**-8)


def test_chunked_sdpa_equals_eager_with_cache_and_padding():
    eager = make_model("eager")
    sdpa = with_attn(eager, "sdpa")
    sdpa.config.attn_chunk_size = 5  # many query chunks
    x = ids(2, 23)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding
    a = eager(x, attention_mask=mask)
    b = sdpa(x, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], **TOL)
    y = ids(2, 9, seed=3)
    mask2 = torch.cat([mask, torch.ones_like(y)], 1)
    a2 = eager(y, attention_mask=mask2, past_key_values=a.past_key_values)
    b2 = sdpa(y, attention_mask=mask2, past_key_values=b.past_key_values)
    torch.testing.assert_close(a2.logits, b2.logits, **TOL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_leaves_real_logits_unchanged(attn):
    model = make_model(attn)
    x = ids(1, 12)
    pad = torch.full((1, 5), 7)
    padded = torch.cat([pad, x], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    plain = model(x).logits
    got = model(padded, attention_mask=mask).logits[:, 5:]
    torch.testing.assert_close(got, plain, **TOL)
    torch.testing.assert_close(got.double(), reference_forward(model, padded, mask)[0][:, 5:], **TOL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_right_padding(attn):
    model = make_model(attn)
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    got = model(x, attention_mask=mask).logits
    torch.testing.assert_close(got[1, :7], model(x[1:, :7]).logits[0], **TOL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fixed_interpolation(attn):
    model = make_model(attn, alibi_scaling={"type": "linear", "factor": 4.0})
    x = ids(1, 30)
    torch.testing.assert_close(model(x).logits.double(), reference_forward(model, x, divisor=4.0)[0], **TOL)
    plain = with_attn(model, attn)
    plain.config.alibi_scaling = None
    assert not torch.allclose(plain(x).logits, model(x).logits, atol=1e-3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dynamic_interpolation_applies_only_past_train_seq_len(attn):
    model = make_model(attn, alibi_scaling={"type": "linear", "train_seq_len": 16})
    plain = with_attn(model, attn)
    plain.config.alibi_scaling = None
    short, long = ids(1, 16), ids(1, 40)
    torch.testing.assert_close(model(short).logits, plain(short).logits)  # K == train_seq_len: s = 1
    torch.testing.assert_close(model(long).logits.double(), reference_forward(model, long, divisor=40 / 16)[0], **TOL)
    # K counts padding: 4 pads push K=16 over train_seq_len and change the slopes.
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 16)], 1).long()
    got = model(padded, attention_mask=mask).logits[:, 4:]
    torch.testing.assert_close(got.double(), reference_forward(model, padded, mask, divisor=20 / 16)[0][:, 4:], **TOL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(attn):
    model = make_model(attn, alibi_scaling={"type": "linear", "factor": 2.0})
    x = ids(2, 20)
    full = model(x).logits
    out = model(x[:, :12], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for t in range(12, 20):
        out = model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def _decode_incrementally(model, x, prefix):
    out = model(x[:, :prefix], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(prefix, x.shape[1]):
        out = model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, 1)


def test_dynamic_interpolation_cache_history():
    """Past train_seq_len, cached decoding uses K/V computed under earlier divisors: it equals the
    reference run step by step with its own cache, differs from a full forward for 2 layers, and equals the
    full forward's last step for 1 layer only at the last position's divisor."""
    sc = {"type": "linear", "train_seq_len": 10}
    for attn in ("eager", "sdpa"):
        model = make_model(attn, alibi_scaling=sc)
        x = ids(1, 18)
        got = _decode_incrementally(model, x, prefix=6)
        # float64 reference with its own cache history
        ref, past = reference_forward(model, x[:, :6])
        refs = [ref]
        for t in range(6, 18):
            r, past = reference_forward(model, x[:, t:t + 1], past=past)
            refs.append(r)
        torch.testing.assert_close(got.double(), torch.cat(refs, 1), **TOL)
        full = model(x).logits
        assert (got[:, -1] - full[:, -1]).abs().max() > 1e-4  # history matters with 2 layers
    one_layer = make_model("sdpa", alibi_scaling=sc, n_layer=1)
    x = ids(1, 18)
    torch.testing.assert_close(_decode_incrementally(one_layer, x, 6)[:, -1], one_layer(x).logits[:, -1], **TOL)


def test_bf16_close_to_fp32():
    model = make_model("sdpa")
    x = ids(2, 40)
    want = model(x).logits
    got = copy.deepcopy(model).to(torch.bfloat16)(x).logits.float()
    # bf16 rounds every op and the two muP scalars (14.625, 0.2216796875): only a loose tolerance holds
    assert (got - want).abs().max() < 0.15
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_embedding_and_logit_scales_use_activation_dtype():
    """HF multiplies by torch.tensor(scale, dtype): in bf16 the factors are 14.625 and 0.2216796875."""
    assert torch.tensor(14.6, dtype=torch.bfloat16).item() == 14.625
    assert torch.tensor(2.2200000000000003 * 0.1, dtype=torch.bfloat16).item() == 0.2216796875


def test_loss_is_shifted_mean_cross_entropy_ignoring_minus_100():
    model = make_model("sdpa")
    x = ids(2, 15)
    labels = x.clone()
    labels[0, 5:9] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    tgt = labels[:, 1:].reshape(-1)
    keep = tgt != -100
    want = torch.nn.functional.log_softmax(logits[keep].double(), -1).gather(1, tgt[keep, None]).mean().neg()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    model = make_model("sdpa").train()
    x = ids(2, 24)
    model(x, labels=x).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(x, labels=x, use_cache=False).loss.backward()
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-6, rtol=1e-5)


def test_mup_param_groups():
    model = BTLMLMHeadModel(config_from_preset("tiny", mup_width_scale=0.1))
    groups = {g["name"]: g for g in model.get_mup_param_groups(lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"hidden", "embedding", "no_decay"}
    assert groups["hidden"]["lr"] == pytest.approx(1e-4) and groups["hidden"]["weight_decay"] == 0.1
    assert groups["embedding"]["lr"] == 1e-3 and groups["embedding"]["params"] == [model.transformer.wte.weight]
    assert groups["no_decay"]["weight_decay"] == 0.0
    n_hidden = 5 * model.config.n_layer
    assert len(groups["hidden"]["params"]) == n_hidden and all(p.dim() == 2 for p in groups["hidden"]["params"])
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert id(model.transformer.relative_pe.slopes) not in listed
    trainable = {id(p) for n, p in model.named_parameters() if "slopes" not in n}
    assert set(listed) == trainable
    coupled = {g["name"]: g for g in model.get_mup_param_groups(lr=1e-3, weight_decay=0.1, decoupled_wd=False)}
    assert coupled["hidden"]["weight_decay"] == pytest.approx(1.0)
    opt = torch.optim.AdamW(model.get_mup_param_groups(lr=1e-3, weight_decay=0.1), betas=(0.9, 0.95), eps=1e-8)
    model(ids(1, 8), labels=ids(1, 8)).loss.backward()
    opt.step()


def test_mup_init_stds_of_3b_rule():
    cfg = config_from_preset("tiny", n_embd=256, n_head=4, n_inner=512, n_layer=8, mup_width_scale=0.1)
    torch.manual_seed(0)
    model = BTLMLMHeadModel(cfg)
    hidden = 0.073 * math.sqrt(0.1)
    out_std = hidden / math.sqrt(2 * 8)
    blk = model.transformer.h[3]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(hidden, rel=0.03)
    assert blk.mlp.c_fc2.weight.std().item() == pytest.approx(hidden, rel=0.03)
    assert blk.attn.c_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.073, rel=0.02)
    assert blk.attn.c_attn.bias.abs().max() == 0 and torch.all(blk.ln_1.weight == 1)
    # the released 3B values: 0.073·√0.1 = 0.02308, / √64 = 0.002886 (the Model Zoo BTLM config's init stds)
    assert 0.073 * math.sqrt(0.1) == pytest.approx(0.023084626919229165)
    assert 0.073 * math.sqrt(0.1) / math.sqrt(64) == pytest.approx(0.0028855783649036457)


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "linear", "factor": 4},
        {"type": "linear", "factor": 1.0},
        {"type": "dynamic", "factor": 2.0},
        {"type": "linear", "train_seq_len": 1},
        {"type": "linear", "train_seq_len": 8192.0},
        {"type": "linear", "factor": 2.0, "train_seq_len": 8192},
        {"type": "linear"},
        "linear",
    ],
)
def test_invalid_alibi_scaling_is_rejected(bad):
    with pytest.raises(ValueError, match="alibi_scaling"):
        BTLMConfig(alibi_scaling=bad)


def test_released_config_values():
    cfg = config_from_preset("3b")
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner, cfg.vocab_size, cfg.n_positions) == (2560, 32, 32, 6826, 50257, 8192)
    assert cfg.output_logits_scale == pytest.approx(0.222)
    assert cfg.hidden_size == 2560 and cfg.num_attention_heads == 32 and cfg.max_position_embeddings == 8192


def test_too_long_input_and_bad_token_ids():
    model = make_model("sdpa")
    with pytest.raises(ValueError, match="n_positions=256"):
        model(ids(1, 257))
    with pytest.raises(ValueError, match="token id 97 is outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def _loss_and_grads(model, x, mask=None):
    """Logits of the real (unpadded) positions, the loss over them, parameter and input gradients."""
    model.zero_grad(set_to_none=True)
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    embeds = model.transformer.wte(x).detach().requires_grad_()
    # a label counts when it and the position predicting it (the one before) are real tokens
    counted = real & torch.cat([real[:, :1], real[:, :-1]], 1)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=x.masked_fill(~counted, -100), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach()[real], out.loss.detach(), grads, embeds.grad


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_sdpa_training_matches_eager_logits_and_gradients(padded):
    """The training path (each query chunk checkpointed, its bias rebuilt in backward) gives the eager
    reference's logits, loss and gradients, with several chunks and with a padding mask."""
    eager = make_model("eager").train()
    sdpa = with_attn(eager, "sdpa").train()
    sdpa.config.attn_chunk_size = 7  # 5 chunks over 31 tokens, the last one short
    x = ids(2, 31)
    mask = None
    if padded:
        mask = torch.ones_like(x)
        mask[0, :5] = 0  # left padding
        mask[1, 27:] = 0  # right padding
    want = _loss_and_grads(eager, x, mask)
    got = _loss_and_grads(sdpa, x, mask)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert got[2].keys() == want[2].keys() and "transformer.relative_pe.slopes" not in got[2]
    for name, g in want[2].items():
        torch.testing.assert_close(got[2][name], g, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(got[3], want[3], atol=1e-5, rtol=1e-4)


def _bytes_kept_for_backward(model, T):
    """Bytes of the distinct tensors autograd keeps from a training forward (loss) over T tokens."""
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = ids(1, T)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    return sum(kept.values())


def test_training_memory_kept_for_backward_grows_linearly():
    """A training forward keeps O(T) for backward: no chunk's [B, H, q, K] ALiBi bias is held (they add
    H·T²/2 values per layer when kept, which is what made 8k-32k training run out of memory)."""
    model = make_model("sdpa").train()
    model.config.attn_chunk_size = 16
    kept = [_bytes_kept_for_backward(model, T) for T in (64, 128, 256)]
    # Linear (weights are a constant part): each doubling of T adds twice what the previous one added.
    # Keeping the chunk biases makes that 2.4x here.
    assert (kept[2] - kept[1]) / (kept[1] - kept[0]) < 2.05, kept


def test_forward_reads_no_values_back_from_the_device():
    """No host sync per forward: ids and padding masks on an accelerator are not read back (modelled with
    the meta device, where any read fails); ids on the CPU are still checked."""
    cfg = config_from_preset("tiny", vocab_size=97, n_positions=64)
    with torch.device("meta"):
        model = BTLMLMHeadModel(cfg).train()
    x = torch.randint(0, 97, (2, 40), device="meta")
    out = model(x, labels=x, attention_mask=torch.ones(2, 40, dtype=torch.long, device="meta"), use_cache=False)
    assert out.logits.shape == (2, 40, 97) and out.loss.device.type == "meta"


def test_recomputed_chunks_replay_attention_dropout(monkeypatch):
    """With attention dropout, the backward's recomputation draws the same masks as the forward: the
    gradients equal those of plain autograd through the same chunks (same seed)."""
    from btlm.model import model as modeling

    model = make_model("sdpa", attn_pdrop=0.3).train()
    model.config.attn_chunk_size = 6
    x = ids(2, 20)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(x, labels=x, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    recomputed = grads()
    monkeypatch.setattr(modeling._RecomputedChunkAttention, "apply",
                        lambda q, k, v, attn, ctx, chunks, p, scale: attn._chunks(q, k, v, ctx, chunks, p, scale))
    plain = grads()
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, atol=1e-6, rtol=1e-5, msg=name)
    model.config.attn_pdrop = 0.0  # dropout really acted: without it the gradients differ
    assert not torch.allclose(grads()["transformer.h.0.attn.c_attn.weight"], plain["transformer.h.0.attn.c_attn.weight"])

"""An independent, plain float64 BTLM forward written from the released remote code's eval-mode math, for parity tests.

It shares no code with ``btlm.model``: loops over heads, explicit distances, ``-inf`` masks.
"""

from __future__ import annotations

import math

import torch


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _slopes_from(sd, n_head):
    return sd["transformer.relative_pe.slopes"].double().reshape(n_head)


def reference_forward(model, input_ids, attention_mask=None, past=None, divisor=None):
    """Float64 logits ``[B, T, V]`` and the new per-layer ``(k, v)`` list.

    ``past``: list over layers of float64 ``(k, v)`` ``[B, H, P, d]`` (used as given, like a KV cache);
    ``attention_mask``: ``[B, P+T]`` of 1/0; ``divisor``: the ALiBi divisor ``s`` (default from the config
    with K = P+T: ``factor`` if fixed, else ``K/train_seq_len`` when K exceeds it, else 1).
    """
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, T = input_ids.shape
    H, D = cfg.n_head, cfg.n_embd
    d = D // H
    P = 0 if past is None else past[0][0].shape[2]
    K = P + T
    if divisor is None:
        sc = cfg.alibi_scaling
        if sc is None:
            divisor = 1.0
        elif sc.get("factor") is not None:
            divisor = sc["factor"]
        else:
            divisor = K / sc["train_seq_len"] if K > sc["train_seq_len"] else 1.0
    slopes = _slopes_from(sd, H)
    x = sd["transformer.wte.weight"][input_ids] * cfg.mup_embeddings_scale
    rows = torch.arange(P, K)[:, None]
    cols = torch.arange(K)[None, :]
    allowed = (cols <= rows).expand(B, T, K).clone()
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    new_past = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        a = _ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], cfg.layer_norm_epsilon)
        qkv = a @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        split = lambda t: t.reshape(B, -1, H, d).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        if past is not None:
            k = torch.cat([past[i][0], k], 2)
            v = torch.cat([past[i][1], v], 2)
        new_past.append((k, v))
        out = torch.zeros(B, H, T, d, dtype=torch.float64)
        scale = d ** (1.0 if cfg.mup_scale_qk_dot_by_d else 0.5)
        for h in range(H):
            s = q[:, h] @ k[:, h].transpose(-1, -2) / scale
            s = s - (slopes[h] / divisor) * (cols - rows).abs()
            s = s.masked_fill(~allowed, -math.inf)
            w = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows (padding queries) -> 0
            out[:, h] = w @ v[:, h]
        o = out.permute(0, 2, 1, 3).reshape(B, T, D)
        x = x + o @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        b = _ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], cfg.layer_norm_epsilon)
        up = b @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"]
        gate = b @ sd[p + "mlp.c_fc2.weight"] + sd[p + "mlp.c_fc2.bias"]
        x = x + (up * torch.nn.functional.silu(gate)) @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    x = _ln(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], cfg.layer_norm_epsilon)
    logits = x @ sd["transformer.wte.weight"].T * (cfg.mup_output_alpha * cfg.mup_width_scale)
    return logits, new_past

"""How much quantisation changes a model: KL(fp ‖ quantised) per token and the perplexity difference.

``btlm quality --model DIR --text FILE`` quantises ``DIR`` in memory to int8 and int4
and prints a Markdown table (the figures in benchmarks/results/quant_quality.md).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def compare_models(reference, candidate, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean per-token ``KL(reference ‖ candidate)`` (nats) and both perplexities on next-token prediction.

    ``batches`` are ``[B, T]`` token tensors; every position except the last predicts the next token.
    """
    kl_sum = nll_ref = nll_cand = 0.0
    n_tokens = 0
    for ids in batches:
        logp_ref = F.log_softmax(reference(ids).logits[:, :-1].float(), -1)
        logp_cand = F.log_softmax(candidate(ids).logits[:, :-1].float(), -1)
        target = ids[:, 1:].unsqueeze(-1)
        kl_sum += F.kl_div(logp_cand, logp_ref, log_target=True, reduction="sum").item()
        nll_ref -= logp_ref.gather(-1, target).sum().item()
        nll_cand -= logp_cand.gather(-1, target).sum().item()
        n_tokens += target.numel()
    ppl_ref, ppl_cand = math.exp(nll_ref / n_tokens), math.exp(nll_cand / n_tokens)
    return dict(kl=kl_sum / n_tokens, ppl_ref=ppl_ref, ppl=ppl_cand, ppl_rel_diff=ppl_cand / ppl_ref - 1, tokens=n_tokens)


def token_batches(token_ids: list[int], seq_len: int, batch_size: int, max_batches: int) -> list[torch.Tensor]:
    """Cut a token stream into ``[batch_size, seq_len]`` tensors (drops the ragged tail)."""
    per_batch = seq_len * batch_size
    n = min(len(token_ids) // per_batch, max_batches)
    if n == 0:
        raise ValueError(f"need at least {per_batch} tokens for one batch, got {len(token_ids)}")
    ids = torch.tensor(token_ids[: n * per_batch]).view(n, batch_size, seq_len)
    return list(ids)


_DOC_MODULES = ("argparse", "json", "collections", "subprocess", "logging", "typing", "pathlib",
                "textwrap", "shutil", "tarfile", "zipfile", "csv", "threading")


def docstring_bytes() -> list[int]:
    """~150 kB of English technical text every Python install has (the docstrings of a few stdlib modules,
    :func:`btlm.data.corpus.module_docstrings`), as byte ids."""
    from btlm.data.corpus import module_docstrings

    wanted = set(_DOC_MODULES) | {f"{m}___init__" for m in _DOC_MODULES}  # a module, or a package's __init__
    return list("\n\n".join(text for _, text in module_docstrings(names=wanted) if text).encode())


def train_tiny_byte_model(steps: int = 150, seed: int = 0):
    """A tiny BTLM (byte vocabulary, 2 layers × 64) trained on the first 90 % of :func:`docstring_bytes`.

    Returns ``(model, held_out_batches)`` with four ``[8, 64]`` batches from the unseen last 10 %.
    """
    from btlm.model import BTLMLMHeadModel, config_from_preset

    data = docstring_bytes()
    split = int(len(data) * 0.9)
    train, held_out = torch.tensor(data[:split]), data[split:]
    torch.manual_seed(seed)
    model = BTLMLMHeadModel(config_from_preset("tiny", vocab_size=256, n_positions=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 65, (8,), generator=g)
        x = torch.stack([train[s : s + 64] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), token_batches(held_out, 64, 8, 4)


def quality_table(model, batches, variants=((8, None), (4, 128), (4, 64), (4, 32))) -> list[dict]:
    """Quantise copies of ``model`` to each ``(bits, group_size)`` and compare them with it."""
    from .quantize import quantize_model

    rows = []
    for bits, group_size in variants:
        quantised = quantize_model(copy.deepcopy(model), bits=bits, group_size=group_size or 128, progress=False)
        rows.append(dict(variant=f"int{bits}" + (f" g{group_size}" if group_size else ""),
                         **compare_models(model, quantised, batches)))
    return rows


def load_text_batches(model_path: str, text_path: str, seq_len: int = 256, batch_size: int = 4,
                      max_batches: int = 8):
    """The fp32 model of ``model_path`` and ``[batch_size, seq_len]`` GPT-2 token batches of ``text_path``."""
    from btlm.errors import UsageError
    from btlm.io import load_model
    from btlm.tokenizer import tiktoken_encoding

    model = load_model(model_path, dtype="fp32")
    ids = tiktoken_encoding().encode_ordinary(Path(text_path).read_text(encoding="utf-8"))
    try:
        batches = token_batches(ids, seq_len, batch_size, max_batches)
    except ValueError as err:
        raise UsageError(f"--text {text_path}: {err}") from None
    return model, batches


def markdown_rows(rows: list[dict]) -> str:
    """:func:`quality_table` rows as a Markdown table."""
    lines = ["| variant | KL(fp32 ‖ q) nats/token | ppl fp32 | ppl quantised | ppl change | tokens |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['kl']:.2e} | {r['ppl_ref']:.3f} | {r['ppl']:.3f} | "
              f"{100 * r['ppl_rel_diff']:+.2f}% | {r['tokens']} |" for r in rows]
    return "\n".join(lines)

"""How much quantisation changes a model: KL(fp ‖ quantised) per token and the perplexity difference.

``python -m btlm.quant.quality --model DIR --text FILE`` quantises ``DIR`` in memory to int8 and int4
and prints a Markdown table (the figures in benchmarks/results/quant_quality.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
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


_DOC_MODULES = ("argparse", "json", "collections", "subprocess", "logging", "typing", "pathlib", "decimal",
                "textwrap", "shutil", "tarfile", "zipfile", "csv", "threading")


def docstring_bytes() -> list[int]:
    """~150 kB of English technical text every Python install has (stdlib docstrings), as byte ids."""
    import importlib
    import inspect

    parts = []
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and inspect.getdoc(obj):
                parts.append(inspect.getdoc(obj))
    return list("\n\n".join(parts).encode())


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m btlm.quant.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="unquantised BTLM directory (loaded in fp32)")
    p.add_argument("--text", help="held-out UTF-8 text file (not seen in training)")
    p.add_argument("--tiny-trained", action="store_true",
                   help="instead: train the tiny byte-level model of tests/quant/test_quality.py and use it")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=8)
    args = p.parse_args(argv)

    from btlm.inference import ModelLoadError, load_model
    from btlm.tokenizer import tiktoken_encoding

    if args.tiny_trained:
        model, batches = train_tiny_byte_model()
    elif not (args.model and args.text):
        p.error("give --model and --text, or --tiny-trained")
    else:
        try:
            model = load_model(args.model, dtype="fp32")
            ids = tiktoken_encoding().encode_ordinary(Path(args.text).read_text(encoding="utf-8"))
            batches = token_batches(ids, args.seq_len, args.batch_size, args.max_batches)
        except (ModelLoadError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print("| variant | KL(fp32 ‖ q) nats/token | ppl fp32 | ppl quantised | ppl change | tokens |")
    print("|---|---|---|---|---|---|")
    for r in quality_table(model, batches):
        print(f"| {r['variant']} | {r['kl']:.2e} | {r['ppl_ref']:.3f} | {r['ppl']:.3f} | "
              f"{100 * r['ppl_rel_diff']:+.2f}% | {r['tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

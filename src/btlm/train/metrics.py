"""Eval metrics of the Model Zoo GPT-2 model (spec §5): ``loss``, ``eval/lm_perplexity``, ``eval/accuracy``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class LMEvalMetrics:
    """Accumulates over eval batches; token-level and loss-mask weighted.

    * ``eval/accuracy`` = Σ (argmax logits == label)·[m>0] / Σ [m>0]
    * ``eval/lm_perplexity`` = exp(Σ ce·m / Σ [m>0])   (the unscaled loss over the counted tokens)
    * ``loss`` = arithmetic mean of the per-batch losses (as the Model Zoo reports it)
    """

    def __init__(self) -> None:
        self.correct = 0.0
        self.tokens = 0.0
        self.ce_sum = 0.0
        self.loss_sum = 0.0
        self.batches = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, loss: torch.Tensor) -> None:
        mask = loss_mask.to(torch.float64)
        counted = (loss_mask > 0).to(torch.float64)
        preds = logits.argmax(-1)
        self.correct += float(((preds == labels.long()).to(torch.float64) * counted).sum())
        self.tokens += float(counted.sum())
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.long().flatten(), reduction="none")
        self.ce_sum += float((ce.to(torch.float64) * mask.flatten()).sum())
        self.loss_sum += float(loss)
        self.batches += 1

    def reduce(self, all_reduce_sum=None) -> None:
        """Sum the accumulators over data-parallel ranks (``all_reduce_sum`` maps a tensor to its sum)."""
        if all_reduce_sum is None:
            return
        t = torch.tensor([self.correct, self.tokens, self.ce_sum, self.loss_sum, self.batches], dtype=torch.float64)
        self.correct, self.tokens, self.ce_sum, self.loss_sum, self.batches = all_reduce_sum(t).tolist()

    def compute(self) -> dict[str, float]:
        if not self.batches:
            raise ValueError("no eval batches were processed")
        tokens = max(self.tokens, 1.0)
        return {
            "loss": self.loss_sum / self.batches,
            "eval/lm_perplexity": math.exp(self.ce_sum / tokens),
            "eval/accuracy": self.correct / tokens,
        }

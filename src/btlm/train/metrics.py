"""Eval metrics of the Model Zoo GPT-2 model: ``loss``, ``eval/lm_perplexity``, ``eval/accuracy``."""

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
        # [correct, tokens, ce_sum, loss_sum, batches] in float64 on the logits' device: no host sync per
        # batch, and the tensor can go to the collective as is (NCCL refuses CPU tensors).
        self.sums: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, loss: torch.Tensor) -> None:
        mask = loss_mask.to(torch.float64)
        counted = (loss_mask > 0).to(torch.float64)
        preds = logits.argmax(-1)
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.long().flatten(), reduction="none")
        batch = torch.stack([
            ((preds == labels.long()).to(torch.float64) * counted).sum(),
            counted.sum(),
            (ce.to(torch.float64) * mask.flatten()).sum(),
            loss.detach().to(torch.float64).reshape(()),
            torch.ones((), dtype=torch.float64, device=logits.device),
        ])
        self.sums = batch if self.sums is None else self.sums + batch

    def reduce(self, all_reduce_sum=None) -> None:
        """Sum the accumulators over data-parallel ranks (``all_reduce_sum`` maps a tensor to its sum).

        The tensor handed over lives on the device the metrics were computed on (the model's)."""
        if all_reduce_sum is None or self.sums is None:
            return
        self.sums = all_reduce_sum(self.sums)

    def compute(self) -> dict[str, float]:
        if self.sums is None:
            raise ValueError("no eval batches were processed")
        correct, tokens, ce_sum, loss_sum, batches = self.sums.tolist()  # the one host sync
        tokens = max(tokens, 1.0)
        return {
            "loss": loss_sum / batches,
            "eval/lm_perplexity": math.exp(ce_sum / tokens),
            "eval/accuracy": correct / tokens,
        }

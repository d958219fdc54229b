"""The causal-LM loss both model families return: what the original code computes, without copying logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmtune.errors import InvalidInputError


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """fp32 cross-entropy of logits[t] against labels[t+1], -100 ignored; mean, or sum / num_items_in_batch
    (the transformers Trainer's gradient-accumulation convention). Labels are shifted, not the logits, so the
    [b, L, vocab] tensor is never copied."""
    if logits.shape[:2] != labels.shape:
        raise InvalidInputError(f"labels {tuple(labels.shape)} need logits at every position, got "
                                f"{tuple(logits.shape[:2])} (logits_to_keep must be 0)", where="labels")
    targets = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=-100)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
    if num_items_in_batch is None:
        return loss
    return loss / torch.as_tensor(num_items_in_batch, device=loss.device)

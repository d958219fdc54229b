"""Cross-entropy over label positions only, in chunks, so [batch, seq, vocab] fp32 logits never exist.

At ChatGLM's 130,528-word vocabulary the logits of one 4×1024 batch are 2.1 GB in fp32 and the
output projection dominates a step (reference/baseline.md). Only positions with a label need logits;
those are projected a chunk at a time and, with `recompute`, each chunk's logits are rebuilt in the
backward pass instead of being kept, so the peak is one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def label_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a label (shifted by one) and those labels, flattened: [N, H], [N]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def _chunk_loss(project: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, targets: torch.Tensor):
    logits = project(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
    recompute: bool = True,
    keep_logits_bytes: int = 1 << 30,
) -> tuple[torch.Tensor, int]:
    """Sum (not mean) of fp32 cross-entropy over shifted labels, and the number of labelled tokens.

    The caller divides by the token count of the whole optimizer step (all micro-batches and ranks),
    which makes gradient accumulation and data parallelism match one big batch exactly.
    """
    rows, targets = label_positions(hidden, labels)
    count = int(targets.numel())
    if count == 0:
        # Keep the graph connected so every rank runs the same backward collectives.
        return hidden.sum() * 0.0, 0
    vocab = getattr(project, "out_features", None)
    if recompute and vocab is not None and count * vocab * 4 <= keep_logits_bytes:
        recompute = False  # small enough to keep: skip the extra projection in the backward pass
    total = None
    for start in range(0, count, chunk_size):
        part_rows, part_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute and torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, project, part_rows, part_targets, use_reentrant=False)
        else:
            part = _chunk_loss(project, part_rows, part_targets)
        total = part if total is None else total + part
    return total, count

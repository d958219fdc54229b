"""The vocabulary projection (hidden → logits), with the fast CPU kernel for the few rows of a decode step.

At generation time the 65k/130k-wide output layer dominates each step on CPU. For a handful of rows MKL is
2-3.7x faster computing ``W @ h^T`` than ``F.linear``'s ``h @ W^T`` (measured on the small v1 head:
1 row 24.8 → 14.8 ms, 8 rows 57.9 → 21.4 ms), and a single row is fastest duplicated to two. Same weight,
no copy; results equal F.linear's to float32 rounding. Training (grad enabled), GPUs, other dtypes,
small vocabularies and many rows keep the plain layer call.
"""

from __future__ import annotations

import torch
from torch import nn

_MIN_VOCAB = 16384
_MAX_ROWS = 32


def project_to_vocab(hidden: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(hidden)`` for the output layer; a faster but equal kernel for small CPU inference batches."""
    weight = getattr(layer, "weight", None)
    if (
        type(layer) is not nn.Linear
        or torch.is_grad_enabled()
        or hidden.device.type != "cpu"
        or weight.dtype != torch.float32
        or hidden.dtype != torch.float32
        or weight.shape[0] < _MIN_VOCAB
    ):
        return layer(hidden)
    rows = hidden.reshape(-1, hidden.shape[-1])
    count = rows.shape[0]
    if count == 0 or count > _MAX_ROWS:
        return layer(hidden)
    if count == 1:
        rows = torch.cat((rows, rows))
    logits = torch.mm(weight, rows.t()).t()[:count]
    if layer.bias is not None:
        logits = logits + layer.bias
    return logits.reshape(*hidden.shape[:-1], weight.shape[0])

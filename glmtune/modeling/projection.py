"""The vocabulary projection (hidden → logits), with fast CPU kernels for the few rows of a decode step.

At generation time the 65k/130k-wide output layer dominates each step on CPU. bf16 (up to
`glmtune.kernels.MAX_ROWS` rows): glmtune's own GEMV (`glmtune.kernels.decode_linear`, AVX512-BF16; ~2x
oneDNN's speed at ChatGLM2's 65024 x 4096, no extra copy). fp32: MKL's sgemm behind
``F.linear`` is a poor fit for a handful of rows. Two faster forms, measured on the small v1 head (130344 x 512,
2 cores): oneDNN with the weight reordered once into its blocked layout (1 row 9.1 ms, 8 rows 14.5 ms), and,
where oneDNN is missing or turned off, MKL computing ``W @ h^T`` (one row duplicated to two 11.2 ms, 8 rows
19.9 ms) against ``F.linear``'s 19.0 / 44.9 ms. Results equal F.linear's to float32 rounding.

The reordered weight is a second copy of the output layer (vocab x hidden x 4 bytes; 255 MiB for the small v1
head, 2 GiB for ChatGLM-6B in fp32), made on the first inference call and remade when the weight changes.
``GLMTUNE_PACKED_PROJECTION=0`` turns it off to save that memory. Training (grad enabled), GPUs, other
dtypes, small vocabularies and many rows keep the plain layer call.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from glmtune.kernels import decode_linear

_MIN_VOCAB = 16384
_MAX_ROWS = 32
_PACK_FOR_ROWS = 8  # the row count the oneDNN layout is chosen for; 1-16 rows all run well with it
# layer -> ((storage, version, shape) of the weight it was made from, reordered weight); kept outside the
# module so it never reaches a state dict, a deepcopy or a pickle, and goes away with the layer.
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def project_to_vocab(hidden: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(hidden)`` for the output layer; a faster but equal kernel for small CPU inference batches."""
    weight = getattr(layer, "weight", None)
    if hidden.dtype == torch.bfloat16:
        return decode_linear(layer, hidden)
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
    packed = _packed_weight(layer)
    if packed is not None:
        logits = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), packed, layer.bias, "none", [], "")
    else:
        if count == 1:
            rows = torch.cat((rows, rows))
        logits = torch.mm(weight, rows.t()).t()[:count]
        if layer.bias is not None:
            logits = logits + layer.bias
    return logits.reshape(*hidden.shape[:-1], weight.shape[0])


def _packed_weight(layer: nn.Linear) -> torch.Tensor | None:
    """The layer's weight in oneDNN's layout, cached per layer and keyed by the weight's storage and version
    (an optimizer step or a load bumps them); None when turned off or this torch has no oneDNN."""
    if os.environ.get("GLMTUNE_PACKED_PROJECTION", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    weight = layer.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = _PACKED.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_FOR_ROWS)
    except (AttributeError, RuntimeError):  # an op this torch build lacks: the MKL form is used instead
        return None
    _PACKED[layer] = (key, packed)
    return packed

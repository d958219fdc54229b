"""Cross-entropy over label positions only, so [batch, seq, vocab] fp32 logits never exist.

At ChatGLM's 130,528-word vocabulary (GLM-4's 151,552) the output projection and its loss are most of a
training step (reference/baseline.md; bench/bench_families.py, bench/bench_peer.py). Only positions with a
label need logits. For a plain `nn.Linear` head on CPU, `LinearCrossEntropy` computes them into ONE buffer
that one fused softmax turns into the logits' gradient (softmax - one_hot) already in the forward pass, so the
backward pass is just the [rows, hidden] products. The autograd path (linear, log_softmax, nll_loss and their
backward) allocates four [labels, vocab] tensors per step instead, and each fresh one costs page faults
comparable to the softmax itself. fp32 heads compute in fp32; under bf16 autocast (or with bf16 weights) the
projections run in bf16 as the layer call would and the buffer holds bf16, while the softmax runs in fp32 a
few cache-sized rows at a time. When keeping that buffer would exceed `keep_logits_bytes`, the logits are
recomputed a chunk at a time in the backward pass instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# fp32 bytes of bf16 logits whose softmax is computed at a time (a scratch that stays in cache).
PASS_BYTES = 16 << 20
# Below this a target's probability is too close to the subnormals for -log p: that row's log-softmax is exact.
TINY_PROBABILITY = 1e-30


def label_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states that predict a label (shifted by one) and those labels, flattened: [N, H], [N]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def _chunk_loss(project: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, targets: torch.Tensor):
    logits = project(rows).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def _logits_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out = rows @ weight.T + bias, in the dtype of all three, as F.linear computes it (no temporary)."""
    if bias is None:
        torch.mm(rows, weight.t(), out=out)
    else:
        torch.addmm(bias, rows, weight.t(), out=out)


def _softmax_pass(logits: torch.Tensor, targets: torch.Tensor, scratch: torch.Tensor | None, grads: bool,
                  exact_logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over rows of -log softmax(logits)[target] (-log of the target's probability). `logits` is scratch
    afterwards, or with `grads` holds d(that sum)/d logits = softmax - one_hot.

    One fused softmax over fp32 logits; bf16 logits go through the fp32 `scratch` a few rows at a time (cast,
    softmax, gradient cast back while in cache). `exact_logits(rows)` gives fp32 logits of those rows again
    for the rare target whose probability is too small for -log p.
    """
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    count = logits.shape[0]
    step = count if scratch is None else scratch.shape[0]
    for start in range(0, count, step):
        stop = min(start + step, count)
        part = logits[start:stop] if scratch is None else scratch[: stop - start].copy_(logits[start:stop])
        index = (torch.arange(stop - start, device=part.device), targets[start:stop])
        torch.softmax(part, -1, out=part)
        picked = part[index]
        tiny = picked < TINY_PROBABILITY
        if bool(tiny.any()):
            rows = tiny.nonzero()[:, 0]
            log_probs = torch.log_softmax(exact_logits(start + rows), -1)
            total -= log_probs[torch.arange(rows.numel(), device=rows.device), targets[start + rows]].sum()
            picked = picked.masked_fill(tiny, 1.0)
        total -= picked.log().sum()
        if grads:
            part[index] -= 1.0
            if scratch is not None:
                logits[start:stop].copy_(part)
    return total


def _scratch(like: torch.Tensor, count: int, vocab: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The fp32 rows the softmax of bf16 logits is computed in; None for fp32 logits (done in place)."""
    if dtype == torch.float32:
        return None
    return like.new_empty(min(max(1, PASS_BYTES // (4 * vocab)), count), vocab, dtype=torch.float32)


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(rows @ weight.T + bias, targets): the layer call (in `dtype`: float32, or
    bfloat16 as under autocast) then a float32 cross-entropy, with the same loss and gradients.

    `keep`: the forward pass leaves the logits' gradient in one [N, vocab] buffer for the backward pass;
    otherwise the backward pass recomputes the logits `chunk_size` rows at a time (one more projection).
    `grads`: whether a backward pass will follow (else only the loss is computed).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size: int, keep: bool, dtype: torch.dtype,
                grads: bool):  # noqa: D102 - see the class
        count, vocab = rows.shape[0], weight.shape[0]
        keep = keep and grads
        chunk = count if keep else chunk_size
        with torch.autocast(rows.device.type, enabled=False):
            low = (rows.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)
            scratch = _scratch(rows, min(chunk, count), vocab, dtype)
            buffer = rows.new_empty(min(chunk, count), vocab, dtype=dtype)
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            for start in range(0, count, chunk):
                part = buffer[: min(chunk, count - start)]
                _logits_into(part, low[0][start : start + chunk], low[1], low[2])
                total += _softmax_pass(part, targets[start : start + chunk], scratch, keep,
                                       _exact_logits(low, start))
        ctx.save_for_backward(*low, targets, buffer if keep else None)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.input_dtypes = (rows.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - see the class
        rows, weight, bias, targets, kept = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        count, vocab = rows.shape[0], weight.shape[0]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = grad_bias = None
        chunk = count if kept is not None else ctx.chunk_size
        if kept is None:
            buffer = rows.new_empty(min(chunk, count), vocab)
            scratch = _scratch(rows, min(chunk, count), vocab, ctx.dtype)
        with torch.autocast(rows.device.type, enabled=False):
            for start in range(0, count, chunk):
                part_rows = rows[start : start + chunk]
                if kept is not None:
                    grad = kept
                else:  # the same logits and softmax as the forward pass, bit for bit
                    grad = buffer[: part_rows.shape[0]]
                    _logits_into(grad, part_rows, weight, bias)
                    _softmax_pass(grad, targets[start : start + chunk], scratch, True,
                                  _exact_logits((rows, weight, bias), start))
                if need_rows:
                    torch.mm(grad, weight, out=grad_rows[start : start + chunk])
                if need_weight:  # the first chunk's product is the gradient: no zero-filled [vocab, hidden] first
                    grad_weight = grad.t() @ part_rows if grad_weight is None else grad_weight.addmm_(grad.t(), part_rows)
                if need_bias:
                    part_bias = grad.sum(0, dtype=torch.float32)
                    grad_bias = part_bias if grad_bias is None else grad_bias.add_(part_bias)
        # grad_output scales the [rows, hidden] products, not the [rows, vocab] buffer (one pass less over it).
        grads = [None if grad is None else grad.to(input_dtype).mul_(grad_output)
                 for grad, input_dtype in zip((grad_rows, grad_weight, grad_bias), ctx.input_dtypes, strict=True)]
        return *grads, None, None, None, None, None


def _exact_logits(low: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                  offset: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """fp32 logits of the given rows (counted from `offset`), computed as the buffer's were."""
    rows, weight, bias = low
    return lambda index: F.linear(rows[offset + index], weight, bias).float()


def _fused_dtype(project: object, rows: torch.Tensor) -> torch.dtype | None:
    """The dtype LinearCrossEntropy computes `project`'s logits in when that is exactly what calling it would
    compute (float32, or bfloat16 under bf16 autocast or with bf16 weights and inputs), else None.

    Module hooks (DeepSpeed ZeRO-3 gathers weights in one), accelerate's wrapped forward, fp16 autocast and
    other dtypes keep the plain layer call. So do GPUs: the cache-sized passes are tuned for CPUs, where
    the page faults of fresh [rows, vocab] tensors cost as much as the softmax itself.
    """
    if type(project) is not nn.Linear or project._forward_hooks or project._forward_pre_hooks:
        return None
    if rows.device.type != "cpu" or hasattr(project, "_hf_hook"):
        return None
    if tuple(project.weight.shape) != (project.out_features, project.in_features):
        return None
    floats = (torch.float32, torch.bfloat16)
    if project.weight.dtype not in floats or rows.dtype not in floats:
        return None
    if torch.is_autocast_enabled("cpu"):
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
    return project.weight.dtype if rows.dtype == project.weight.dtype else None


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
    dtype = _fused_dtype(project, rows)
    size = dtype.itemsize if dtype is not None else 4
    if recompute and vocab is not None and count * vocab * size <= keep_logits_bytes:
        recompute = False  # small enough to keep: skip the extra projection in the backward pass
    if dtype is not None:
        weight, bias = project.weight, project.bias
        grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias))
        return LinearCrossEntropy.apply(rows, weight, bias, targets, chunk_size, not recompute, dtype, grads), count
    total = None
    for start in range(0, count, chunk_size):
        part_rows, part_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute and torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, project, part_rows, part_targets, use_reentrant=False)
        else:
            part = _chunk_loss(project, part_rows, part_targets)
        total = part if total is None else total + part
    return total, count

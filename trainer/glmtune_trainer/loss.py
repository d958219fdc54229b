"""Cross-entropy over label positions only, so [batch, seq, vocab] fp32 logits never exist.

At ChatGLM's 130,528-word vocabulary the output projection and its loss are most of a training step
(reference/baseline.md; 77% of a packed small-v1 LoRA step, bench/bench_families.py). Only positions with a
label need logits. For a plain float32 `nn.Linear` head on CPU, `LinearCrossEntropy` computes them into ONE
buffer that the log-softmax overwrites in place and the backward turns into the logits' gradient in place:
the autograd path (linear, log_softmax, nll_loss) allocates four [labels, vocab] tensors per step instead,
and each fresh one costs page faults comparable to the log-softmax itself (the small-v1 head: 4.3-4.9 CPU s
a step before, 3.1-3.6 after). When keeping that buffer would exceed `keep_logits_bytes`, the logits are
recomputed a chunk at a time in the backward pass instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
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


def _log_probs_into(out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out = log_softmax(rows @ weight.T + bias), written in place (no [rows, vocab] temporary)."""
    torch.mm(rows, weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    torch.log_softmax(out, -1, out=out)


def _logits_grad_(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(sum of -log p[target]) / d logits = softmax - one_hot, unscaled; overwrites log_probs. The caller scales
    the [rows, hidden] products by grad_output instead of this [rows, vocab] buffer (one pass less over it)."""
    grad = log_probs.exp_()
    grad[torch.arange(targets.numel(), device=grad.device), targets] -= 1.0
    return grad


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(rows @ weight.T + bias, targets), equal to the autograd composition.

    `keep`: hold all log-probabilities for the backward pass (one [N, vocab] buffer); otherwise recompute
    them `chunk_size` rows at a time there (one [chunk_size, vocab] buffer, one more projection).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk_size: int, keep: bool):  # noqa: D102 - see the class
        count, vocab = rows.shape[0], weight.shape[0]
        if keep:
            log_probs = rows.new_empty(count, vocab)
            _log_probs_into(log_probs, rows, weight, bias)
            total = -log_probs.gather(1, targets[:, None]).sum()
        else:
            log_probs = None
            buffer = rows.new_empty(min(chunk_size, count), vocab)
            total = rows.new_zeros(())
            for start in range(0, count, chunk_size):
                part = buffer[: min(chunk_size, count - start)]
                _log_probs_into(part, rows[start : start + chunk_size], weight, bias)
                total -= part.gather(1, targets[start : start + chunk_size, None]).sum()
        ctx.save_for_backward(rows, weight, bias, targets, log_probs)
        ctx.chunk_size, ctx.keep, ctx.consumed = chunk_size, keep, False
        return total

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102 - see the class
        if ctx.keep and ctx.consumed:  # the first backward turned the kept buffer into gradients in place
            raise RuntimeError("LinearCrossEntropy keeping its logits supports one backward pass (no retain_graph)")
        ctx.consumed = True
        rows, weight, bias, targets, log_probs = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = grad_bias = None
        chunk = rows.shape[0] if log_probs is not None else ctx.chunk_size
        buffer = None if log_probs is not None else rows.new_empty(min(chunk, rows.shape[0]), weight.shape[0])
        for start in range(0, rows.shape[0], chunk):
            part_rows, part_targets = rows[start : start + chunk], targets[start : start + chunk]
            if log_probs is not None:
                part = log_probs
            else:
                part = buffer[: part_rows.shape[0]]
                _log_probs_into(part, part_rows, weight, bias)
            grad = _logits_grad_(part, part_targets)
            if need_rows:
                torch.mm(grad, weight, out=grad_rows[start : start + chunk])
            if need_weight:  # the first chunk's product is the gradient: no zero-filled [vocab, hidden] first
                grad_weight = grad.t() @ part_rows if grad_weight is None else grad_weight.addmm_(grad.t(), part_rows)
            if need_bias:
                grad_bias = grad.sum(0) if grad_bias is None else grad_bias.add_(grad.sum(0))
        for grad in (grad_rows, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(grad_output)
        return grad_rows, grad_weight, grad_bias, None, None, None


def _fused_head(project: object, rows: torch.Tensor) -> nn.Linear | None:
    """`project` when LinearCrossEntropy computes exactly what calling it would, else None.

    Module hooks (DeepSpeed ZeRO-3 gathers weights in one), accelerate's wrapped forward, autocast (the layer
    would run in bf16/fp16) and non-float32 tensors keep the plain layer call. So do GPUs: the in-place
    log-softmax is checked on CPU only, and the page-fault cost it avoids is a CPU one.
    """
    if type(project) is not nn.Linear or project._forward_hooks or project._forward_pre_hooks:
        return None
    if rows.device.type != "cpu":
        return None
    if hasattr(project, "_hf_hook") or torch.is_autocast_enabled(rows.device.type):
        return None
    if project.weight.dtype != torch.float32 or rows.dtype != torch.float32:
        return None
    if tuple(project.weight.shape) != (project.out_features, project.in_features):
        return None
    return project


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
    head = _fused_head(project, rows)
    if head is not None:
        return LinearCrossEntropy.apply(rows, head.weight, head.bias, targets, chunk_size, not recompute), count
    total = None
    for start in range(0, count, chunk_size):
        part_rows, part_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute and torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, project, part_rows, part_targets, use_reentrant=False)
        else:
            part = _chunk_loss(project, part_rows, part_targets)
        total = part if total is None else total + part
    return total, count

"""The training loop: `fit` runs optimizer steps, `validate` computes held-out loss; plain functions.

A step takes `gradient_accumulation_steps` micro-batches, counts their labelled tokens over all ranks
first, and scales each micro-batch's loss sum by that count, so accumulation and data parallelism give
exactly the gradient of one big batch. The data position is the step number itself (epoch order is a
pure function of seed and epoch), which is what makes a resumed run continue bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from glmtune.errors import InvalidInputError
from glmtune_trainer.distributed import all_reduce_sum
from glmtune_trainer.guard import NonFiniteGuard
from glmtune_trainer.metrics import MetricsLogger


class BatchSource(Protocol):
    """This rank's micro-batches: the same number on every rank, in an order fixed by (seed, epoch)."""

    def num_micro_batches(self) -> int: ...

    def micro_batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]: ...

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]: ...


@dataclass
class LoopState:
    """Progress saved in every checkpoint (`trainer_state.json`).

    `eval_metrics` are the latest held-out figures (eval_loss, perplexity, bleu4, rouge_l); `epoch_loss_sum` /
    `epoch_loss_steps` add up the current epoch's finite step losses, whose mean is the run's `train_loss`.
    """

    step: int = 0
    tokens: int = 0
    last_loss: float = float("nan")
    eval_loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "last_loss": self.last_loss, "eval_loss": self.eval_loss,
                "eval_metrics": dict(self.eval_metrics), "epoch_loss_sum": self.epoch_loss_sum,
                "epoch_loss_steps": self.epoch_loss_steps}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        """The state `to_json` saved; files from before the metrics were kept give empty figures."""
        eval_loss = saved.get("eval_loss")
        metrics = saved.get("eval_metrics")
        if not isinstance(metrics, dict):
            metrics = {} if eval_loss is None else held_out_scores(eval_loss)
        return cls(step=saved["step"], tokens=saved.get("tokens", 0),
                   last_loss=saved.get("last_loss", float("nan")), eval_loss=eval_loss, eval_metrics=metrics,
                   epoch_loss_sum=float(saved.get("epoch_loss_sum", 0.0)),
                   epoch_loss_steps=int(saved.get("epoch_loss_steps", 0)))

    def run_metrics(self) -> dict[str, float]:
        """What the export records: the held-out figures of the final weights plus `train_loss`, the mean step
        loss of the last epoch (finite numbers only)."""
        figures = dict(self.eval_metrics)
        if self.epoch_loss_steps:
            figures["train_loss"] = self.epoch_loss_sum / self.epoch_loss_steps
        return {k: float(v) for k, v in figures.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def held_out_scores(eval_loss: float) -> dict[str, float]:
    """eval_loss and the perplexity it means (capped at exp(50) so a diverged run still gives a number)."""
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}


@dataclass
class LoopPlan:
    """Fixed facts of the run the loop needs."""

    total_steps: int
    steps_per_epoch: int
    accumulation: int
    world_size: int
    log_every: int
    evaluate_each_epoch: bool
    checkpoint_every_steps: int | None
    checkpoint_every_minutes: float | None


def plan_steps(micro_batches_per_epoch: int, accumulation: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps); a trailing partial accumulation window of an epoch is dropped."""
    per_epoch = micro_batches_per_epoch // accumulation
    if per_epoch == 0:
        raise InvalidInputError(
            f"each process gets {micro_batches_per_epoch} batches per epoch, fewer than "
            f"gradientAccumulationSteps ({accumulation}): add data or lower batchSize / accumulation",
            where="spec.training.gradientAccumulationSteps",
        )
    return per_epoch, max_steps if max_steps is not None else epochs * per_epoch


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs on the device (`segment_ids` is bookkeeping, not an input)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "segment_ids"}


def _labelled(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding: from `segment_ids` (-1 = pad) or a 2-D mask when the batch has one."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def validate(engine: Any, source: BatchSource, device: torch.device) -> float | None:
    """Mean per-token loss over the held-out batches of every rank (None without an eval split)."""
    module = engine.module
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in source.eval_batches():
            loss_sum, n, _ = module(**_to_device(batch, device))
            total += float(loss_sum)
            count += n
    module.train()
    total, count = all_reduce_sum(total, device), all_reduce_sum(count, device)
    return total / count if count else None


def fit(
    engine: Any,
    source: BatchSource,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    guard: NonFiniteGuard,
    plan: LoopPlan,
    state: LoopState,
    metrics: MetricsLogger,
    device: torch.device,
    save_checkpoint: Callable[[LoopState], None],
    after_update: Callable[[int], None] | None = None,
    stop_after: int | None = None,
    extra_eval: Callable[[], dict[str, float]] | None = None,
) -> LoopState:
    """Run optimizer steps from `state.step` to the plan's total, checkpointing and evaluating on the way.

    `extra_eval` adds metrics to each epoch's evaluation (generation scores); `stop_after` ends the call
    after that many steps of this call (tests, and simulating preemption).
    """
    engine.module.train()
    last_save = time.monotonic()
    started, steps_here = time.perf_counter(), 0
    window_tokens, window_time = 0, time.perf_counter()
    epoch = state.step // plan.steps_per_epoch
    batches = source.micro_batches(epoch, (state.step % plan.steps_per_epoch) * plan.accumulation)
    while state.step < plan.total_steps:
        raw = [next(batches) for _ in range(plan.accumulation)]
        real = all_reduce_sum(sum(_real_tokens(b) for b in raw), device)
        micro = [_to_device(b, device) for b in raw]
        labelled = all_reduce_sum(sum(_labelled(b) for b in micro), device)
        token_scale = plan.world_size / labelled if labelled else 0.0
        loss_sum = reg = 0.0
        for index, batch in enumerate(micro):
            part, part_reg = engine.micro_step(batch, token_scale, 1.0 / plan.accumulation,
                                               last=index == plan.accumulation - 1)
            loss_sum += part
            reg += part_reg / plan.accumulation
        loss_sum = all_reduce_sum(loss_sum, device)
        loss = loss_sum / labelled if labelled else 0.0
        hook = (lambda: after_update(state.step + 1)) if after_update else None
        applied, grad_norm = engine.finish_step(math.isfinite(loss), hook)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        state.step += 1
        steps_here += 1
        state.tokens += int(labelled)
        window_tokens += int(real)
        guard.record(applied, state.step)
        state.last_loss = loss
        if applied and math.isfinite(loss):
            state.epoch_loss_sum += loss
            state.epoch_loss_steps += 1
        metrics.advance()
        if state.step % plan.log_every == 0 or state.step == plan.total_steps:
            now = time.perf_counter()
            metrics.log("train", state.step, {
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": window_tokens / (now - window_time),
                "skipped_steps": guard.skipped_total, "regularizer": reg, "epoch": state.step / plan.steps_per_epoch,
            })
            window_tokens, window_time = 0, now
        end_of_epoch = state.step % plan.steps_per_epoch == 0
        if end_of_epoch and state.step < plan.total_steps:
            epoch += 1
            batches = source.micro_batches(epoch, 0)
            state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
        # The last step is always evaluated: the export records the held-out figures of the weights it holds.
        if (end_of_epoch and plan.evaluate_each_epoch) or state.step == plan.total_steps:
            state.eval_loss = validate(engine, source, device)
            scores = {} if state.eval_loss is None else held_out_scores(state.eval_loss)
            scores.update(extra_eval() if extra_eval is not None else {})
            state.eval_metrics = scores
            if scores:
                metrics.log("eval", state.step, scores)
        if _checkpoint_due(plan, state.step, end_of_epoch, last_save, device):
            save_checkpoint(state)
            last_save = time.monotonic()
        if stop_after is not None and steps_here >= stop_after:
            break
    state_rate = steps_here / max(time.perf_counter() - started, 1e-9)
    metrics.log("summary", state.step, {"steps_per_s": state_rate, "skipped_steps": guard.skipped_total,
                                        **peak_memory(device)})
    return state


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory for the run's report: CUDA's max allocated bytes, else the peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_device": str(device)}
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "peak_memory_device": "cpu (peak RSS)"}


def _checkpoint_due(plan: LoopPlan, step: int, end_of_epoch: bool, last_save: float, device: torch.device) -> bool:
    """Every N steps, every N minutes (rank 0's clock decides for all), at epoch ends and at the end."""
    if step == plan.total_steps or end_of_epoch:
        return True
    if plan.checkpoint_every_steps and step % plan.checkpoint_every_steps == 0:
        return True
    if plan.checkpoint_every_minutes:
        due = float(time.monotonic() - last_save >= plan.checkpoint_every_minutes * 60)
        if torch.distributed.is_initialized():
            flag = torch.tensor([due if torch.distributed.get_rank() == 0 else 0.0], device=device)
            torch.distributed.all_reduce(flag)
            due = float(flag.item())
        return due > 0
    return False

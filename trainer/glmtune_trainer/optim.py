"""Optimizers and learning-rate schedules named in the spec, built from library implementations.

torch provides adam/adamw, bitsandbytes Lion, LAMB and 8-bit AdamW (all of which run on CPU too),
transformers Adafactor; nothing here re-implements an update rule. The warmup schedules are transformers'
formulas over torch's LambdaLR (see `build_scheduler` for why they are not imported).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from glmtune.errors import GlmtuneError
from glmtune_trainer.distributed import first_line, import_deepspeed

OPTIMIZERS = ("adamw", "adam", "lion", "lamb", "adafactor", "adamw8bit")
SCHEDULERS = ("linear", "cosine", "cosineWithRestarts", "constant")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so biases and norm weights (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(
    name: str,
    groups: Iterable[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer called `name` over parameter groups that carry their own weight decay."""
    groups = list(groups)
    # The fused kernels are several times faster than the per-tensor loop on CPU as on GPU.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if name == "adam":
        # torch's Adam folds weight decay into the gradient (L2), as the seed's "adam" did.
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    if name == "lion":
        return bnb.optim.Lion(groups, lr=lr, betas=betas)
    if name == "lamb":
        return bnb.optim.LAMB(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_offload_optimizer(
    name: str,
    groups: Iterable[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[torch.optim.Optimizer, bool]:
    """The optimizer for ZeRO-Offload, which steps the fp32 master weights in CPU memory.

    adam/adamw become DeepSpeed's vectorised CPU Adam (DeepSpeed refuses a torch Adam with offload);
    the others stay the spec's optimizer, run on CPU. Returns (optimizer, whether it is DeepSpeed's own):
    a client optimizer needs `zero_force_ds_cpu_optimizer: false` in the ZeRO config.
    """
    if name not in ("adam", "adamw"):
        return build_optimizer(name, groups, lr, betas, eps), False
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        return DeepSpeedCPUAdam(list(groups), lr=lr, betas=betas, eps=eps, adamw_mode=name == "adamw"), True
    except RuntimeError as exc:
        cause = exc.__cause__ or exc
        raise GlmtuneError(
            f"DeepSpeed could not build its CPU Adam op for offloadOptimizer ({type(cause).__name__}: "
            f"{first_line(cause)}). It compiles once, with a C++ compiler and ninja, into $TORCH_EXTENSIONS_DIR "
            "(default ~/.cache/torch_extensions), which must be writable: install them or point the variable "
            "at a writable folder, or set training.deepspeed.offloadOptimizer: false") from exc


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A warmup + decay schedule over `total_steps` optimizer steps, as transformers' `get_scheduler` makes it.

    The factors are written here because importing transformers.optimization imports peft, and peft
    imports bitsandbytes, which a run that uses neither should not load (nor print its CPU-kernel notice).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    factor = functools.partial(_lr_factor, name, warmup=warmup_steps, total=total_steps, cycles=num_cycles)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _lr_factor(name: str, step: int, *, warmup: int, total: int, cycles: int) -> float:
    """The learning-rate multiplier of schedule `name` at `step` (transformers' formulas, term for term)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if name == "constant":
        return 1.0
    progress = float(step - warmup) / float(max(1, total - warmup))
    if name == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # half a cosine wave
    if progress >= 1.0:  # cosineWithRestarts: `cycles` hard restarts, then zero
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))

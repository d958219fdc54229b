"""Optimizers and learning-rate schedules named in the spec, built from library implementations.

torch provides adam/adamw, bitsandbytes Lion, LAMB and 8-bit AdamW (all of which run on CPU too),
transformers Adafactor and the warmup schedules; nothing here re-implements an update rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

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


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A warmup + decay schedule over `total_steps` optimizer steps (transformers' implementations)."""
    from transformers import get_scheduler

    if name == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    if name == "cosineWithRestarts":
        return get_scheduler(
            "cosine_with_restarts", optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
            scheduler_specific_kwargs={"num_cycles": num_cycles},
        )
    if name in ("linear", "cosine"):
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")

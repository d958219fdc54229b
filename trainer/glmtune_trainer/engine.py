"""Execution engines: one object per way of running a step (single process / DDP, or DeepSpeed ZeRO).

Both implement the `Engine` protocol: the operations the loop needs (`micro_step`: forward + backward of
one micro-batch with its share of the step's loss; `finish_step`: clip, guard, optimizer update), and what
checkpoints and resume need (`trained_fp32_state`, `save`, `load`). Neither the loop nor `run` branches on
the engine's type, which keeps resume and the NaN guard identical. The DeepSpeed config builder lives
beside the DeepSpeed engine, the only code that reads it.
"""

from __future__ import annotations

import contextlib
import json
import math
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from glmtune.errors import GlmtuneError
from glmtune_trainer.distributed import first_line, import_deepspeed
from glmtune_trainer.loss import chunked_cross_entropy
from glmtune_trainer.methods import adalora_orth_loss, base_model

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed"


class Engine(Protocol):
    """One way of running training steps; what the loop, checkpoints and resume rely on."""

    # The optimizer whose param groups the learning-rate schedule drives.
    client_optimizer: torch.optim.Optimizer
    # True when the saved optimizer state is split per rank (ZeRO): resume needs the same world size.
    partitioned_state: bool

    @property
    def model(self) -> nn.Module: ...

    def micro_step(self, batch: dict[str, torch.Tensor], token_scale: float, reg_scale: float,
                   last: bool) -> tuple[float, float]: ...

    def finish_step(self, loss_ok: bool, after_update: Callable[[], None] | None = None) -> tuple[bool, float]: ...

    def zero_grad(self) -> None: ...

    def trained_fp32_state(self) -> dict[str, torch.Tensor]: ...

    def save(self, directory: Path, writer: bool) -> None: ...

    def load(self, directory: Path) -> None: ...


def _trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


class CausalLMLoss(nn.Module):
    """Wraps the model so DDP / DeepSpeed see one forward that returns (loss sum, labelled tokens, reg)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024, recompute: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.recompute = recompute

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        core = base_model(self.model)
        out = core.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)
        hidden = out[0]
        total, count = chunked_cross_entropy(hidden, labels, core.get_output_embeddings(), self.chunk_size,
                                             self.recompute)
        return total, count, adalora_orth_loss(self.model)


def _finite_everywhere(value: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: all ranks must take the same branch or collectives hang."""
    ok = torch.isfinite(value.detach().float()).all().to(torch.int32).reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


class PlainEngine:
    """Single process or torch DDP; mixed precision through autocast (+ a grad scaler for fp16)."""

    partitioned_state = False

    def __init__(self, loss_module: CausalLMLoss, optimizer: torch.optim.Optimizer, precision: str,
                 max_grad_norm: float, device: torch.device, distributed: bool) -> None:
        self.loss_module = loss_module
        self.optimizer = optimizer
        self.client_optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.module: nn.Module = loss_module
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)
        self._bad_loss = False

    @property
    def model(self) -> nn.Module:
        return self.loss_module.model

    def micro_step(self, batch: dict[str, torch.Tensor], token_scale: float, reg_scale: float,
                   last: bool) -> tuple[float, float]:
        """Forward and backward one micro-batch; returns its (loss sum, regularizer) for logging."""
        sync = contextlib.nullcontext() if last or not hasattr(self.module, "no_sync") else self.module.no_sync()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with sync:
            with autocast:
                total, _count, reg = self.module(**batch)
            loss = total * token_scale + (reg * reg_scale if reg is not None else 0.0)
            if not _finite_everywhere(loss):
                # Skip the backward: NaN gradients would poison DDP's all-reduce for every rank.
                self._bad_loss = True
                loss = loss.detach()
            else:
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        return float(total.detach()), float(reg.detach()) if reg is not None else 0.0

    def finish_step(self, loss_ok: bool, after_update: Callable[[], None] | None = None) -> tuple[bool, float]:
        """Clip and apply the update unless loss or gradients are non-finite; returns (applied, grad norm).

        `after_update()` runs while the gradients still exist (AdaLoRA's rank allocation).
        """
        bad = self._bad_loss or not loss_ok
        self._bad_loss = False
        params = [p for p in self.loss_module.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else math.inf)
        norm = float(norm)
        applied = not bad and math.isfinite(norm)
        if applied:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if applied and after_update is not None:
            after_update()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def trained_fp32_state(self) -> dict[str, torch.Tensor]:
        """Name → fp32 CPU tensor for every trained parameter."""
        return {name: param.detach().float().cpu() for name, param in _trained(self.model)}

    def save(self, directory: Path, writer: bool) -> None:
        """Optimizer (and scaler) state; identical on every DDP rank, so each work dir's writer writes it."""
        if writer:
            state = {"optimizer": self.optimizer.state_dict()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        """The trained weights the checkpoint holds (run's `save` wrote them), then the optimizer state."""
        from glmtune_trainer import checkpoint as ckpt

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in ckpt.load_weights(directory / ckpt.WEIGHTS_FILE).items():
                params[name].copy_(value)
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def deepspeed_startup_error(config: dict, exc: BaseException) -> GlmtuneError:
    """One message for a failed `deepspeed.initialize`: what failed, with which settings, and what to change."""
    zero = config.get("zero_optimization", {})
    offload = [name for name in ("offload_optimizer", "offload_param") if name in zero]
    return GlmtuneError(
        f"DeepSpeed ZeRO-{zero.get('stage')} failed to start{' with ' + ' and '.join(offload) if offload else ''}: "
        f"{type(exc).__name__}: {first_line(exc)}. Check spec.training.deepspeed (stage, offloadOptimizer, offloadParams) "
        "and training.precision; run with --debug for DeepSpeed's traceback")


def deepspeed_config(
    stage: int,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    precision: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict:
    """The shipped ZeRO config for `stage`, completed with the run's batch sizes, clipping and precision."""
    config = json.loads((DEEPSPEED_CONFIG_DIR / f"zero{stage}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * world_size
    config["gradient_clipping"] = max_grad_norm
    config["fp16"] = {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    config["bf16"] = {"enabled": precision == "bf16"}
    zero = config["zero_optimization"]
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return config


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3: it owns precision, gradient partitioning and the optimizer's master weights."""

    partitioned_state = True

    def __init__(self, loss_module: CausalLMLoss, optimizer: torch.optim.Optimizer, config: dict) -> None:
        deepspeed = import_deepspeed()
        # DeepSpeed 0.19 calls collectives torch 2.13 deprecated; those FutureWarnings are for its authors.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                "is deprecated", category=FutureWarning)

        self.loss_module = loss_module
        # The schedule drives this optimizer's param groups, which ZeRO's wrapper shares.
        self.client_optimizer = optimizer
        self._skip = False
        original_step = optimizer.step

        def guarded_step(_optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            # The guard decided before DeepSpeed's step: a window with a non-finite loss updates nothing.
            return None if self._skip else original_step(*args, **kwargs)

        optimizer.step = types.MethodType(guarded_step, optimizer)
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=loss_module, optimizer=optimizer, config=config,
                model_parameters=[p for p in loss_module.parameters() if p.requires_grad],
            )
        except Exception as exc:  # noqa: BLE001 - whatever DeepSpeed raises, the user gets one explanation
            raise deepspeed_startup_error(config, exc) from exc
        self.gas = config["gradient_accumulation_steps"]
        self.module = self.engine

    @property
    def model(self) -> nn.Module:
        return self.loss_module.model

    def micro_step(self, batch: dict[str, torch.Tensor], token_scale: float, reg_scale: float,
                   last: bool) -> tuple[float, float]:
        total, _count, reg = self.engine(**batch)
        loss = total * token_scale + (reg * reg_scale if reg is not None else 0.0)
        if not _finite_everywhere(loss):
            self._skip = True
        # DeepSpeed divides by the accumulation steps itself; our scales already average.
        self.engine.backward(loss * self.gas)
        self.engine.step()
        return float(total.detach()), float(reg.detach()) if reg is not None else 0.0

    def finish_step(self, loss_ok: bool, after_update: Callable[[], None] | None = None) -> tuple[bool, float]:
        """DeepSpeed already stepped at the window's last micro-batch; report what happened."""
        skipped = self._skip or not loss_ok
        self._skip = False
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return self.engine.was_step_applied() and not skipped, norm

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def trained_fp32_state(self) -> dict[str, torch.Tensor]:
        """Name → fp32 CPU tensor for every trained parameter, gathered from DeepSpeed's master copy (inside
        its optimizer; sharded under ZeRO-3): every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in _trained(self.model):
            full = safe_get_full_fp32_param(param)
            state[name] = (full if full is not None else param).detach().float().cpu().clone()
        return state

    def save(self, directory: Path, writer: bool) -> None:
        """Every rank writes its ZeRO partition (frozen base weights are rebuilt from the base model)."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        """Weights and optimizer state from this rank's ZeRO partition."""
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_module_strict=False)

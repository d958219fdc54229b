"""Tuning methods: which parameters train and how adapters are attached (peft wherever peft has it).

`lora` / `adalora` wrap the model with peft; `ptv2` is ChatGLM's own prefix encoder (switched on at
load time through the config's `pre_seq_len`, so exports stay loadable by the original code); `freeze`
and `full` only flip `requires_grad`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.export_loading import register_quantized_linear
from glmtune.modeling.hf_compat import peft_reads_deprecated_checkpointing
from glmtune.spec.rules import rule

_LAYER_INDEX = re.compile(r"\blayers\.(\d+)\.")
PREFIX_KEY = "transformer.prefix_encoder."


def load_overrides(method: Any) -> dict[str, Any]:
    """Config overrides the base model must be loaded with for `method` (ptv2 adds the prefix encoder)."""
    if method.name != "ptv2":
        return {}
    ptv2 = method.ptv2
    return {"pre_seq_len": ptv2.pre_seq_len, "prefix_projection": ptv2.prefix_projection}


def base_model(model: nn.Module) -> nn.Module:
    """The underlying ChatGLM model of a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_method(model: nn.Module, method: Any, total_steps: int) -> nn.Module:
    """Set up `model` for `method`; returns the model to train (a peft wrapper for lora/adalora)."""
    name = method.name
    if name == "lora":
        return _lora(model, method.lora)
    if name == "adalora":
        return _adalora(model, method.adalora, total_steps)
    if name == "ptv2":
        if getattr(model.config, "pre_seq_len", None) is None:
            raise InvalidInputError("the model was loaded without a prefix encoder", where="spec.method.ptv2")
        for pname, param in model.named_parameters():
            param.requires_grad = pname.startswith(PREFIX_KEY)
        return model
    if name == "freeze":
        _freeze_layers(model, method.freeze)
        return model
    for param in model.parameters():
        param.requires_grad = True
    return model


def _lora(model: nn.Module, lora: Any) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) or None, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
    )
    register_quantized_linear(config)
    return _wrap(model, config, get_peft_model, "spec.method.lora.targetModules")


def _adalora(model: nn.Module, ada: Any, total_steps: int) -> nn.Module:
    from peft import AdaLoraConfig, TaskType, get_peft_model

    total = ada.total_step or total_steps
    if ada.tinit + ada.tfinal >= total:
        # The spec checks this rule when the total is written down; only the trainer knows a planned one.
        schedule = rule("adalora-schedule")
        raise InvalidInputError(f"{schedule.message} (here {ada.tinit} + {ada.tfinal} >= {total} steps)",
                                where=schedule.path)
    config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM, target_r=ada.target_r, init_r=ada.init_r, tinit=ada.tinit,
        tfinal=ada.tfinal, deltaT=ada.delta_t, beta1=ada.beta1, beta2=ada.beta2,
        orth_reg_weight=ada.orth_reg_weight, total_step=total, lora_alpha=ada.alpha,
        lora_dropout=ada.dropout, target_modules=list(ada.target_modules),
    )
    return _wrap(model, config, get_peft_model, "spec.method.adalora.targetModules")


def _wrap(model: nn.Module, config: Any, get_peft_model: Any, where: str) -> nn.Module:
    try:
        with peft_reads_deprecated_checkpointing():
            return get_peft_model(model, config)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise InvalidInputError(str(exc).splitlines()[0], where=where) from None
        raise


def layer_count(model: nn.Module) -> int:
    """Number of transformer blocks (from parameter names, the same for v1 and v2)."""
    indices = {int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_INDEX.search(n))}
    return max(indices) + 1 if indices else 0


def _freeze_layers(model: nn.Module, freeze: Any) -> None:
    layers = layer_count(model)
    if freeze.freeze_first_layers is not None:
        first_trained, where = freeze.freeze_first_layers, "spec.method.freeze.freezeFirstLayers"
    else:
        first_trained, where = layers - freeze.train_last_layers, "spec.method.freeze.trainLastLayers"
    if not 0 <= first_trained < layers:
        raise InvalidInputError(f"the model has {layers} layers; at least one must stay trainable", where=where)
    # Blocks before `first_trained` and everything that feeds them (the embedding) freeze; the head trains.
    for name, param in model.named_parameters():
        match = _LAYER_INDEX.search(name)
        if match:
            param.requires_grad = int(match.group(1)) >= first_trained
        else:
            param.requires_grad = "word_embeddings" not in name


def adalora_orth_loss(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality regularizer (peft adds it only inside its own forward, which we bypass)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or getattr(config, "peft_type", None) is None or config.peft_type.value != "ADALORA":
        return None
    terms = []
    for name, param in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ".default" in name:
            cov = param @ param.T if "lora_A" in name else param.T @ param
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    if not terms:
        return None
    return config.orth_reg_weight * torch.stack(terms).mean()


def adalora_update(model: nn.Module, step: int) -> None:
    """Reallocate AdaLoRA ranks after an optimizer step (needs the step's gradients still in place)."""
    inner = getattr(model, "base_model", None)
    if inner is not None and hasattr(inner, "update_and_allocate"):
        inner.update_and_allocate(step)


def adalora_state(model: nn.Module) -> dict[str, Any] | None:
    """AdaLoRA's allocator statistics and rank pattern, so a resumed run reallocates identically."""
    inner = getattr(model, "base_model", None)
    allocator = getattr(inner, "rankallocator", None)
    if allocator is None:
        return None
    return {
        "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": model.peft_config["default"].rank_pattern,
    }


def load_adalora_state(model: nn.Module, state: dict[str, Any] | None) -> None:
    """Restore what `adalora_state` saved."""
    if not state:
        return
    allocator = model.base_model.rankallocator
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    model.peft_config["default"].rank_pattern = state["rank_pattern"]

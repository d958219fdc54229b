"""Merge-export of a LoRA checkpoint that streams the base one tensor at a time (ChatGLM-6B: 12.5 GB in fp16).

`export.write_export`'s in-memory path loads the whole base, wraps it in peft and calls `merge_and_unload`,
so its peak is the whole model plus peft's copies. Here the base files are read tensor by tensor (the
loader's own reader and conversion), a targeted weight gets `B @ A * scaling` added exactly as peft's
`LoraLayer.merge` computes it (adapter weights in float32 as peft's autocast keeps them, the sum rounded to
the base dtype once), optionally quantized as `model.quantize(bits)` would, and the tensors go into
safetensors shards of at most `max_shard_size` as they come: the process holds about one output shard.
Key names, shard layout and config.json are those of `save_pretrained`, so the two paths give the same files
up to how keys are grouped into shards. What it cannot stream (AdaLoRA, DoRA, LoRA on embeddings) it
names in `streaming_unsupported`, and the caller keeps the in-memory path for those.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmtune.errors import InvalidInputError

_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")
_SAVED_MODULE = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<leaf>[^.]+)$")
_UNSUPPORTED_PART = re.compile(r"lora_(embedding_[AB]|magnitude_vector|E)\b|\.ranknum\b")


@dataclass
class MergePlan:
    """What the trained weights change in the base: LoRA pairs per base weight key, and replaced tensors."""

    scaling: float
    pairs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # base weight key -> {"A", "B"}
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # base key -> trained value


def streaming_unsupported(run: dict[str, Any]) -> str | None:
    """Why the run's merge cannot be streamed (None when it can): only plain LoRA on Linear layers is."""
    from glmtune.spec import MethodSpec

    method = MethodSpec.model_validate(run["method"])
    if method.name != "lora":
        return f"method {method.name!r} (only plain LoRA streams)"
    if method.lora.use_dora:
        return "DoRA adapters"
    return None


def _base_key(peft_key: str) -> str:
    """The base checkpoint's name of a peft-wrapped parameter (peft's prefix and `.base_layer` removed)."""
    return peft_key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def merge_plan(trained: dict[str, torch.Tensor], lora: Any, where: str) -> MergePlan:
    """Sort a LoRA checkpoint's trained tensors into pairs to merge and base tensors they replace."""
    scaling = lora.alpha / math.sqrt(lora.r) if lora.use_rslora else lora.alpha / lora.r
    plan = MergePlan(scaling=scaling)
    for key, tensor in trained.items():
        if _UNSUPPORTED_PART.search(key):
            raise InvalidInputError(f"{key}: this kind of adapter weight cannot be merged while streaming", where=where)
        if match := _LORA.match(key):
            plan.pairs.setdefault(_base_key(match["module"]) + ".weight", {})[match["part"]] = tensor
        elif match := _SAVED_MODULE.match(key):
            plan.replaced[_base_key(match["module"]) + "." + match["leaf"]] = tensor
        else:  # a base parameter that trained itself (LoRA `bias: all` / `lora_only`)
            plan.replaced[_base_key(key)] = tensor
    broken = sorted(k for k, pair in plan.pairs.items() if set(pair) != {"A", "B"})
    if broken:
        raise InvalidInputError(f"LoRA weights without their A/B partner: {', '.join(broken[:5])}", where=where)
    return plan


def lora_delta(pair: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """peft's `get_delta_weight` for a Linear (fan_in_fan_out False) with float32 adapter weights."""
    return (pair["B"].float() @ pair["A"].float()) * scaling


def write_merged(checkpoint_dir: str | Path, out: str | Path, run: dict[str, Any] | None = None,
                 bits: int | None = None, max_shard_size: int | str = "2GB") -> list[str]:
    """Write the LoRA checkpoint merged into its float base to `out` (weights + config.json, like
    `save_pretrained` of the merged model), streaming the base; returns the weight file names."""
    from glmtune.modeling.checkpoint import (
        CONFIG_NAME,
        check_v1_vocabulary,
        family_of_config,
        model_classes,
        parameters_on_meta,
        parse_size,
        read_config_dict,
        resolve_dtype,
    )
    from glmtune.modeling.checkpoint_config import original_config
    from glmtune.modeling.checkpoint_save import ShardWriter, staging_folder, write_config
    from glmtune.modeling.quantization import _check_bits
    from glmtune.spec import MethodSpec
    from glmtune_trainer.checkpoint import WEIGHTS_FILE, load_weights
    from glmtune_trainer.export import read_run

    checkpoint_dir = Path(checkpoint_dir)
    run = run or read_run(checkpoint_dir)
    reason = streaming_unsupported(run)
    if reason:
        raise InvalidInputError(f"cannot stream the merge of {reason}", where=str(checkpoint_dir))
    if bits:
        _check_bits(bits)
    base = Path(run["base_model"])
    raw = read_config_dict(base)
    where = str(base / CONFIG_NAME)
    family = family_of_config(raw, where=where)
    if family == "v1":
        check_v1_vocabulary(raw, where)
    if int(raw.get("quantization_bit") or 0):
        raise InvalidInputError("the base checkpoint is stored quantized, so weights cannot be merged into it: "
                                "export the adapter instead (--adapter-only)", where=str(base))
    dtype = resolve_dtype(run["dtype"], raw.get("torch_dtype") or raw.get("dtype"))
    config_class, model_class = model_classes(family)
    config = config_class.from_dict({**raw, **({"quantization_bit": bits} if bits else {})})
    with parameters_on_meta():
        skeleton = model_class(config)  # names, shapes, tied groups and buffers; no weight memory
    plan = merge_plan(load_weights(checkpoint_dir / WEIGHTS_FILE), MethodSpec.model_validate(run["method"]).lora,
                      str(checkpoint_dir / WEIGHTS_FILE))
    with staging_folder(out) as staging:
        writer = ShardWriter(staging, parse_size(max_shard_size))
        _stream(base, skeleton, family, dtype, plan, writer)
        names = writer.finish()
        write_config(staging, original_config(skeleton, family, dtype))
    return names


def _stream(base: Path, skeleton: torch.nn.Module, family: str, dtype: torch.dtype, plan: MergePlan,
            writer: Any) -> None:
    """Every tensor of the merged model into `writer`, in the base files' order, one at a time."""
    from glmtune.modeling.checkpoint import IGNORED_KEY, converted_tensor, inv_freq_buffers, tied_groups
    from glmtune.modeling.checkpoint_io import iter_tensors, weight_files
    from glmtune.modeling.quantization import QuantizedLinear

    state = skeleton.state_dict(keep_vars=True)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    quantized = {f"{name}.weight": module.bits for name, module in skeleton.named_modules()
                 if isinstance(module, QuantizedLinear)}
    for name, module in skeleton.named_modules():
        if isinstance(module, QuantizedLinear):  # the merged float weight arrives here, as for a float Linear
            expected[f"{name}.weight"] = ((module.out_features, module.in_features), torch.float32)
    tied = tied_groups(skeleton)
    unknown = sorted(set(plan.pairs) - set(expected) | set(plan.replaced) - set(expected))
    if unknown:
        raise InvalidInputError(f"trained weights for keys the base does not have: {', '.join(unknown[:5])}",
                                where=str(base))
    done: set[str] = set()
    files = weight_files(base)
    for key, stored, path in iter_tensors(files, release=lambda _path: True, copied=lambda _key: True):
        if IGNORED_KEY.search(key):
            continue
        if key not in expected:
            raise InvalidInputError(f"unexpected key {key} (not part of this {family} model)", where=str(path))
        names = tied.get(key, [key])
        if key != names[0]:
            continue  # a stored copy of a tied weight (v1 lm_head): the first name's value is written for it
        tensor = converted_tensor(key, stored, expected[key], dtype, torch.device("cpu"), family, path)
        if tensor.data_ptr() == stored.data_ptr():
            tensor = tensor.clone()  # never keep a view of the memory-mapped file (its pages would stay)
        del stored
        # tied names (v1 lm_head) share the value, each as its own copy (safetensors refuses shared storage);
        # a trained replacement of one of them unties it, as peft's merge does
        values = [tensor if i == 0 else tensor.clone() for i in range(len(names))]
        for name, value in zip(names, values, strict=True):
            value = _replacement(plan, name, expected, dtype, path) if name in plan.replaced else value
            if name in plan.pairs:
                value.add_(lora_delta(plan.pairs[name], plan.scaling))  # in place, as peft's merge: one rounding
            _emit(writer, name, value, quantized)
            done.add(name)
        del tensor, values
    for key, tensor in state.items():  # buffers the model itself holds and saves (v1's rotary inv_freq)
        if key not in done and not tensor.is_meta:
            writer.add(key, tensor.detach().clone())
            done.add(key)
    for key, tensor in inv_freq_buffers(family, skeleton.config, dtype).items():
        if key not in done:
            writer.add(key, tensor)
            done.add(key)
    params = set(dict(skeleton.named_parameters(remove_duplicate=False)))
    missing = sorted(k for k in params if k not in done and k.removesuffix("_scale") not in quantized)
    if missing:
        raise InvalidInputError(f"missing keys (the base checkpoint does not hold them): {', '.join(missing[:5])}",
                                where=str(base))


def _replacement(plan: MergePlan, key: str, expected: dict[str, Any], dtype: torch.dtype, path: Path) -> torch.Tensor:
    """A trained tensor that replaces the base's (a `modules_to_save` copy, a trained bias), in the output dtype."""
    value, (shape, want) = plan.replaced[key], expected[key]
    if tuple(value.shape) != shape:
        raise InvalidInputError(f"trained {key} has shape {list(value.shape)}, the base {list(shape)}", where=str(path))
    return value.to(dtype if want == torch.float32 else want).clone()


def _emit(writer: Any, name: str, tensor: torch.Tensor, quantized: dict[str, int]) -> None:
    """One output tensor; a weight of a layer `model.quantize` replaces goes in as its int weight and scale."""
    from glmtune.modeling.quantization import quantize_weight

    if name in quantized:
        qweight, scale = quantize_weight(tensor, quantized[name])
        writer.add(name, qweight)
        writer.add(name + "_scale", scale)
        return
    writer.add(name, tensor)

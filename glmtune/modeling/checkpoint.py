"""Checkpoint loading for both ChatGLM families, in THUDM's published layout (original key names and config keys).

Loading builds the model with its parameters on the meta device and then assigns the stored tensors one at
a time (converted to the requested dtype), so the weights are never held twice; asked to quantize a float
checkpoint, it builds the empty int layers first and quantizes each float weight as it is read (shard
reading and page-cache hints live in `checkpoint_io`). Config handling lives in `checkpoint_config`, saving
(sharded safetensors plus `model.safetensors.index.json` and an original-style `config.json`, atomically) in
`checkpoint_save`; their public names are importable from here as before.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.modeling.checkpoint_config import (
    CONFIG_NAME,
    OLD_V1_VOCAB,
    _old_vocab_error,
    check_v1_vocabulary,
    family_of_config,
    inv_freq_buffers,
    model_classes,
    original_config,
    read_config_dict,
    resolve_dtype,
)
from glmtune.modeling.checkpoint_io import iter_tensors, weight_files
from glmtune.modeling.checkpoint_save import ShardWriter, parse_size, save_pretrained
from glmtune.modeling.quantization import QuantizedLinear, quantize_weight

__all__ = ["CONFIG_NAME", "OLD_V1_VOCAB", "ShardWriter", "check_v1_vocabulary", "converted_tensor", "family_of_config",
           "inv_freq_buffers", "load_checkpoint", "load_model", "load_state_into", "local_model_dir", "model_classes",
           "original_config", "parameters_on_meta", "parse_size", "read_config_dict", "resolve_dtype",
           "save_pretrained", "tied_groups"]

# Buffers the original code stores but never reads back: accepted in checkpoints and skipped.
IGNORED_KEY = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers stay real: they are small and may not be stored)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> all names of the same Parameter (tied weights such as v1's lm_head), first first."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _assign(model: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    """Put `tensor` under every name in `names` (one shared Parameter for tied names; a buffer otherwise)."""
    module_path, _, leaf = names[0].rpartition(".")
    module = model.get_submodule(module_path)
    if leaf not in module._parameters:
        module._buffers[leaf] = tensor
        return
    old = module._parameters[leaf]
    value = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    for name in names:
        module_path, _, leaf = name.rpartition(".")
        model.get_submodule(module_path)._parameters[leaf] = value


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state_into(model: nn.Module, files: list[Path], dtype: torch.dtype, device: torch.device,
                    family: str, fresh_prefixes: tuple[str, ...] = (), copy_all: bool = False) -> None:
    """Stream the stored tensors into a model whose parameters are on meta; strict about keys and shapes.

    Parameters under `fresh_prefixes` (a p-tuning prefix added on top of a base checkpoint) may be absent
    from the files: they are initialised from scratch instead. A float weight that arrives for a
    QuantizedLinear is quantized on arrival, so a float checkpoint never exists whole in float. `copy_all`
    copies even the tensors that need no conversion, so each file's mapping (and its pages) goes once read.
    """
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    quantized = {f"{name}.weight": module for name, module in model.named_modules()
                 if isinstance(module, QuantizedLinear)}
    tied = tied_groups(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    copied: dict[Path, bool] = {}  # per file: every tensor became a copy, so its cached pages can go
    copied_keys: set[str] = set()  # the tensors only a copy of which was kept: their mapped pages can go now
    for key, tensor, path in iter_tensors(files, release=lambda done: copied.get(done, False),
                                          copied=copied_keys.__contains__):
        if IGNORED_KEY.search(key):
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        source = tensor
        if key in quantized and tensor.is_floating_point():
            _quantize_into(quantized[key], key, tensor, dtype, device, path)
            loaded.update((key, key + "_scale"))
            copied[path] = copied.get(path, True)
            copied_keys.add(key)
            continue
        tensor = converted_tensor(key, tensor, expected[key], dtype, device, family, path)
        if copy_all and tensor.data_ptr() == source.data_ptr():
            tensor = tensor.clone()  # a kept view would pin the whole memory-mapped file in this process
        if tensor.data_ptr() != source.data_ptr():
            copied_keys.add(key)
        else:
            copied[path] = False
        copied[path] = copied.get(path, True)
        del source
        names = tied.get(key, [key])
        if key != names[0] and names[0] in loaded:
            continue  # a tied copy (v1 lm_head next to the embedding): the original keeps the embedding's values
        _assign(model, names, tensor)
        loaded.add(key)
    if unexpected:
        raise InvalidInputError(f"unexpected keys (not part of this {family} model): {_format_keys(unexpected)}",
                                where=str(files[0].parent))
    _init_fresh(model, fresh_prefixes, dtype, device)
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and not IGNORED_KEY.search(k)]
    if missing:
        raise InvalidInputError(f"missing keys (the checkpoint does not hold them): {_format_keys(missing)}",
                                where=str(files[0].parent))


def converted_tensor(key: str, tensor: torch.Tensor, want: tuple[tuple[int, ...], torch.dtype], dtype: torch.dtype,
               device: torch.device, family: str, path: Path) -> torch.Tensor:
    """The stored tensor checked against the model's shape and dtype and moved to `device` / `dtype`."""
    shape, want_dtype = want
    if tuple(tensor.shape) != shape:
        if family == "v1" and tensor.dim() == 2 and tensor.shape[0] == OLD_V1_VOCAB:
            raise _old_vocab_error(str(path))
        raise InvalidInputError(f"shape mismatch for {key}: the model expects {list(shape)}, the checkpoint "
                                f"has {list(tensor.shape)}", where=str(path))
    if tensor.is_floating_point() and want_dtype.is_floating_point:
        # Parameters are built in float32 and take the requested dtype; others (fp16 int-weight scales) keep theirs.
        return tensor.to(device=device, dtype=dtype if want_dtype == torch.float32 else want_dtype)
    if tensor.dtype == want_dtype:
        return tensor.to(device=device)
    raise InvalidInputError(f"dtype mismatch for {key}: the model expects {want_dtype}, the checkpoint has "
                            f"{tensor.dtype}", where=str(path))


def _quantize_into(layer: QuantizedLinear, key: str, weight: torch.Tensor, dtype: torch.dtype,
                   device: torch.device, path: Path) -> None:
    """Quantize one float weight into `layer` as `model.quantize()` would after a float load (same dtype, device)."""
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise InvalidInputError(f"shape mismatch for {key}: the model expects {[layer.out_features, layer.in_features]}"
                                f", the checkpoint has {list(weight.shape)}", where=str(path))
    # converted block by block inside quantize_weight: a whole converted copy would be one more weight in RAM
    qweight, scale = quantize_weight(weight.to(device=device), layer.bits, dtype=dtype)
    layer._parameters["weight"] = nn.Parameter(qweight, requires_grad=False)
    layer._parameters["weight_scale"] = nn.Parameter(scale, requires_grad=False)


def _init_fresh(model: nn.Module, prefixes: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> None:
    for prefix in prefixes:
        module = model.get_submodule(prefix)
        if any(p.is_meta for p in module.parameters()):
            module.to_empty(device=device)
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            module.to(dtype)


def local_model_dir(path_or_uri: str | os.PathLike[str]) -> Path:
    """A local directory for a path or an `s3://` URI (downloaded once into glmtune's cache)."""
    from glmtune import storage

    directory = storage.fetch(path_or_uri)
    if not directory.is_dir():
        raise InvalidInputError("a model location must be a directory (config.json + weights)",
                                where=str(path_or_uri))
    return directory


def load_model(path_or_uri: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", quantization_bit: int | None = None,
               config_overrides: Mapping[str, Any] | None = None, merge_adapter: bool = False,
               allow_base_mismatch: bool = False) -> nn.Module:
    """Load a ChatGLM checkpoint (either family, as published by THUDM) or any glmtune export, local or s3://.

    A `prefix` export comes back as its base with the trained prefix encoder; an `adapter` export as its base
    with the peft adapter (a plain model with `merge_adapter`). `dtype` None keeps the checkpoint's.
    `quantization_bit` 8/4 quantizes while loading (each float weight as it is read, the same bits as
    quantizing afterwards); None keeps what is stored (and, for adapter/prefix
    exports, the base precision they were trained over); 0 insists on full precision. `device` is auto
    (CUDA when usable, else CPU), cpu, cuda or cuda:N; dtype "auto" is fp32 on CPU, bf16 (else fp16) on a
    GPU. `config_overrides` changes config keys first, e.g. {"pre_seq_len": 16} adds a fresh p-tuning v2
    prefix encoder to a base. An adapter/prefix export is refused over a base whose fingerprint differs from the
    one it was trained over, unless `allow_base_mismatch`.
    """
    from glmtune.export_format import EXPORT_FILE, KINDS_WITH_BASE, read_export_info

    directory = local_model_dir(path_or_uri)
    info = read_export_info(directory) if (directory / EXPORT_FILE).is_file() else None
    if info is not None and info.kind in KINDS_WITH_BASE:
        if config_overrides:
            raise InvalidInputError(f"config_overrides do not apply to a {info.kind!r} export (it brings its own "
                                    "configuration): load its base instead", where=str(path_or_uri))
        from glmtune.export_loading import load_export

        return load_export(directory, dtype=dtype, device=device, quantization_bit=quantization_bit,
                           merge_adapter=merge_adapter, allow_base_mismatch=allow_base_mismatch)
    model = load_checkpoint(directory, dtype, device, quantization_bit, config_overrides)
    model.config._name_or_path = str(path_or_uri)
    return model


def load_checkpoint(path_or_uri: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", quantization_bit: int | None = None,
                    config_overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Load one checkpoint directory (config.json + weights); see `load_model` for the arguments."""
    from glmtune.export_loading import resolve_device, resolve_load_dtype

    device = resolve_device(device)
    dtype = resolve_load_dtype(dtype, device)
    directory = local_model_dir(path_or_uri)
    raw = read_config_dict(directory)
    where = str(directory / CONFIG_NAME)
    from glmtune.modeling.glm4 import HF_MODEL_TYPES

    if raw.get("model_type") in HF_MODEL_TYPES:
        # GLM-4's -hf layout (transformers' GlmForCausalLM): converted in memory to the remote-code model
        if config_overrides:
            raise InvalidInputError("config_overrides need the remote-code layout: convert the -hf checkpoint with "
                                    "glmtune.modeling.glm4_checkpoint.convert_to_remote first", where=where)
        from glmtune.export_loading import load_hf_glm4

        model = load_hf_glm4(directory, dtype, device, quantization_bit)
        model.config._name_or_path = str(path_or_uri)
        return model
    family = family_of_config(raw, where=where)
    if family == "v1":
        check_v1_vocabulary(raw, where)
    stored_bits = int(raw.get("quantization_bit") or 0)
    if quantization_bit not in (None, 0, 4, 8):
        raise InvalidInputError(f"quantization_bit must be 4 or 8 (0: full precision), not {quantization_bit!r}",
                                where="quantization_bit")
    if stored_bits and quantization_bit is not None and quantization_bit != stored_bits:
        wanted = "in full precision" if quantization_bit == 0 else f"as {quantization_bit} bits"
        raise InvalidInputError(f"the checkpoint is stored quantized to {stored_bits} bits; cannot load it {wanted}",
                                where=where)
    overrides = dict(config_overrides or {})
    fresh = ("transformer.prefix_encoder",) if overrides.get("pre_seq_len") and not raw.get("pre_seq_len") else ()
    config_class, model_class = model_classes(family)
    torch_dtype = resolve_dtype(dtype, raw.get("torch_dtype") or raw.get("dtype"))
    if quantization_bit and not stored_bits:
        # quantize at load: empty int layers receive each float weight quantized as it arrives
        overrides["quantization_bit"] = quantization_bit
    config = config_class.from_dict({**raw, **overrides})
    files = weight_files(directory)
    with parameters_on_meta():
        model = model_class(config)  # a quantized config builds empty int layers for the (to be) int weights
    load_state_into(model, files, torch_dtype, device, family, fresh,
                    copy_all=bool(quantization_bit and not stored_bits))
    model.to(device)
    model.config.dtype = torch_dtype
    model.config._name_or_path = str(path_or_uri)
    return model.eval()

"""Checkpoint I/O for both ChatGLM families, in THUDM's published layout (original key names and config keys).

Loading builds the model with its parameters on the meta device and then assigns the stored tensors one at
a time (converted to the requested dtype), so the weights are never held twice; asked to quantize a float
checkpoint, it builds the empty int layers first and quantizes each float weight as it is read (shard
reading and page-cache hints live in `checkpoint_io`). Saving writes sharded
safetensors plus `model.safetensors.index.json` and an original-style `config.json`, atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.modeling.checkpoint_io import BIN_INDEX, SAFE_INDEX, iter_tensors, weight_files
from glmtune.modeling.quantization import QuantizedLinear, quantize_weight
from glmtune.storage import read_json_object

CONFIG_NAME = "config.json"
OLD_V1_VOCAB = 150528
# Buffers the original code stores but never reads back: accepted in checkpoints and skipped.
_IGNORED_KEY = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")
_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)$")
_V1_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "layernorm_epsilon", "use_cache",
            "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id",
            "max_sequence_length", "inner_hidden_size", "position_encoding_2d", "quantization_bit",
            "pre_seq_len", "prefix_projection")
_V2_KEYS = ("num_layers", "padded_vocab_size", "vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
            "num_attention_heads", "seq_length", "hidden_dropout", "classifier_dropout", "attention_dropout",
            "layernorm_epsilon", "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm",
            "add_bias_linear", "add_qkv_bias", "bias_dropout_fusion", "multi_query_attention",
            "multi_query_group_num", "apply_query_key_layer_scaling", "attention_softmax_in_fp32",
            "fp32_residual_connection", "quantization_bit", "pre_seq_len", "prefix_projection", "original_rope",
            "eos_token_id", "pad_token_id", "use_cache", "tie_word_embeddings")
_AUTO_MAP = {
    "v1": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
           "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
           "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "v2": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
           "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
           "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
           "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def family_of_config(config: Mapping[str, Any] | Any, where: str | None = None) -> str:
    """"v1" (ChatGLM-6B) or "v2" (ChatGLM2/3 architecture) from the keys of a config.json dict or config object."""
    keys = set(config) if isinstance(config, Mapping) else set(vars(config))
    if keys & {"position_encoding_2d", "inner_hidden_size", "max_sequence_length"}:
        return "v1"
    if keys & {"padded_vocab_size", "multi_query_attention", "kv_channels", "ffn_hidden_size"}:
        return "v2"
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    raise InvalidInputError(
        f"unknown architecture (model_type {model_type!r}): expected a ChatGLM-6B config (position_encoding_2d, "
        "inner_hidden_size) or a ChatGLM2/3 config (padded_vocab_size, multi_query_attention)", where=where)


def model_classes(family: str) -> tuple[type, type]:
    """(config class, model class) of a family; "v3" shares the v2 architecture."""
    if family == "v1":
        from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration

        return ChatGLMConfig, ChatGLMForConditionalGeneration
    if family in ("v2", "v3"):
        from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

        return ChatGLM2Config, ChatGLM2ForConditionalGeneration
    raise InvalidInputError(f"unknown model family {family!r} (v1, v2 or v3)")


def resolve_dtype(dtype: str | torch.dtype | None, default: Any = None) -> torch.dtype:
    """A torch dtype from a name ("float16", "bf16", ...) or dtype; None falls back to `default`, then float32."""
    for candidate in (dtype, default):
        if candidate is None:
            continue
        if isinstance(candidate, torch.dtype):
            return candidate
        name = str(candidate).removeprefix("torch.")
        if name not in _DTYPES:
            raise InvalidInputError(f"unsupported dtype {candidate!r} (float32, float16 or bfloat16)", where="dtype")
        return _DTYPES[name]
    return torch.float32


def read_config_dict(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory, with clear errors for a missing or broken file."""
    return read_json_object(directory / CONFIG_NAME,
                            "no config.json: not a model directory (expected config.json + weights)",
                            where=str(directory))


def _old_vocab_error(where: str) -> InvalidInputError:
    return InvalidInputError(
        f"this is a pre-2023-04 ChatGLM-6B checkpoint with the {OLD_V1_VOCAB}-token vocabulary (its ids 150004/150005 "
        "are <sop>/<eop>); glmtune reads the slimmed 130528-token release: re-download THUDM/chatglm-6b (weights, "
        "config.json and ice_text.model) and use that", where=where)


def check_v1_vocabulary(config: Mapping[str, Any], where: str) -> None:
    """Refuse the old 150528-vocabulary v1 checkpoints with a message saying what to do instead."""
    if config.get("vocab_size") == OLD_V1_VOCAB or config.get("bos_token_id") == 150004 \
            or config.get("eos_token_id") == 150005:
        raise _old_vocab_error(where)


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


def _tied_groups(model: nn.Module) -> dict[str, list[str]]:
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
    tied = _tied_groups(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    copied: dict[Path, bool] = {}  # per file: every tensor became a copy, so its cached pages can go
    copied_keys: set[str] = set()  # the tensors only a copy of which was kept: their mapped pages can go now
    for key, tensor, path in iter_tensors(files, release=lambda done: copied.get(done, False),
                                          copied=copied_keys.__contains__):
        if _IGNORED_KEY.search(key):
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
        tensor = _converted(key, tensor, expected[key], dtype, device, family, path)
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
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta and not _IGNORED_KEY.search(k)]
    if missing:
        raise InvalidInputError(f"missing keys (the checkpoint does not hold them): {_format_keys(missing)}",
                                where=str(files[0].parent))


def _converted(key: str, tensor: torch.Tensor, want: tuple[tuple[int, ...], torch.dtype], dtype: torch.dtype,
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
    qweight, scale = quantize_weight(weight.to(device=device, dtype=dtype), layer.bits)
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
               config_overrides: Mapping[str, Any] | None = None, merge_adapter: bool = False) -> nn.Module:
    """Load a ChatGLM checkpoint (either family, as published by THUDM) or any glmtune export, local or s3://.

    A `prefix` export comes back as its base with the trained prefix encoder; an `adapter` export as its base
    with the peft adapter (a plain model with `merge_adapter`). `dtype` None keeps the checkpoint's.
    `quantization_bit` 8/4 quantizes while loading (each float weight as it is read, the same bits as
    quantizing afterwards); None keeps what is stored (and, for adapter/prefix
    exports, the base precision they were trained over); 0 insists on full precision. `device` is auto
    (CUDA when usable, else CPU), cpu, cuda or cuda:N; dtype "auto" is fp32 on CPU, bf16 (else fp16) on a
    GPU. `config_overrides` changes config keys first, e.g. {"pre_seq_len": 16} adds a fresh p-tuning v2
    prefix encoder to a base.
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
                           merge_adapter=merge_adapter)
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


def _inv_freq(family: str, config: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rotary buffers THUDM's checkpoints carry (values the original recomputes, kept for identical key sets)."""
    if family == "v1":
        dim = config.hidden_size // (config.num_attention_heads * 2)
        inv = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half().to(dtype)
        return {f"transformer.layers.{i}.attention.rotary_emb.inv_freq": inv.clone() for i in range(config.num_layers)}
    dim = config.kv_channels // 2
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    return {"transformer.rotary_pos_emb.inv_freq": inv.to(dtype)}


def original_config(model: nn.Module, family: str, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as THUDM's files have it: the original keys only, model_type "chatglm", torch_dtype."""
    import transformers

    config = model.config
    keys = _V1_KEYS if family == "v1" else _V2_KEYS
    data: dict[str, Any] = {
        "architectures": ["ChatGLMForConditionalGeneration"],
        "auto_map": dict(getattr(config, "auto_map", None) or _AUTO_MAP[family]),
        "model_type": "chatglm",
    }
    for key in keys:
        if hasattr(config, key):
            data[key] = getattr(config, key)
    if family != "v1" and float(getattr(config, "rope_ratio", 1.0)) != 1.0:
        data["rope_ratio"] = config.rope_ratio
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    data["transformers_version"] = transformers.__version__
    return dict(sorted(data.items()))


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "2GB", "1GiB" (decimal and binary units, as transformers reads them)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not match:
        raise InvalidInputError(f"cannot read a size from {size!r} (e.g. 2GB, 500MB)", where="max_shard_size")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[match.group(2) or "B"])


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None,
                    max_shard_size: int | str = "2GB") -> Path:
    """Write `model` (either family, possibly quantized) in THUDM's layout that the original code also reads.

    Sharded safetensors with `model.safetensors.index.json` (one `model.safetensors` when it fits), the
    original key names (v1 keeps both the word embeddings and lm_head), config.json with the original
    keys, and the tokenizer's files when given. Everything is written to a temporary folder first and
    moved into place with config.json last, so a reader never sees a half-written checkpoint.
    """
    from safetensors.torch import save_file

    family = family_of_config(getattr(model, "config", {}))
    if not isinstance(model, model_classes(family)[1]):
        raise InvalidInputError(f"save_pretrained writes a ChatGLM model, not a {type(model).__name__}; merge a peft "
                                "model first (merge_and_unload()) or save its adapter with peft")
    limit = parse_size(max_shard_size)
    dtype = model.get_input_embeddings().weight.dtype
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        # safetensors refuses shared storage: tied weights (v1 embedding/lm_head) are written as two copies.
        state[key] = tensor.clone() if ident in seen else tensor.contiguous()
        seen.add(ident)
    for key, value in _inv_freq(family, model.config, dtype).items():
        state.setdefault(key, value)
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        shards = _shards(state, limit)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, str(staging / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: n for n, shard in zip(names, shards, strict=True) for k in shard}}
            (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        config = original_config(model, family, dtype)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _default_permissions(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _default_permissions(folder: Path) -> None:
    """Temp files and folders are private (0600/0700); the published checkpoint gets the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _publish(staging: Path, target: Path) -> None:
    """Swap a finished save into place with renames; other files of an existing folder (not weights) are kept."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not target.is_dir():
        raise InvalidInputError("exists and is not a directory", where=str(target))
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
    os.replace(target, previous / "old")
    os.replace(staging, target)
    written = {p.name for p in target.iterdir()}
    for path in (previous / "old").iterdir():
        stale_weights = _WEIGHT_FILE.match(path.name) or path.name in (SAFE_INDEX, BIN_INDEX)
        if path.name not in written and not stale_weights:
            os.replace(path, target / path.name)
    shutil.rmtree(previous, ignore_errors=True)

"""Loading what training produced for serving: a base or merged/full model, a LoRA/AdaLoRA adapter or a
p-tuning v2 prefix over its base, int8/int4 quantized at load or stored so; from a folder or `s3://`.

Remote exports are downloaded once into a cache and checked against the sha256 manifest that export
writes last (no manifest: an unfinished upload, refused). Several adapters share one base: every adapter
gets its own module tree whose base tensors are the base model's own, so nothing is copied or switched.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import EXPORT_FILE, ExportInfo, read_export_info
from glmtune.templates import encode_prompt, stop_token_ids, template_for_family
from glmtune_inference.generation import GenerationParams

PREFIX_WEIGHTS = "prefix_encoder.safetensors"
PREFIX_KEY = "transformer.prefix_encoder."


@dataclass
class ServedModel:
    """One name a client can ask for: a ready model module with its tokenizer and chat template."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    template: str
    family: str
    context_length: int
    prefix_len: int = 0
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def encode(self, query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> list[int]:
        """Prompt ids through the shared chat template (the same code training used)."""
        return encode_prompt(self.tokenizer, self.template, query, history, system).ids

    def params(self, **overrides: Any) -> GenerationParams:
        """Generation parameters with this model's stop tokens and context length as the max_length cap."""
        overrides.setdefault("max_length", self.context_length)
        overrides["max_length"] = min(overrides["max_length"], self.context_length)
        stops = tuple(stop_token_ids(self.tokenizer, self.template))
        return GenerationParams(stop_token_ids=stops, **overrides)


@dataclass(frozen=True)
class LoadOptions:
    """How to load: dtype (None keeps the checkpoint's), quantize at load (4/8), the download cache."""

    dtype: str | None = None
    quantization_bit: int | None = None
    cache_dir: str | os.PathLike | None = None


def locate(uri: str | os.PathLike, options: LoadOptions = LoadOptions()) -> tuple[Path, ExportInfo | None]:
    """A local, verified folder for `uri` and its export description (None for a plain model folder)."""
    if storage.is_s3_uri(uri):
        cache = Path(options.cache_dir) / "s3" if options.cache_dir else None
        path = storage.fetch(str(uri), cache, require_manifest=True)
    else:
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise InvalidInputError("no such model directory", where=str(uri))
        if (path / storage.MANIFEST_NAME).is_file():
            storage.verify_manifest(path)
    if not (path / EXPORT_FILE).is_file():
        return path, None
    return path, read_export_info(path, require_complete=storage.is_s3_uri(uri))


def load_served_models(model_uri: str, adapters: Mapping[str, str] | None = None, name: str | None = None,
                       options: LoadOptions = LoadOptions()) -> dict[str, ServedModel]:
    """Every model name served for `model_uri` plus its named adapters, the main one first."""
    path, info = locate(model_uri, options)
    main_name = name or default_model_name(model_uri, info)
    if info is not None and info.kind in ("adapter", "prefix"):
        base_path, _ = locate(info.base_model, options)
        base = _load_base(base_path, options)
        served = {main_name: _apply_delta(base, path, info, main_name, str(model_uri), options)}
    else:
        base = _load_base(path, options)
        served = {main_name: _served(main_name, base.model, base.path if info is None else path, info,
                                     str(model_uri))}
    for adapter_name, uri in (adapters or {}).items():
        if adapter_name in served:
            raise InvalidInputError(f"model name {adapter_name!r} is used twice", where=f"--adapter {adapter_name}")
        adapter_path, adapter_info = locate(uri, options)
        if adapter_info is None or adapter_info.kind not in ("adapter", "prefix"):
            raise InvalidInputError("an adapter must be an 'adapter' or 'prefix' export (glmtune-export.json)",
                                    where=str(uri))
        served[adapter_name] = _apply_delta(base, adapter_path, adapter_info, adapter_name, str(uri), options)
    return served


def default_model_name(uri: str | os.PathLike, info: ExportInfo | None) -> str:
    """The training run's spec name when the export records it, else the folder's last path part."""
    spec_name = (info.run or {}).get("spec_name") if info is not None else None
    if isinstance(spec_name, str) and spec_name:
        return spec_name
    return str(uri).rstrip("/").rsplit("/", 1)[-1] or "model"


@dataclass
class _Base:
    model: torch.nn.Module
    path: Path


def _load_base(path: Path, options: LoadOptions) -> _Base:
    from glmtune.modeling import load_model

    return _Base(load_model(path, dtype=options.dtype, quantization_bit=options.quantization_bit), path)


def _served(name: str, model: torch.nn.Module, tokenizer_dir: Path, info: ExportInfo | None, source: str,
            prefix_len: int = 0) -> ServedModel:
    from glmtune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    template = info.template if info is not None else template_for_family(tokenizer.family)
    config = model.config
    context = getattr(config, "max_sequence_length", None) or getattr(config, "seq_length", None) or 2048
    family = "v1" if hasattr(config, "position_encoding_2d") else "v2"
    return ServedModel(name=name, model=model.eval(), tokenizer=tokenizer, template=template, family=family,
                       context_length=int(context), prefix_len=prefix_len, source=source)


def _apply_delta(base: _Base, path: Path, info: ExportInfo, name: str, source: str,
                 options: LoadOptions) -> ServedModel:
    tokenizer_dir = path if _has_tokenizer(path) else base.path
    if info.kind == "adapter":
        return _served(name, _with_adapter(base.model, path, name), tokenizer_dir, info, source)
    model = _with_prefix(base, path, info, options)
    return _served(name, model, tokenizer_dir, info, source, prefix_len=model.config.pre_seq_len)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def shared_clone(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the very same parameter and buffer tensors (no weight memory is copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _with_adapter(base: torch.nn.Module, path: Path, name: str) -> torch.nn.Module:
    from peft import PeftModel

    if not (path / "adapter_config.json").is_file():
        raise InvalidInputError("adapter export without adapter_config.json", where=str(path))
    try:
        return PeftModel.from_pretrained(shared_clone(base), str(path), adapter_name=name, is_trainable=False).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"adapter does not fit the base model: {exc}", where=str(path)) from None


def _with_prefix(base: _Base, path: Path, info: ExportInfo, options: LoadOptions) -> torch.nn.Module:
    """The base model rebuilt with a p-tuning v2 prefix encoder; its base tensors are the base model's."""
    from safetensors.torch import load_file

    from glmtune.modeling import load_model

    pre_seq_len, projection = _prefix_settings(path, info)
    weights = path / PREFIX_WEIGHTS
    if not weights.is_file():
        raise InvalidInputError(f"prefix export without {PREFIX_WEIGHTS}", where=str(path))
    state = load_file(str(weights))
    foreign = sorted(k for k in state if not k.startswith(PREFIX_KEY))
    if foreign or not state:
        raise InvalidInputError(f"{PREFIX_WEIGHTS} must hold only {PREFIX_KEY}* tensors (found {foreign[:3]})",
                                where=str(weights))
    model = load_model(base.path, dtype=options.dtype, quantization_bit=options.quantization_bit,
                       config_overrides={"pre_seq_len": pre_seq_len, "prefix_projection": projection})
    expected = {k: v.shape for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
    if set(expected) != set(state):
        raise InvalidInputError(f"prefix weights {sorted(state)} do not match the encoder the config describes "
                                f"({sorted(expected)}; prefix_projection={projection})", where=str(weights))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise InvalidInputError(
                f"{key} has shape {tuple(tensor.shape)} but pre_seq_len={pre_seq_len} and the base model need "
                f"{tuple(expected[key])}: the prefix was trained with another pre_seq_len or another base model",
                where=str(weights))
    shared = {k: v for k, v in base.model.state_dict().items() if not k.startswith(PREFIX_KEY)}
    model.load_state_dict({**shared, **state}, strict=True, assign=True)
    return model.eval()


def _prefix_settings(path: Path, info: ExportInfo) -> tuple[int, bool]:
    """pre_seq_len / prefix_projection from the saved config; the export description must agree."""
    config_path = path / "config.json"
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError("prefix export without config.json (it carries pre_seq_len)",
                                where=str(path)) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"invalid JSON: {exc.msg}", where=f"{config_path}:{exc.lineno}") from None
    pre_seq_len = saved.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or pre_seq_len <= 0:
        raise InvalidInputError("pre_seq_len must be a positive integer", where=f"{config_path}:pre_seq_len")
    if info.pre_seq_len is not None and info.pre_seq_len != pre_seq_len:
        raise InvalidInputError(f"pre_seq_len mismatch: config.json says {pre_seq_len}, {EXPORT_FILE} says "
                                f"{info.pre_seq_len}", where=f"{config_path}:pre_seq_len")
    projection = bool(saved.get("prefix_projection", info.prefix_projection))
    if projection != bool(info.prefix_projection):
        raise InvalidInputError(f"prefix_projection mismatch: config.json says {projection}, {EXPORT_FILE} says "
                                f"{info.prefix_projection}", where=f"{config_path}:prefix_projection")
    return pre_seq_len, projection

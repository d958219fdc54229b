"""Loading what training produced for serving: a base or merged/full model, LoRA/AdaLoRA adapters or p-tuning
v2 prefixes over their base, int8/int4 as the export records or as asked; from a folder or `s3://`.

How each export kind is assembled lives in `glmtune.export_loading` (shared with `glmtune.load_model`);
this module adds what serving needs: several adapters over ONE base (every adapter gets its own module tree
whose base tensors are the base model's own, so nothing is copied or switched), tokenizers and templates.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmtune import export_loading
from glmtune.errors import InvalidInputError
from glmtune.export_format import EXPORT_FILE, KINDS_WITH_BASE, ExportInfo
from glmtune.templates import encode_prompt, stop_token_ids, template_for_family
from glmtune_inference.generation import GenerationParams


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
    # The local folder `source` was loaded from (the export itself, not its base): what it ships, e.g. report.html.
    directory: Path | None = None

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
    """How to load: dtype (None keeps the checkpoint's, "auto" is the device's: fp32 on CPU, bf16 or fp16 on a
    GPU); quantization of the base (None: as the exports record, 0: full precision, 4/8: weight-only quantize at
    load); the download cache; the device (auto: CUDA when usable, else CPU; cpu; cuda; cuda:N); whether an
    adapter/prefix may go over a base with another fingerprint than the one it was trained over (experts only)."""

    dtype: str | None = None
    quantization_bit: int | None = None
    cache_dir: str | os.PathLike | None = None
    device: str = "auto"
    allow_base_mismatch: bool = False


def locate(uri: str | os.PathLike, options: LoadOptions = LoadOptions()) -> tuple[Path, ExportInfo | None]:
    """A local, verified folder for `uri` and its export description (None for a plain model folder)."""
    return export_loading.locate(uri, options.cache_dir)


@dataclass(frozen=True)
class _Delta:
    """An adapter or prefix export to serve under `name`."""

    name: str
    path: Path
    info: ExportInfo
    source: str


def load_served_models(model_uri: str, adapters: Mapping[str, str] | None = None, name: str | None = None,
                       options: LoadOptions = LoadOptions()) -> dict[str, ServedModel]:
    """Every model name served for `model_uri` plus its named adapters, the main one first; all share one base
    on `options.device`."""
    device = export_loading.resolve_device(options.device, where="--device")
    path, info = locate(model_uri, options)
    main_name = name or default_model_name(model_uri, info)
    main_is_delta = info is not None and info.kind in KINDS_WITH_BASE
    deltas = [_Delta(main_name, path, info, str(model_uri))] if main_is_delta else []
    for adapter_name, uri in (adapters or {}).items():
        if adapter_name == main_name or any(d.name == adapter_name for d in deltas):
            raise InvalidInputError(f"model name {adapter_name!r} is used twice", where=f"--adapter {adapter_name}")
        adapter_path, adapter_info = locate(uri, options)
        if adapter_info is None or adapter_info.kind not in KINDS_WITH_BASE:
            raise InvalidInputError(f"an adapter must be an 'adapter' or 'prefix' export ({EXPORT_FILE})",
                                    where=str(uri))
        deltas.append(_Delta(adapter_name, adapter_path, adapter_info, str(uri)))
    base_uri = export_loading.resolve_base(info, path) if main_is_delta else str(model_uri)
    base_path = locate(base_uri, options)[0] if main_is_delta else path
    for delta in deltas:  # before any weights load: a wrong base is refused in seconds, naming both fingerprints
        export_loading.check_export_base(delta.info, delta.source, base_path, base_uri, options.allow_base_mismatch,
                                         export_dir=delta.path)
    bits = served_quantization(options.quantization_bit, deltas)
    backend = served_backend(options.quantization_bit, deltas)
    dtype = export_loading.resolve_load_dtype(options.dtype, device)
    base = _Base(export_loading.load_base(base_path, dtype, device, bits, backend), base_path)
    served = {} if main_is_delta else {
        main_name: _served(main_name, base.model, base.path if info is None else path, info, str(model_uri),
                           directory=path)}
    for delta in deltas:
        served[delta.name] = _apply_delta(base, delta)
    return served


def served_quantization(requested: int | None, deltas: Sequence[_Delta]) -> int | None:
    """Bits for the shared base: the request (0 = full precision) or what the adapter/prefix exports were trained
    over; None keeps what the base checkpoint stores."""
    if requested is not None:
        return export_loading.base_quantization(0, requested)
    recorded = {d.info.quantization_bit for d in deltas}
    if len(recorded) > 1:  # one shared base cannot be at two precisions
        listing = ", ".join(f"{d.name}: {d.info.quantization_bit or 'full precision'}" for d in deltas)
        raise InvalidInputError(f"these exports were trained over differently quantized bases ({listing}) but share "
                                "one base here: choose its precision with --quantize 4|8|none",
                                where=f"{EXPORT_FILE}:quantization_bit")
    return export_loading.base_quantization(recorded.pop() if recorded else 0, None)


def served_backend(requested: int | None, deltas: Sequence[_Delta]) -> str:
    """The layers that quantize the shared base: those the exports were trained over (an int4 and a bitsandbytes
    NF4 base are not one base), glmtune's when --quantize chose the precision."""
    backends = {d.info.quantization_backend for d in deltas if d.info.quantization_bit}
    if requested is None and len(backends) > 1:
        listing = ", ".join(f"{d.name}: {d.info.quantization_backend}" for d in deltas if d.info.quantization_bit)
        raise InvalidInputError(f"these exports were trained over bases quantized by different backends ({listing}) "
                                "but share one base here: choose its precision with --quantize 4|8|none",
                                where=f"{EXPORT_FILE}:quantization_backend")
    return export_loading.base_backend(backends.pop() if backends else "glmtune", requested)


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


def _served(name: str, model: torch.nn.Module, tokenizer_dir: Path, info: ExportInfo | None, source: str,
            prefix_len: int = 0, directory: Path | None = None) -> ServedModel:
    from glmtune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    template = info.template if info is not None else template_for_family(tokenizer.family)
    config = model.config
    context = getattr(config, "max_sequence_length", None) or getattr(config, "seq_length", None) or 2048
    family = "v1" if hasattr(config, "position_encoding_2d") else "v2"
    return ServedModel(name=name, model=model.eval(), tokenizer=tokenizer, template=template, family=family,
                       context_length=int(context), prefix_len=prefix_len, source=source, directory=directory)


def _apply_delta(base: _Base, delta: _Delta) -> ServedModel:
    tokenizer_dir = delta.path if _has_tokenizer(delta.path) else base.path
    if delta.info.kind == "adapter":
        model = export_loading.attach_adapter(shared_clone(base.model), delta.path, delta.name)
        return _served(delta.name, model, tokenizer_dir, delta.info, delta.source, directory=delta.path)
    model = export_loading.attach_prefix(base.model, delta.path, delta.info)
    return _served(delta.name, model, tokenizer_dir, delta.info, delta.source, prefix_len=model.config.pre_seq_len,
                   directory=delta.path)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def served_device(models: Mapping[str, ServedModel]) -> torch.device:
    """The one device every served model lives on (they share one base)."""
    devices = {export_loading.model_device(m.model) for m in models.values()}
    if len(devices) != 1:
        raise InvalidInputError(f"served models span devices {sorted(map(str, devices))}: they must share one",
                                where="models")
    return devices.pop()


def shared_clone(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the very same parameter and buffer tensors (no weight memory is copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)

"""Assembling a model from any glmtune export: the one place that knows how each kind is put together.

merged / full exports are plain checkpoints; an `adapter` export is its base plus a peft adapter (merged
into the base on request); a `prefix` export is its base rebuilt with a p-tuning v2 prefix encoder whose
base tensors are the base model's own. The base is quantized as the export records (`quantization_bit`,
the precision it was trained over) unless the caller overrides it, with the layers it was trained over
(`quantization_backend`: glmtune's int8/int4, or bitsandbytes' 8-bit / 4-bit NF4 for a QLoRA adapter; an
override always uses glmtune's). A base bundled inside the export
(`base_model` relative, e.g. "base") is resolved against the export's own folder, local or downloaded
from `s3://`. `glmtune.load_model` and the serving loader both call this module.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import EXPORT_FILE, KINDS_WITH_BASE, ExportInfo, read_export_info
from glmtune.fingerprint import base_fingerprint, check_base_match, manifest_digests

PREFIX_WEIGHTS = "prefix_encoder.safetensors"
PREFIX_KEY = "transformer.prefix_encoder."
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
"""The device forms every loader, CLI flag and the spec's serving.device accept."""
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str | torch.device | None, where: str = "device") -> torch.device:
    """The torch device for `device`: auto (or None) is CUDA when torch can use it, else the CPU; cpu, cuda and
    cuda:N are checked against what this process sees, so a typo or a missing GPU fails here, not mid-forward."""
    text = str(device if device is not None else "auto").strip().lower()
    if not re.fullmatch(DEVICE_PATTERN, text):
        raise InvalidInputError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N", where=where)
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidInputError(f"device {text!r} was asked for but torch sees no CUDA device (torch "
                                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use cpu or auto",
                                where=where)
    index = int(text.partition(":")[2]) if ":" in text else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise InvalidInputError(f"device {text!r} was asked for but only {torch.cuda.device_count()} CUDA "
                                "device(s) are visible", where=where)
    return torch.device("cuda", index)


def bf16_supported(capability: tuple[int, int] | None) -> bool:
    """Whether a GPU of compute `capability` (major, minor) runs bf16 matmuls natively (Ampere, sm_80, and newer)."""
    return capability is not None and tuple(capability) >= (8, 0)


def auto_dtype(device: torch.device, capability: tuple[int, int] | None = None) -> torch.dtype:
    """dtype "auto": float32 on the CPU (its fp16/bf16 matmuls are slow); on a GPU bf16 where supported, else fp16.
    `capability` defaults to the device's own."""
    if device.type != "cuda":
        return torch.float32
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if bf16_supported(capability) else torch.float16


def resolve_load_dtype(dtype: str | torch.dtype | None, device: torch.device) -> str | torch.dtype | None:
    """`dtype` as the checkpoint loader takes it: "auto" becomes the device's dtype; None (the checkpoint's own
    dtype) and explicit dtypes pass through."""
    return auto_dtype(device) if isinstance(dtype, str) and dtype.strip().lower() == "auto" else dtype


def locate(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> tuple[Path, ExportInfo | None]:
    """A local, verified folder for `uri` and its export description (None for a plain model folder).

    Remote folders must carry the checksum manifest (written last by export: its absence is an unfinished
    upload); a local folder with a manifest is checked against it.
    """
    if storage.is_s3_uri(uri):
        path = storage.fetch(str(uri), Path(cache_dir) / "s3" if cache_dir else None, require_manifest=True)
    else:
        path = Path(str(uri).removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise InvalidInputError("no such model directory", where=str(uri))
        if (path / storage.MANIFEST_NAME).is_file():
            storage.verify_manifest(path)
    if not (path / EXPORT_FILE).is_file():
        return path, None
    return path, read_export_info(path, require_complete=storage.is_s3_uri(uri))


def resolve_base(info: ExportInfo, export_dir: Path) -> str:
    """Where the base of an adapter/prefix export is: a URI or absolute path as recorded, or a folder inside
    the export itself when recorded relative (a bundled base, covered by the export's manifest)."""
    recorded = info.base_model or ""
    if storage.is_s3_uri(recorded) or "://" in recorded or Path(recorded).is_absolute():
        return recorded.removeprefix("file://")
    parts = PurePosixPath(recorded).parts
    if not parts or any(part in ("..", "") for part in parts):
        raise InvalidInputError(f"a relative base_model must name a folder inside the export, not {recorded!r}",
                                where=f"{export_dir / EXPORT_FILE}:base_model")
    bundled = export_dir.joinpath(*parts)
    if not (bundled / "config.json").is_file():
        raise InvalidInputError(f"the bundled base model {recorded!r} is missing from the export (no config.json)",
                                where=f"{export_dir / EXPORT_FILE}:base_model")
    return str(bundled)


def base_quantization(recorded: int, requested: int | None) -> int | None:
    """The bits to quantize a delta export's base to: `requested` when given (0 forces full precision), else the
    precision the export says it was trained over (None: as the base checkpoint is stored)."""
    if requested is None:
        return int(recorded or 0) or None
    if requested not in (0, 4, 8):
        raise InvalidInputError(f"quantization must be 4, 8 or 0 (full precision), not {requested!r}",
                                where="quantization_bit")
    return requested


def base_backend(recorded: str, requested: int | None) -> str:
    """Which layers quantize a delta export's base: the recorded backend, unless the caller chose the precision
    (`--quantize`), which always means glmtune's own int8/int4 (or full precision)."""
    return recorded if requested is None else "glmtune"


def check_export_base(info: ExportInfo, export_where: str, base_dir: Path, base_where: str,
                      allow_mismatch: bool = False, export_dir: Path | None = None) -> None:
    """Refuse to put an adapter/prefix export over a base other than the one it was trained over (by fingerprint,
    naming both); exports written before fingerprints were recorded are not checked. Call it after `locate`
    verified `base_dir` (and `export_dir`, the export's local folder): the digests of their manifests are then
    trusted instead of hashing the weights again (a bundled base is covered by the export's manifest)."""
    if not info.base_fingerprint:
        return
    digests = manifest_digests(base_dir)
    if not digests and export_dir is not None and base_dir.resolve().is_relative_to(export_dir.resolve()):
        digests = manifest_digests(base_dir.resolve(), export_dir.resolve())
    check_base_match(info.base_fingerprint, base_fingerprint(base_dir, known_sha256=digests),
                     export_where=f"{export_where.rstrip('/')}/{EXPORT_FILE}", base_where=base_where,
                     allow_mismatch=allow_mismatch)


def load_export(path_or_uri: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
                device: str | torch.device = "cpu", quantization_bit: int | None = None,
                merge_adapter: bool = False, cache_dir: str | os.PathLike[str] | None = None,
                allow_base_mismatch: bool = False) -> nn.Module:
    """Any model folder or export, assembled: base + prefix for `prefix`, base + adapter for `adapter` (a peft
    model, or merged into a plain model with `merge_adapter`), the checkpoint itself otherwise; on `device`
    (auto | cpu | cuda | cuda:N), with dtype "auto" meaning the device's natural one (see `auto_dtype`). The base
    must be the one the export was trained over (same fingerprint) unless `allow_base_mismatch`."""
    device = resolve_device(device)
    path, info = locate(path_or_uri, cache_dir)
    if info is None or info.kind not in KINDS_WITH_BASE:
        return load_base(path, dtype, device, quantization_bit)
    base_uri = resolve_base(info, path)
    base_dir, _ = locate(base_uri, cache_dir)
    check_export_base(info, str(path_or_uri), base_dir, base_uri, allow_base_mismatch, export_dir=path)
    base = load_base(base_dir, dtype, device, base_quantization(info.quantization_bit, quantization_bit),
                     backend=base_backend(info.quantization_backend, quantization_bit))
    if info.kind == "adapter":
        return attach_adapter(base, path, merge=merge_adapter)
    return attach_prefix(base, path, info)


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights live (its first parameter's device; the CPU for a parameterless module)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def load_base(path: str | os.PathLike[str], dtype: str | torch.dtype | None, device: str | torch.device,
              bits: int | None, backend: str = "glmtune") -> nn.Module:
    """A plain checkpoint folder on `device`; `bits` 4/8 quantizes after loading (with glmtune's layers, or
    bitsandbytes' when `backend` says so), 0 insists on full precision."""
    from glmtune.modeling.checkpoint import load_checkpoint

    hf_glm4 = is_hf_glm4_dir(path)
    if backend == "bitsandbytes" and bits:
        if hf_glm4:
            raise InvalidInputError("bitsandbytes layers load GLM-4 in the remote-code layout only: serve the "
                                    "remote-code copy the training run made (<workdir>/base-model-remote) or "
                                    "--quantize 4|8 with glmtune's layers", where=str(path))
        return load_bitsandbytes_base(path, dtype, device, bits)
    if hf_glm4:
        return load_hf_glm4(path, dtype, device, bits)
    return load_checkpoint(path, dtype=dtype, device=device, quantization_bit=bits)


def is_hf_glm4_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a local GLM-4 checkpoint in transformers' ``-hf`` layout (config.json model_type)."""
    from glmtune.modeling.glm4 import HF_MODEL_TYPES
    from glmtune.storage import read_json_object

    config = Path(path) / "config.json"
    return config.is_file() and read_json_object(config).get("model_type") in HF_MODEL_TYPES


def load_hf_glm4(path: str | os.PathLike[str], dtype: str | torch.dtype | None, device: str | torch.device,
                  bits: int | None) -> nn.Module:
    """An ``-hf`` GLM-4 checkpoint in glmtune's model (converted tensor for tensor: the same logits), so serving,
    adapters, prefixes and int8/int4 work on it as on the remote-code layout; GLM-4-0414 is refused."""
    from glmtune.modeling.glm4 import HF
    from glmtune.modeling.glm4_checkpoint import checkpoint_layout, load_hf_as_remote

    layout = checkpoint_layout(path)
    if layout != HF:
        raise InvalidInputError(f"GLM-4 layout {layout!r} (Glm4ForCausalLM, GLM-4-0414) has no remote-code twin; "
                                "glmtune serves the glm-4-9b-chat layouts (remote code and -hf)",
                                where=str(Path(path) / "config.json"))
    if bits not in (None, 0, 4, 8):
        raise InvalidInputError(f"quantization_bit must be 4 or 8 (0: full precision), not {bits!r}",
                                where="quantization_bit")
    device = resolve_device(device)
    model = load_hf_as_remote(path, resolve_load_dtype(dtype, device))
    if bits:
        model.quantize(bits)
    return model.to(device).eval()


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' import-time notice about an optional CPU 4-bit kernel: the pure-torch fallback
    gives the same numbers, so on the CPU the notice is noise in every load and serve log."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def load_bitsandbytes_base(path: str | os.PathLike[str], dtype: str | torch.dtype | None,
                           device: str | torch.device, bits: int,
                           config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """A float checkpoint loaded into bitsandbytes layers, for QLoRA training and for serving its adapters alike:
    8-bit Linear8bitLt, or 4-bit NF4 computing in the load dtype (None: the checkpoint's own)."""
    quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    from glmtune.modeling.checkpoint import (
        family_of_config,
        local_model_dir,
        model_classes,
        read_config_dict,
        resolve_dtype,
    )

    device = resolve_device(device)
    directory = local_model_dir(path)
    raw = read_config_dict(directory)
    where = str(directory / "config.json")
    if int(raw.get("quantization_bit") or 0):
        raise InvalidInputError("the base checkpoint is stored glmtune-quantized; bitsandbytes needs float weights "
                                "(serve with --quantize to use glmtune's layers)", where=where)
    compute = resolve_dtype(resolve_load_dtype(dtype, device), raw.get("torch_dtype") or raw.get("dtype"))
    quant = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
    # Both families' files say model_type "chatglm", so the class comes from the detected family.
    config_class, model_class = model_classes(family_of_config(raw, where=where))
    from transformers.utils import logging as hf_logging

    # The config built here, not read by transformers: the file's model_type "chatglm" would draw a warning; and
    # no per-tensor progress bar in a server's log (restored after, as the caller had it).
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = model_class.from_pretrained(str(directory), config=config_class.from_dict({**raw, **(config_overrides or {})}),
                                            quantization_config=quant, dtype=compute, device_map={"": str(device)})
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    keep_training_kernels(model)
    return model.eval()


def keep_training_kernels(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU no-grad fast path on 4-bit layers: on the first inference forward it repacks the
    weights with bfloat16 block scales, which fails when in_features is not a multiple of the block size and
    computes other numbers than the dequantize path the adapter was trained against (GPUs never take it)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: nn.Module) -> bool:
    """True when the model's block Linears hold glmtune int8/int4 weights."""
    return bool(getattr(getattr(model, "config", None), "quantization_bit", 0))


def is_bitsandbytes_quantized(model: nn.Module) -> bool:
    """True when the model was loaded through bitsandbytes (8-bit or 4-bit layers)."""
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def attach_adapter(base: nn.Module, adapter_dir: Path, name: str = "default", merge: bool = False) -> nn.Module:
    """Wrap `base` (modified in place) with the peft adapter in `adapter_dir`; `merge` folds it into the base."""
    quiet_bitsandbytes()  # peft imports bitsandbytes
    from peft import PeftConfig, PeftModel

    from glmtune.modeling.hf_compat import peft_reads_deprecated_checkpointing

    if not (adapter_dir / "adapter_config.json").is_file():
        raise InvalidInputError("adapter export without adapter_config.json", where=str(adapter_dir))
    if merge and is_quantized(base):
        raise InvalidInputError("an adapter cannot be merged into an int8/int4 base: load it unmerged, or in full "
                                "precision (quantization 0) to merge", where=str(adapter_dir))
    if merge and is_bitsandbytes_quantized(base):
        raise InvalidInputError("an adapter cannot be merged into a bitsandbytes 8-bit/4-bit base: load it unmerged, "
                                "or in full precision (quantization 0) to merge", where=str(adapter_dir))
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if is_quantized(base):
        register_quantized_linear(config)
    try:
        with peft_reads_deprecated_checkpointing():
            model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name, config=config,
                                              is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"adapter does not fit the base model: {exc}", where=str(adapter_dir)) from None
    # peft creates the LoRA weights beside a float base layer but not always beside an int8/int4 one.
    model.to(model_device(base))
    return (model.merge_and_unload() if merge else model).eval()


def register_quantized_linear(peft_config: Any) -> None:
    """Let peft put LoRA layers on glmtune's weight-only int8/int4 Linears (the chatglm-6b-int4 path)."""
    from peft.tuners.lora import Linear as LoraLinear

    from glmtune.modeling.quantization import QuantizedLinear

    peft_config._register_custom_module({QuantizedLinear: LoraLinear})


def attach_prefix(base: nn.Module, export_dir: Path, info: ExportInfo) -> nn.Module:
    """A new model over `base`'s very tensors (nothing copied) plus the export's p-tuning v2 prefix encoder."""
    from safetensors.torch import load_file

    from glmtune.modeling.checkpoint import parameters_on_meta

    pre_seq_len, projection = prefix_settings(export_dir, info)
    weights = export_dir / PREFIX_WEIGHTS
    if not weights.is_file():
        raise InvalidInputError(f"prefix export without {PREFIX_WEIGHTS}", where=str(export_dir))
    state = load_file(str(weights))
    foreign = sorted(k for k in state if not k.startswith(PREFIX_KEY))
    if foreign or not state:
        raise InvalidInputError(f"{PREFIX_WEIGHTS} must hold only {PREFIX_KEY}* tensors (found {foreign[:3]})",
                                where=str(weights))
    config = copy.deepcopy(base.config)
    config.pre_seq_len, config.prefix_projection = pre_seq_len, projection
    with parameters_on_meta():
        model = type(base)(config)  # a quantized config builds empty int layers: the base's int tensors fill them
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
    device = next(base.parameters()).device
    # The prefix stays in float32 as training kept it; its keys/values are cast to the activations' dtype.
    prefix = {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    model.load_state_dict({**base.state_dict(keep_vars=True), **prefix}, strict=True, assign=True)
    model.to(device)  # buffers the state dict does not carry; shared tensors are already there and stay shared
    model.config._name_or_path = str(export_dir)
    return model.eval()


def prefix_settings(export_dir: Path, info: ExportInfo) -> tuple[int, bool]:
    """pre_seq_len / prefix_projection from the export's config.json; the export description must agree."""
    config_path = export_dir / "config.json"
    saved = storage.read_json_object(config_path, "prefix export without config.json (it carries pre_seq_len)",
                                     where=str(export_dir))
    pre_seq_len = saved.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len <= 0:
        raise InvalidInputError("pre_seq_len must be a positive integer", where=f"{config_path}:pre_seq_len")
    if info.pre_seq_len is not None and info.pre_seq_len != pre_seq_len:
        raise InvalidInputError(f"pre_seq_len mismatch: config.json says {pre_seq_len}, {EXPORT_FILE} says "
                                f"{info.pre_seq_len}", where=f"{config_path}:pre_seq_len")
    projection = bool(saved.get("prefix_projection", info.prefix_projection))
    if projection != bool(info.prefix_projection):
        raise InvalidInputError(f"prefix_projection mismatch: config.json says {projection}, {EXPORT_FILE} says "
                                f"{info.prefix_projection}", where=f"{config_path}:prefix_projection")
    return pre_seq_len, projection

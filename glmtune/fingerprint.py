"""Base model fingerprints: what lets an adapter or prefix export refuse a base it was not trained on.

A LoRA trained on chatglm3-6b and applied to chatglm3-6b-base loads without error and silently answers worse,
so every export records the fingerprint of the base it was trained over, and every place that puts an export
together with a base (merge-export, `load_model`, `glmtune serve --adapter`, the operator) compares it.

The fingerprint is a sha256 over the base's config (without bookkeeping keys that re-saving changes), its
tensor names and shapes (from the weight files' headers) and the sha256 of every weight file. Hashing 12 GB of
weights takes a while, so the result is cached next to the base in `glmtune-fingerprint.json` and reused while
the files' sizes and modification times are unchanged. Torch-free at import: the operator reads cached
fingerprints (`read_cached_fingerprint`) and compares them (`check_base_match`); only a `.bin` weight file's
tensor listing imports torch, lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmtune import storage
from glmtune.errors import InvalidInputError

FINGERPRINT_FILE = "glmtune-fingerprint.json"
FINGERPRINT_FORMAT = 1
CONFIG_FILE = "config.json"
# The weight files of the published layouts, as the checkpoint loader reads them (glmtune.modeling.checkpoint
# imports torch, so the pattern cannot come from there): other *.bin files (training_args.bin) are not the model.
WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)$")
# Config keys that say who saved the file rather than what the model is: re-saving the same weights with another
# transformers version or from another folder must not change the fingerprint.
_BOOKKEEPING_KEYS = ("transformers_version",)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_log = logging.getLogger(__name__)


def weight_files(model_dir: Path) -> list[str]:
    """The weight files of a model folder (model*.safetensors / pytorch_model*.bin), sorted by name."""
    return sorted(p.name for p in model_dir.iterdir() if p.is_file() and WEIGHT_FILE.match(p.name))


def base_fingerprint(model_dir: str | os.PathLike[str], known_sha256: Mapping[str, str] | None = None) -> str:
    """The fingerprint of the model in `model_dir` (sha256 hex), from its cache file when the files are unchanged.

    `known_sha256` gives file digests the caller has just verified (a manifest checked on download), so those
    files are not read again. The result is cached in `FINGERPRINT_FILE` unless the folder is read-only or that
    file is part of the folder's checksum manifest (rewriting it would break the manifest).
    """
    directory = Path(model_dir)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidInputError(f"not a model folder: {CONFIG_FILE} is missing", where=str(directory))
    names = weight_files(directory)
    if not names:
        raise InvalidInputError("not a model folder: no model*.safetensors or pytorch_model*.bin weight files", where=str(directory))
    stats = {name: _stat(directory / name) for name in (CONFIG_FILE, *names)}
    cached = _read_cache(directory / FINGERPRINT_FILE)
    cached_files = cached.get("files", {}) if cached else {}
    if cached and set(cached_files) == set(stats) and all(
            _same_stat(cached_files[name], stat) for name, stat in stats.items()):
        return cached["fingerprint"]
    digests: dict[str, str] = {}
    for name in names:
        entry = cached_files.get(name)
        if entry and _same_stat(entry, stats[name]) and _HEX64.match(str(entry.get("sha256", ""))):
            digests[name] = entry["sha256"]
        elif known_sha256 and name in known_sha256:
            digests[name] = known_sha256[name]
        else:
            digests[name] = storage.file_sha256(directory / name)
    config = storage.read_json_object(config_path)
    tensors: dict[str, list[int]] = {}
    for name in names:
        tensors.update(_tensor_shapes(directory / name))
    fingerprint = fingerprint_of(config, tensors, digests)
    _write_cache(directory, fingerprint, {
        name: {**stat, **({"sha256": digests[name]} if name in digests else {})} for name, stat in stats.items()})
    return fingerprint


def cached_file_digests(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The weight file sha256s the folder's cache still vouches for (same size and mtime), e.g. to fingerprint a
    copy of the folder without reading its weights again; {} without a usable cache."""
    directory = Path(model_dir)
    cached = _read_cache(directory / FINGERPRINT_FILE)
    digests = {}
    for name, entry in (cached or {}).get("files", {}).items():
        path = directory / name
        if (WEIGHT_FILE.match(name) and path.is_file() and _same_stat(entry, _stat(path))
                and _HEX64.match(str(entry.get("sha256", "")))):
            digests[name] = entry["sha256"]
    return digests


def fingerprint_of(config: Mapping[str, Any], tensors: Mapping[str, list[int]], file_sha256: Mapping[str, str]) -> str:
    """The fingerprint of a model described by its config, tensor shapes and weight file digests (pure)."""
    kept = {k: v for k, v in config.items() if not k.startswith("_") and k not in _BOOKKEEPING_KEYS}
    payload = {"format": FINGERPRINT_FORMAT, "config": kept, "tensors": {k: list(v) for k, v in tensors.items()},
               "files": dict(file_sha256)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_cached_fingerprint(text_or_mapping: str | bytes | Mapping[str, Any]) -> str | None:
    """The fingerprint a `glmtune-fingerprint.json` holds (its text or decoded object), or None when it holds
    none that this glmtune understands. For readers that only have the file (the operator reads it from S3);
    it cannot tell whether the files changed since, which `base_fingerprint` checks."""
    cached = _parse_cache(text_or_mapping)
    return cached["fingerprint"] if cached else None


def check_base_match(export_fp: str | None, base_fp: str | None, *, export_where: str, base_where: str,
                     allow_mismatch: bool = False) -> bool:
    """Refuse a base whose fingerprint differs from the one the export was trained over; True when both are known
    and equal. An unknown side (an export written before fingerprints) passes unchecked (False); with
    `allow_mismatch` a difference is logged as a warning instead (False)."""
    if not export_fp or not base_fp:
        return False
    if export_fp == base_fp:
        return True
    detail = (f"the export was trained over a base with fingerprint {export_fp} (recorded in {export_where}), but "
              f"the base model given has fingerprint {base_fp} ({base_where})")
    if allow_mismatch:
        _log.warning("%s; using it anyway as asked (allow_base_mismatch)", detail)
        return False
    raise InvalidInputError(f"{detail}: an adapter or prefix on another base silently loses quality. Use the base "
                            "it was trained on, or pass allow_base_mismatch=True / --allow-base-mismatch if you know "
                            "the two bases are interchangeable", where=export_where)


def _stat(path: Path) -> dict[str, int]:
    info = path.stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _same_stat(entry: Any, stat: Mapping[str, int]) -> bool:
    return isinstance(entry, dict) and entry.get("size") == stat["size"] and entry.get("mtime_ns") == stat["mtime_ns"]


def _parse_cache(data: str | bytes | Mapping[str, Any]) -> dict[str, Any] | None:
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError:
            return None
    if not isinstance(data, Mapping) or data.get("format") != FINGERPRINT_FORMAT:
        return None
    if not _HEX64.match(str(data.get("fingerprint", ""))) or not isinstance(data.get("files", {}), dict):
        return None
    return dict(data)


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        return _parse_cache(path.read_bytes())
    except OSError:
        return None


def _write_cache(directory: Path, fingerprint: str, files: dict[str, dict[str, Any]]) -> None:
    """Cache the fingerprint next to the model, where that is allowed and harmless."""
    if pinned_by_manifest(directory):
        return
    record = {"format": FINGERPRINT_FORMAT, "fingerprint": fingerprint,
              "computed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "about": "sha256 over config.json (bookkeeping keys dropped), tensor names/shapes and the weight "
                       "files' sha256; reused while the files' sizes and mtimes are unchanged",
              "files": files}
    try:
        storage.atomic_write_json(directory / FINGERPRINT_FILE, record)
    except OSError as exc:  # a read-only model folder: the fingerprint is simply recomputed next time
        _log.debug("fingerprint not cached in %s: %s", directory, exc)


def pinned_by_manifest(directory: Path) -> bool:
    """Whether a checksum manifest of the folder or of the export around it (a base bundled as `base/`) lists the
    cache file: rewriting it would make that copy fail its own verification."""
    for root in (directory, directory.parent):
        if not (root / storage.MANIFEST_NAME).is_file():
            continue
        try:
            listed = storage.read_manifest(root)["files"]
        except InvalidInputError:
            return True  # an unreadable manifest: leave the folder exactly as it is
        if (directory / FINGERPRINT_FILE).relative_to(root).as_posix() in listed:
            return True
    return False


def manifest_digests(directory: Path, root: Path | None = None) -> dict[str, str]:
    """File sha256s of `directory` from the manifest of `root` (default: its own), for a caller that has just
    verified that manifest (a base bundled inside an export is covered by the export's); {} without one."""
    root = directory if root is None else root
    if not (root / storage.MANIFEST_NAME).is_file():
        return {}
    try:
        files = storage.read_manifest(root)["files"]
        prefix = directory.relative_to(root).as_posix()
    except (InvalidInputError, ValueError):
        return {}
    prefix = "" if prefix == "." else f"{prefix}/"
    return {name[len(prefix):]: entry["sha256"] for name, entry in files.items()
            if name.startswith(prefix) and isinstance(entry, dict) and _HEX64.match(str(entry.get("sha256", "")))}


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes of one weight file: from the safetensors header, or the pickled state dict."""
    if path.suffix == ".safetensors":
        return _safetensors_shapes(path)
    return _torch_shapes(path)


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The safetensors header: an 8-byte little-endian length, then JSON {name: {dtype, shape, offsets}}."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
        return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise InvalidInputError(f"unreadable safetensors header: {exc}", where=str(path)) from None


def _torch_shapes(path: Path) -> dict[str, list[int]]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not a usable state dict
        raise InvalidInputError(f"unreadable weight file: {exc}", where=str(path)) from None
    if not isinstance(state, Mapping):
        raise InvalidInputError("a .bin weight file must hold a state dict", where=str(path))
    return {str(name): list(getattr(t, "shape", ())) for name, t in state.items()}

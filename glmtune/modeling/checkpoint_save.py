"""Saving ChatGLM checkpoints in THUDM's layout: sharded safetensors, an index, an original-style config.json.

`ShardWriter` takes tensors one at a time and writes a shard as soon as the next tensor would overflow it,
so a streaming writer (the merge-export in the trainer) holds at most one shard; `save_pretrained` feeds it
a whole in-memory model. Everything goes into a private staging folder that is renamed into place last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.modeling.checkpoint_config import (
    CONFIG_NAME,
    family_of_config,
    inv_freq_buffers,
    model_classes,
    original_config,
)
from glmtune.modeling.checkpoint_io import BIN_INDEX, SAFE_INDEX

_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)$")
SINGLE_FILE = "model.safetensors"


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


class ShardWriter:
    """Safetensors shards of at most `limit` bytes each (a bigger tensor gets a shard alone), written as the
    tensors arrive into `folder`; `finish()` gives them their final names and writes the index."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = Path(folder), limit
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (a contiguous CPU tensor that owns its memory); flushes the shard it would overflow."""
        if key in self._pending or any(key in keys for _, keys in self._written):
            raise InvalidInputError(f"tensor {key} written twice", where=str(self.folder))
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.limit:
            self._flush()
        self._pending[key] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, rename all to `model-0000i-of-0000n.safetensors` (or `model.safetensors` when
        one) and write `model.safetensors.index.json` for several; returns the file names."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for (path, _keys), name in zip(self._written, names, strict=True):
            os.replace(path, self.folder / name)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: name for (_, keys), name in zip(self._written, names, strict=True) for k in keys}}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None,
                    max_shard_size: int | str = "2GB") -> Path:
    """Write `model` (either family, possibly quantized) in THUDM's layout that the original code also reads.

    Sharded safetensors with `model.safetensors.index.json` (one `model.safetensors` when it fits), the
    original key names (v1 keeps both the word embeddings and lm_head), config.json with the original
    keys, and the tokenizer's files when given. Everything is written to a temporary folder first and
    moved into place with config.json last, so a reader never sees a half-written checkpoint.
    """
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
    for key, value in inv_freq_buffers(family, model.config, dtype).items():
        state.setdefault(key, value)
    with staging_folder(out_dir) as staging:
        writer = ShardWriter(staging, limit)
        for key, tensor in state.items():
            writer.add(key, tensor)
        writer.finish()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        write_config(staging, original_config(model, family, dtype))
    return Path(out_dir)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """config.json (the file every reader opens first) of a checkpoint being staged."""
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class staging_folder:  # noqa: N801 - used as a context manager, named like one
    """`with staging_folder(target) as tmp:` a private folder next to `target`, published there (weights of an
    existing folder replaced, its other files kept) when the block ends without an error, deleted otherwise."""

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.saving-", dir=self.target.parent))
        return self.staging

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                _default_permissions(self.staging)
                _publish(self.staging, self.target)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


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

"""Reading checkpoint weight files: which files, and their tensors one at a time, with page-cache hints.

Before a file is read the kernel is told it will be needed whole (`POSIX_FADV_WILLNEED`), so memory-mapped
tensors page in through large read-ahead instead of one fault at a time; after a file whose tensors were
all copied (converted or quantized) the caller may ask for its pages to be dropped (`POSIX_FADV_DONTNEED`),
so the source bytes of a converted shard do not stay cached next to the converted model. Within a
memory-mapped .bin file, a tensor the caller only copied leaves this process's memory as soon as it is
done (madvise), so quantizing at load holds the quantized model plus about one tensor, not one whole file.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from glmtune.errors import InvalidInputError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The weight files to read, safetensors first: an index's shards, or the single file."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidInputError(f"unreadable shard index ({exc})", where=str(index)) from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise InvalidInputError(f"shard(s) named in the index are missing: {', '.join(absent)}",
                                        where=str(index))
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise InvalidInputError("no weights: expected model.safetensors, pytorch_model.bin or a shard index "
                            f"({SAFE_INDEX} / {BIN_INDEX})", where=str(directory))


def _advise(path: Path, advice_name: str) -> bool:
    """posix_fadvise(whole file) where the platform has it; False where it does not (a hint, never an error)."""
    advice = getattr(os, advice_name, None)
    if advice is None or not hasattr(os, "posix_fadvise"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, advice)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def prefetch(path: Path) -> bool:
    """Ask the kernel to start reading the whole file now (the advice lives on the file, not on this fd)."""
    return _advise(path, "POSIX_FADV_WILLNEED")


def drop_pages(path: Path) -> bool:
    """Drop the file's clean cached pages (those no live mapping still holds); they were copied already."""
    return _advise(path, "POSIX_FADV_DONTNEED")


_MADV_DONTNEED = 4  # Linux's value; the call is only made on Linux


def _forget_mapped_pages(tensor: torch.Tensor) -> None:
    """Drop from this process the whole pages inside a memory-mapped tensor that was copied out already.

    Only for tensors of a read-only file mapping (torch.load mmap): their pages are never written, so a
    later access (none is expected) would read the same bytes from the file again; partial pages at the
    ends, which neighbouring tensors share, are left alone.
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    low = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    high = end // mmap.PAGESIZE * mmap.PAGESIZE
    if high > low:
        _libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def iter_tensors(files: list[Path], release: Callable[[Path], bool] | None = None,
                 copied: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(key, tensor, file) for every stored tensor, one at a time (safetensors and zip .bin are memory-mapped).

    When `copied(key)` says the consumer kept only a copy of a memory-mapped .bin tensor, its pages leave
    this process at once rather than with the whole file, so quantizing at load holds about one tensor of
    the file, not the file. After a file is exhausted, `release(path)` True drops its cached pages.
    """
    from safetensors import safe_open

    for path in files:
        prefetch(path)
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        yield key, handle.get_tensor(key), path
            except InvalidInputError:
                raise
            except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
                raise InvalidInputError(f"corrupt or unreadable weight file ({exc})", where=str(path)) from None
        else:
            state, mapped = _torch_load(path)
            forget = mapped and copied is not None and sys.platform == "linux"
            for key in list(state):
                tensor = state.pop(key)
                yield key, tensor, path
                if forget and copied(key):
                    _forget_mapped_pages(tensor)
                del tensor
            del state  # the last reference to the file's mapping: its pages leave this process here
        if release is not None and release(path):
            drop_pages(path)


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The file's state dict, and whether its tensors are memory-mapped (zip format) or were read (legacy)."""
    mapped = True
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            mapped = False
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise InvalidInputError(f"corrupt or unreadable weight file ({exc})", where=str(path)) from None
    if not isinstance(state, dict):
        raise InvalidInputError("weight file does not hold a state dict", where=str(path))
    return state, mapped

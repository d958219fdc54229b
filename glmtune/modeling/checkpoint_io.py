"""Reading checkpoint weight files: which files, and their tensors one at a time, with page-cache hints.

While the tensors of one file are copied out (converted or quantized), a reader thread asks the kernel to read
the rest of that file and the whole next one (`POSIX_FADV_WILLNEED`, in pieces: Linux reads at most one
read-ahead window per call), so the disk fetches the next shard while the CPU works on this one; a consumer
that keeps tensors memory-mapped gets only a first WILLNEED per file. After a file whose tensors were
all copied (converted or quantized) the caller may ask for its pages to be dropped (`POSIX_FADV_DONTNEED`),
so the source bytes of a converted shard do not stay cached next to the converted model. Within a
memory-mapped .bin file, a tensor the caller only copied leaves this process's memory as soon as it is
done (madvise), so quantizing at load holds the quantized model plus about one tensor, not one whole file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import sys
import threading
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
    """Ask the kernel to start reading the file now (the advice lives on the file, not on this fd). On Linux
    one call reads only the first read-ahead window; `_ReadAhead` asks for the rest piece by piece."""
    return _advise(path, "POSIX_FADV_WILLNEED")


def drop_pages(path: Path) -> bool:
    """Drop the file's clean cached pages (those no live mapping still holds); they were copied already."""
    return _advise(path, "POSIX_FADV_DONTNEED")


# Linux reads at most max(read_ahead_kb, max_sectors_kb) per WILLNEED call (128 KiB to a few MiB), whatever
# length is asked for, so the read-ahead thread asks for a file in pieces of this size.
ADVICE_PIECE = 1 << 20


class _ReadAhead:
    """A thread that has the kernel read each file whole (WILLNEED, piece by piece) from the moment the consumer
    enters the file before it until the consumer has finished it: reading the next shard overlaps with
    converting this one, and the disk stays at most one file ahead (about two shards in the page cache).
    It starts with the consumer's first copied tensor (`start`).

    The consumer's own WILLNEED on entering a file and each piece of the thread's advice are given under one
    lock, so advice reaches the kernel in file order and never for a finished file (its pages may go next);
    the consumer gets the lock ahead of the thread, which would otherwise re-take it piece after piece.
    """

    def __init__(self, files: list[Path]) -> None:
        self._files = files
        self._state = threading.Condition()
        self._entered = -1  # the file the consumer is reading
        self._finished = 0  # how many files the consumer is done with
        self._closed = False
        self._consumer_waiting = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading ahead (once the consumer copies tensors: one that keeps them memory-mapped reads only
        what it touches, and advice for whole files would only queue disk reads ahead of its own)."""
        if self._thread is None and hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED"):
            self._thread = threading.Thread(target=self._run, name="glmtune-read-ahead", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def _consumer_turn(self) -> Iterator[None]:
        self._consumer_waiting = True  # the thread yields the lock to us before its next piece
        with self._state:
            self._consumer_waiting = False
            yield
            self._state.notify_all()

    def enter(self, index: int) -> None:
        """The consumer starts reading file `index`."""
        with self._consumer_turn():
            prefetch(self._files[index])
            self._entered = index

    def finish(self, index: int) -> None:
        """The consumer is done with file `index`."""
        with self._consumer_turn():
            self._finished = index + 1

    def close(self) -> None:
        with self._consumer_turn():
            self._closed = True
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        for index, path in enumerate(self._files):
            with self._state:
                self._state.wait_for(lambda index=index: self._closed or self._entered >= index - 1)
                if self._closed:
                    return
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # a hint only: the consumer reports unreadable files
            try:
                for offset in range(0, os.fstat(fd).st_size, ADVICE_PIECE):
                    with self._state:
                        self._state.wait_for(lambda: not self._consumer_waiting)
                        if self._closed or self._finished > index:
                            break
                        os.posix_fadvise(fd, offset, ADVICE_PIECE, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


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
    the file, not the file. After a file is exhausted, `release(path)` True drops its cached pages. From the
    first copied tensor on, a thread has the kernel read the next file (`_ReadAhead`) while this one is
    consumed; it ends with the iteration, however that ends.
    """
    from safetensors import safe_open

    reader = _ReadAhead(files)
    try:
        for index, path in enumerate(files):
            reader.enter(index)
            yield from _file_tensors(path, safe_open, copied, reader.start)
            reader.finish(index)
            if release is not None and release(path):
                drop_pages(path)
    finally:
        reader.close()


def _file_tensors(path: Path, safe_open: Callable, copied: Callable[[str], bool] | None,
                  on_copy: Callable[[], None]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """One file's tensors for `iter_tensors`; `on_copy()` after each tensor the consumer kept only a copy of."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key), path
                    if copied is not None and copied(key):
                        on_copy()
        except InvalidInputError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
            raise InvalidInputError(f"corrupt or unreadable weight file ({exc})", where=str(path)) from None
        return
    state, mapped = _torch_load(path)
    forget = mapped and sys.platform == "linux"
    for key in list(state):
        tensor = state.pop(key)
        yield key, tensor, path
        if copied is not None and copied(key):
            on_copy()
            if forget:
                _forget_mapped_pages(tensor)
        del tensor
    del state  # the last reference to the file's mapping: its pages leave this process here


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

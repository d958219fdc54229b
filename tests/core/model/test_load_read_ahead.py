"""Reading shards ahead: while the tensors of one weight file are consumed, the kernel is asked for the whole
next file (so the disk works while the CPU converts or quantizes), never for a file further on, never again
for a file already finished; and the reader thread ends with the iteration, however it ends."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from glmtune.modeling import checkpoint_io
from glmtune.modeling.checkpoint_io import ADVICE_PIECE, iter_tensors

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux/Unix only")


def bin_shards(folder: Path, count: int = 3, tensors: int = 3) -> list[Path]:
    """`count` torch .bin shards of `tensors` 1 MiB float32 tensors each (several advice pieces a file)."""
    files = []
    for i in range(count):
        path = folder / f"pytorch_model-{i + 1:05d}-of-{count:05d}.bin"
        torch.save({f"layer{i}.w{j}": torch.full((ADVICE_PIECE // 4,), float(i)) for j in range(tensors)}, path)
        files.append(path)
    return files


class AdviceLog:
    """Every posix_fadvise call as (file index, offset, advice), through the real call."""

    def __init__(self, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
        self.index = {path.name: i for i, path in enumerate(files)}
        self.calls: list[tuple[int, int, int]] = []
        self.lock = threading.Lock()
        real = os.posix_fadvise

        def spy(fd: int, offset: int, length: int, advice: int) -> None:
            with self.lock:
                self.calls.append((self.index[Path(os.readlink(f"/proc/self/fd/{fd}")).name], offset, advice))
            real(fd, offset, length, advice)

        monkeypatch.setattr(os, "posix_fadvise", spy)

    def willneed(self) -> list[tuple[int, int]]:
        with self.lock:
            return [(i, offset) for i, offset, advice in self.calls if advice == os.POSIX_FADV_WILLNEED]

    def whole_file_advised(self, index: int, size: int) -> bool:
        return set(range(0, size, ADVICE_PIECE)) <= {offset for i, offset in self.willneed() if i == index}


def read_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "glmtune-read-ahead"]


def test_the_next_shard_is_advised_whole_while_this_one_is_consumed(tmp_path, monkeypatch) -> None:
    files = bin_shards(tmp_path)
    log = AdviceLog(files, monkeypatch)
    current = -1
    for key, tensor, path in iter_tensors(files, release=lambda _path: True, copied=lambda _key: True):
        index = files.index(path)
        assert all(i <= index + 1 for i, _ in log.willneed()), "advice more than one file ahead"
        # (reading ahead starts once the consumer has copied its first tensor)
        if index != current and index + 1 < len(files) and key != "layer0.w0":
            current = index
            # the consumer is slow here: the whole next file is asked for meanwhile (a thread does it)
            deadline = time.monotonic() + 20
            while not log.whole_file_advised(index + 1, files[index + 1].stat().st_size):
                assert time.monotonic() < deadline, f"file {index + 1} not advised while file {index} was read"
                time.sleep(0.01)
        tensor.clone()
    assert not read_ahead_threads()
    order = [i for i, _ in log.willneed()]
    assert order == sorted(order)  # the kernel hears about the files in reading order
    for i, path in enumerate(files):
        advice = [(offset, kind) for j, offset, kind in log.calls if j == i]
        dropped = [n for n, (_, kind) in enumerate(advice) if kind == os.POSIX_FADV_DONTNEED]
        # every file advised whole, and nothing asked for again after its pages were dropped
        assert log.whole_file_advised(i, path.stat().st_size)
        assert dropped == [len(advice) - 1], advice


def test_the_reader_thread_ends_when_the_consumer_stops_early(tmp_path, monkeypatch) -> None:
    files = bin_shards(tmp_path, count=4)
    log = AdviceLog(files, monkeypatch)
    tensors = iter_tensors(files, copied=lambda _key: True)
    next(tensors)
    next(tensors)
    assert read_ahead_threads()
    tensors.close()  # what an exception in the consumer (a shape mismatch, say) leads to
    assert not read_ahead_threads()
    advised = len(log.calls)
    time.sleep(0.1)
    assert len(log.calls) == advised and {i for i, _ in log.willneed()} <= {0, 1}


def test_a_consumer_that_keeps_tensors_mapped_gets_no_read_ahead(tmp_path, monkeypatch) -> None:
    """A lazy (memory-mapped) load reads only what it touches later: whole-file advice would only queue disk
    reads in front of its own; each file still gets its first WILLNEED, in order."""
    files = bin_shards(tmp_path, count=3, tensors=2)
    log = AdviceLog(files, monkeypatch)
    kept = [tensor for _, tensor, _ in iter_tensors(files, copied=lambda _key: False)]
    assert len(kept) == 6 and not read_ahead_threads()
    assert log.willneed() == [(0, 0), (1, 0), (2, 0)]


def test_read_ahead_is_skipped_where_the_platform_has_no_fadvise(tmp_path, monkeypatch) -> None:
    files = bin_shards(tmp_path, count=2, tensors=1)
    monkeypatch.delattr(os, "posix_fadvise")
    keys = [key for key, _, _ in iter_tensors(files, release=lambda _path: True)]
    assert keys == ["layer0.w0", "layer1.w0"] and not read_ahead_threads()
    assert checkpoint_io.prefetch(files[0]) is False

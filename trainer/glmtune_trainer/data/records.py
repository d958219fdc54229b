"""The on-disk record format: shards of token sequences, read by random access without loading them whole.

A shard `NAME` is three raw little-endian files:
  * `NAME.tokens`   int32  all token ids, sequence after sequence;
  * `NAME.segments` int64  [S, 5] rows (start, length, untrained, bidirectional, sample) — one per window
    packed into a sequence (see encode.Window); labels and masks are derived from them;
  * `NAME.index`    int64  [N+1, 2] rows (token offset, segment offset) of each sequence.
The index is memory-mapped (16 bytes a sequence); tokens and segments are read with `pread`, so memory
stays flat however much data streams through. Counts live in the build manifest.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmtune_trainer.data.encode import Window

TOKEN_DTYPE = np.dtype("<i4")
SEGMENT_DTYPE = np.dtype("<i8")
SEGMENT_FIELDS = ("start", "length", "untrained", "bidirectional", "sample")
SUFFIXES = (".tokens", ".segments", ".index")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceRecord:
    """One stored sequence: its token ids and the windows (segments) it is made of."""

    input_ids: np.ndarray
    segments: np.ndarray

    def loss_mask(self) -> np.ndarray:
        """True where the token is trained (each window's tail after its untrained context)."""
        mask = np.zeros(len(self.input_ids), dtype=bool)
        for start, length, untrained, _, _ in self.segments:
            mask[start + untrained : start + length] = True
        return mask

    def labels(self) -> np.ndarray:
        """Token ids where trained, -100 elsewhere (the model shifts them itself)."""
        return np.where(self.loss_mask(), self.input_ids.astype(np.int64), IGNORE_INDEX)


class ShardWriter:
    """Appends sequences to one shard's files; `close()` returns the shard's entry for the manifest."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.directory, self.name = Path(directory), name
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = [open(self.directory / f"{name}{suffix}", "wb") for suffix in SUFFIXES]  # noqa: SIM115
        self.sequences = self.tokens = self.segments = 0
        self._files[2].write(np.zeros(2, SEGMENT_DTYPE).tobytes())

    def add(self, windows: list[Window]) -> None:
        """Store one sequence made of `windows` laid end to end."""
        rows, ids, offset = [], [], 0
        for window in windows:
            rows.append((offset, len(window), window.untrained, window.bidirectional, window.sample))
            ids.extend(window.ids)
            offset += len(window)
        self._files[0].write(np.asarray(ids, TOKEN_DTYPE).tobytes())
        self._files[1].write(np.asarray(rows, SEGMENT_DTYPE).reshape(-1, 5).tobytes())
        self.sequences += 1
        self.tokens += offset
        self.segments += len(rows)
        self._files[2].write(np.asarray([self.tokens, self.segments], SEGMENT_DTYPE).tobytes())

    def add_record(self, record: SequenceRecord) -> None:
        """Copy an already stored sequence (used when shuffling records into their final shards)."""
        self._files[0].write(np.ascontiguousarray(record.input_ids, TOKEN_DTYPE).tobytes())
        self._files[1].write(np.ascontiguousarray(record.segments, SEGMENT_DTYPE).tobytes())
        self.sequences += 1
        self.tokens += len(record.input_ids)
        self.segments += len(record.segments)
        self._files[2].write(np.asarray([self.tokens, self.segments], SEGMENT_DTYPE).tobytes())

    def close(self) -> dict:
        for handle in self._files:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return {
            "name": self.name,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "segments": self.segments,
        }


class Shard:
    """Read access to one shard; safe to pickle into DataLoader workers (files reopen lazily)."""

    def __init__(self, directory: str | os.PathLike, entry: dict) -> None:
        self.directory, self.entry = Path(directory), entry
        self.name, self.count = entry["name"], int(entry["sequences"])
        self._index: np.ndarray | None = None
        self._fds: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "entry": self.entry}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["entry"])

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            for fd in self._fds:
                os.close(fd)

    def __len__(self) -> int:
        return self.count

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._index = np.memmap(
                self.directory / f"{self.name}.index", SEGMENT_DTYPE, "r", shape=(self.count + 1, 2)
            )
        return self._index

    def _read(self, which: int, start: int, count: int, dtype: np.dtype) -> np.ndarray:
        if self._fds is None:
            self._fds = tuple(os.open(self.directory / f"{self.name}{s}", os.O_RDONLY) for s in SUFFIXES[:2])
        data = os.pread(self._fds[which], count * dtype.itemsize, start * dtype.itemsize)
        return np.frombuffer(data, dtype)

    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.index[:, 0]))

    def __getitem__(self, i: int) -> SequenceRecord:
        (t0, s0), (t1, s1) = self.index[i], self.index[i + 1]
        tokens = self._read(0, int(t0), int(t1 - t0), TOKEN_DTYPE)
        segments = self._read(1, int(s0) * 5, int(s1 - s0) * 5, SEGMENT_DTYPE).reshape(-1, 5)
        return SequenceRecord(tokens, segments)


class RecordSet:
    """The sequences of one record set (all its shards, in order) with global indexing."""

    def __init__(self, directory: str | os.PathLike, shards: list[dict]) -> None:
        self.shards = [Shard(directory, entry) for entry in shards if int(entry["sequences"]) > 0]
        self._starts = list(np.cumsum([0] + [len(s) for s in self.shards]))
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> SequenceRecord:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range 0..{len(self) - 1}")
        shard = bisect.bisect_right(self._starts, i) - 1
        return self.shards[shard][i - int(self._starts[shard])]

    def lengths(self) -> np.ndarray:
        """Token count of every sequence (from the index alone)."""
        if self._lengths is None:
            parts = [s.lengths() for s in self.shards]
            self._lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._lengths

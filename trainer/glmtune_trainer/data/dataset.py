"""Torch datasets over built records: map-style access, and a rank/worker-sharded, resumable batch stream.

`RecordBatches` plans each epoch deterministically from (seed, epoch): a seeded permutation, split evenly
across ranks (every rank gets the same number of batches, so no rank waits at a collective), optionally
grouped by length, cut into batches. Batch j of a rank goes to DataLoader worker j % num_workers, which
is the order a DataLoader (batch_size=None) hands them out, so the stream is identical for any number of
workers. The resume position is (epoch, batches this rank already consumed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from glmtune.errors import InvalidInputError
from glmtune_trainer.data.collate import Collator
from glmtune_trainer.data.manifest import open_records, read_manifest
from glmtune_trainer.data.records import SequenceRecord

GROUP_WINDOW = 64  # batches per length-grouping window: similar lengths together, order still random


@dataclass(frozen=True)
class ResumePosition:
    """Where a rank's stream stands: `batches` of epoch `epoch` were consumed."""

    epoch: int = 0
    batches: int = 0


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def plan_epoch(
    lengths: np.ndarray,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    group_by_length: bool = False,
    drop_last: bool = False,
) -> list[list[int]]:
    """The batches (lists of sequence indices) rank `rank` sees in `epoch`; pure and deterministic."""
    count = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(count) if shuffle else np.arange(count)
    if drop_last:
        order = order[: count - count % world_size]
    elif count % world_size:
        order = np.concatenate([order, order[: world_size - count % world_size]])
    mine = order[rank::world_size]
    if group_by_length:
        window = batch_size * GROUP_WINDOW
        grouped = [
            part[np.argsort(-np.asarray(lengths)[part], kind="stable")]
            for part in (mine[i : i + window] for i in range(0, len(mine), window))
        ]
        mine = np.concatenate(grouped) if grouped else mine
    batches = [mine[i : i + batch_size].tolist() for i in range(0, len(mine), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class RecordDataset(Dataset):
    """Map-style access to one record set: item i is a `SequenceRecord`."""

    def __init__(self, directory: str | os.PathLike, dataset: str | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.records = open_records(self.directory, dataset)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SequenceRecord:
        return self.records[index]

    def lengths(self) -> np.ndarray:
        return self.records.lengths()

    def collator(self, pad_to_multiple_of: int = 1, segment_ids: bool = False) -> Collator:
        """A collator for this build's model family and pad id."""
        from glmtune.tokenization import load_tokenizer

        tokenizer = load_tokenizer(self.directory / self.manifest["tokenizer"]["dir"])
        return Collator(
            self.manifest["tokenizer"]["family"], tokenizer.pad_token_id, pad_to_multiple_of, segment_ids
        )


class RecordBatches(IterableDataset):
    """Collated batches of one rank, sharded across DataLoader workers, resumable mid-epoch.

    Use with `DataLoader(stream, batch_size=None, num_workers=k)`. Call `set_epoch(e)` before each epoch
    and `resume(ResumePosition(e, k))` to continue after k consumed batches.
    """

    def __init__(
        self,
        records: RecordDataset,
        batch_size: int,
        collate: Callable | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        group_by_length: bool = False,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        default_rank, default_size = distributed_rank_and_size()
        self.records, self.batch_size = records, batch_size
        self.collate = collate or records.collator()
        self.shuffle, self.seed, self.group_by_length, self.drop_last = (
            shuffle,
            seed,
            group_by_length,
            drop_last,
        )
        self.rank = default_rank if rank is None else rank
        self.world_size = default_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise InvalidInputError(f"rank {self.rank} is outside world size {self.world_size}")
        self.position = ResumePosition()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.position = ResumePosition(epoch, 0)

    def resume(self, position: ResumePosition) -> None:
        """Continue epoch `position.epoch` after `position.batches` batches (from a saved checkpoint)."""
        if not 0 <= position.batches <= len(self):
            raise InvalidInputError(f"resume position {position.batches} is outside 0..{len(self)} batches")
        self.position = position

    def state_dict(self, batches_consumed: int) -> dict:
        """What to save in a checkpoint after `batches_consumed` batches of the current epoch."""
        return {"epoch": self.position.epoch, "batches": self.position.batches + batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.resume(ResumePosition(int(state["epoch"]), int(state["batches"])))

    def plan(self) -> list[list[int]]:
        return plan_epoch(
            self.records.lengths(),
            self.batch_size,
            epoch=self.position.epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            group_by_length=self.group_by_length,
            drop_last=self.drop_last,
        )

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        count = len(self.records)
        per_rank = count // self.world_size if self.drop_last else -(-count // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        remaining = self.plan()[self.position.batches :]
        for batch in remaining[worker_id::workers]:
            yield self.collate([self.records[i] for i in batch])

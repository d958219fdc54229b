"""The run's batches: records built once per work dir (by its writer), split into train / held-out, served per rank.

Builds go through `glmtune_trainer.data` (content-hash cache, manifest last); this module only decides
the split and hands the loop a `BatchSource` whose epoch order is a pure function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmtune_trainer.distributed import Topology


class RecordSubset:
    """A view of chosen records of several record sets (train or held-out part)."""

    def __init__(self, sets: list[Any], picks: np.ndarray) -> None:
        self.sets = sets
        self.offsets = np.cumsum([0] + [len(s) for s in sets])
        self.picks = picks
        all_lengths = np.concatenate([s.lengths() for s in sets]) if sets else np.zeros(0, dtype=np.int64)
        self._lengths = all_lengths[picks]

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index: int) -> Any:
        flat = int(self.picks[index])
        which = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return self.sets[which][flat - int(self.offsets[which])]

    def lengths(self) -> np.ndarray:
        return self._lengths


def split_indices(count: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) record indices: a seeded choice of `eval_fraction` of the records, both sorted."""
    held = int(round(count * eval_fraction))
    if eval_fraction > 0 and count > 1:
        held = min(max(held, 1), count - 1)
    chosen = np.random.default_rng([seed, 7919]).permutation(count)[:held]
    mask = np.zeros(count, dtype=bool)
    mask[chosen] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class RecordBatchSource:
    """`loop.BatchSource` over built records (see `glmtune_trainer.data.dataset.RecordBatches`)."""

    def __init__(self, train: RecordSubset, held_out: RecordSubset, collate: Callable, batch_size: int,
                 seed: int, shuffle: bool, group_by_length: bool, topology: Topology,
                 eval_max_samples: int | None) -> None:
        from glmtune_trainer.data.dataset import RecordBatches

        common = {"rank": topology.rank, "world_size": topology.world_size, "seed": seed}
        self.train = RecordBatches(train, batch_size, collate, shuffle=shuffle, group_by_length=group_by_length,
                                   **common)
        if eval_max_samples is not None and len(held_out) > eval_max_samples:
            held_out = RecordSubset(held_out.sets, held_out.picks[:eval_max_samples])
        self.topology = topology
        self.held_out_records = held_out
        self.held_out = (RecordBatches(held_out, batch_size, collate, shuffle=False, **common)
                         if len(held_out) else None)

    def num_micro_batches(self) -> int:
        return len(self.train)

    def micro_batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        from glmtune_trainer.data.dataset import ResumePosition

        self.train.resume(ResumePosition(epoch, start))
        return iter(self.train)

    def eval_records(self) -> list[Any]:
        """This rank's share of the held-out records (for generation metrics)."""
        records = self.held_out_records
        return [records[i] for i in range(self.topology.rank, len(records), self.topology.world_size)]

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.held_out is None:
            return iter(())
        self.held_out.set_epoch(0)
        return iter(self.held_out)


def build_batch_source(spec: Any, records: Path, topology: Topology) -> RecordBatchSource:
    """This rank's batches of the built `records` folder, split into train / held-out by `spec.data`."""
    from glmtune_trainer.data.build import read_manifest
    from glmtune_trainer.data.dataset import RecordDataset

    data = spec.spec.data
    directory = Path(records)
    names = list(read_manifest(directory)["datasets"])
    sets = [RecordDataset(directory, name) for name in names]
    count = sum(len(s) for s in sets)
    train_idx, eval_idx = split_indices(count, data.eval_split, data.seed)
    collate = sets[0].collator(segment_ids=True)
    training = spec.spec.training
    return RecordBatchSource(
        RecordSubset(sets, train_idx), RecordSubset(sets, eval_idx), collate, training.batch_size,
        data.seed, data.shuffle, data.group_by_length, topology, training.evaluation.max_samples,
    )

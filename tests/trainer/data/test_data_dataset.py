"""Datasets over records: even rank shards, same stream for any worker count, exact mid-epoch resume."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from glmtune_trainer.data.build import BuildConfig, build_records
from glmtune_trainer.data.dataset import RecordBatches, RecordDataset, ResumePosition, plan_epoch
from torch.utils.data import DataLoader


@pytest.fixture(scope="module")
def records_dir(alpaca_subset: Path, tiny_tokenizer_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("records")
    build_records(
        BuildConfig(
            inputs=[str(alpaca_subset)],
            tokenizer=str(tiny_tokenizer_dirs["v1"]),
            out=str(out),
            max_length=256,
            progress=False,
            shard_tokens=2000,
        )
    )
    return out


def _ids(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() + [int(b["input_ids"].shape[1])] for b in batches]


@pytest.mark.parametrize("group", [False, True])
def test_ranks_get_disjoint_equal_shares_covering_everything(group: bool) -> None:
    lengths = np.random.default_rng(0).integers(1, 300, size=103)
    plans = [
        plan_epoch(lengths, 4, epoch=3, seed=5, shuffle=True, rank=r, world_size=3, group_by_length=group)
        for r in range(3)
    ]
    assert len({len(p) for p in plans}) == 1  # no rank waits for another at a collective
    seen = [i for p in plans for b in p for i in b]
    assert set(seen) == set(range(103)) and len(seen) == 105  # two indices repeat to even out the ranks
    assert plans[0] == plan_epoch(
        lengths, 4, epoch=3, seed=5, shuffle=True, rank=0, world_size=3, group_by_length=group
    )
    assert plans[0] != plan_epoch(
        lengths, 4, epoch=4, seed=5, shuffle=True, rank=0, world_size=3, group_by_length=group
    )


def test_length_grouping_reduces_padding() -> None:
    lengths = np.random.default_rng(1).integers(5, 500, size=2000)

    def padded(plan):
        return sum(len(b) * lengths[b].max() for b in plan)

    common = {"epoch": 0, "seed": 0, "shuffle": True, "rank": 0, "world_size": 1}
    assert padded(plan_epoch(lengths, 8, group_by_length=True, **common)) < 0.7 * padded(
        plan_epoch(lengths, 8, **common)
    )


def test_map_style_dataset_reads_records_and_pickles_small(records_dir: Path) -> None:
    data = RecordDataset(records_dir)
    assert len(data) == data.manifest["stats"]["sequences"] >= 160 and len(data.records.shards) > 1
    first = data[0]
    assert first.input_ids.dtype == np.int32 and len(first.input_ids) == data.lengths()[0]
    assert len(pickle.dumps(data)) < 20_000
    assert pickle.loads(pickle.dumps(data))[5].input_ids.tolist() == data[5].input_ids.tolist()


def test_same_batches_for_zero_one_and_two_dataloader_workers(records_dir: Path) -> None:
    data = RecordDataset(records_dir)
    streams = []
    for workers in (0, 1, 2):
        stream = RecordBatches(data, 8, data.collator(), seed=3, group_by_length=True, rank=1, world_size=2)
        stream.set_epoch(2)
        streams.append(_ids(DataLoader(stream, batch_size=None, num_workers=workers)))
    assert streams[0] == streams[1] == streams[2] and len(streams[0]) == len(stream) == -(
        -len(data) // 2 // 8
    )


def test_resume_mid_epoch_continues_exactly_where_it_stopped(records_dir: Path) -> None:
    data = RecordDataset(records_dir)
    stream = RecordBatches(data, 6, data.collator(), seed=9, rank=0, world_size=1)
    stream.set_epoch(1)
    full = _ids(DataLoader(stream, batch_size=None, num_workers=2))
    state = stream.state_dict(batches_consumed=7)
    assert state == {"epoch": 1, "batches": 7}
    fresh = RecordBatches(data, 6, data.collator(), seed=9, rank=0, world_size=1)
    fresh.load_state_dict(state)
    assert _ids(DataLoader(fresh, batch_size=None, num_workers=2)) == full[7:]
    with pytest.raises(Exception, match="outside"):
        fresh.resume(ResumePosition(1, len(fresh) + 1))


def test_batches_carry_the_model_inputs(records_dir: Path) -> None:
    data = RecordDataset(records_dir)
    batch = next(iter(RecordBatches(data, 4, rank=0, world_size=1)))
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert batch["attention_mask"].dtype == torch.bool and batch["position_ids"].shape[1] == 2  # v1
    assert (batch["labels"] != -100).any()

"""Collation: dynamic padding, block-diagonal prefix-LM masks, restarting positions; packed loss == unpacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from glmtune_trainer.data.collate import Collator
from glmtune_trainer.data.encode import SampleEncoder, Window
from glmtune_trainer.data.formats import Sample
from glmtune_trainer.data.packing import pack_lengths
from testkit import record_of


def _window(n: int, untrained: int, bidirectional: int, first: int = 10) -> Window:
    return Window(tuple(range(first, first + n)), untrained, bidirectional, 0, False)


def test_v1_packed_rows_get_block_diagonal_prefix_lm_masks_and_restarting_positions() -> None:
    batch = Collator("v1", pad_token_id=3, segment_ids=True)(
        [record_of([_window(4, 3, 2), _window(3, 2, 1)]), record_of([_window(2, 1, 1)])]
    )
    assert batch["input_ids"].shape == (2, 7) and batch["input_ids"][1, 2:].eq(3).all()
    assert batch["labels"][0].tolist() == [-100, -100, -100, 13, -100, -100, 12]
    visible = ~batch["attention_mask"][0, 0]
    expected = np.zeros((7, 7), bool)
    expected[:4, :2] = True  # context columns of window 0 (before <sop>) seen by its every row
    expected[:4, :4] |= np.tri(4, dtype=bool)
    expected[4:, 4:5] = True
    expected[4:, 4:] |= np.tri(3, dtype=bool)
    assert (visible.numpy() == expected).all()
    assert batch["position_ids"][0].tolist() == [[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 2, 0, 1, 2]]
    pads = ~batch["attention_mask"][1, 0, 2:]
    assert pads.sum().item() == 5 and all(pads[i, 2 + i] for i in range(5))  # a pad sees only itself
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, -1, -1, -1, -1, -1]]


def test_v2_rows_are_causal_per_window_with_positions_from_zero() -> None:
    batch = Collator("v2", pad_token_id=0, pad_to_multiple_of=8)(
        [record_of([_window(3, 1, 0), _window(2, 1, 0)])]
    )
    assert batch["input_ids"].shape == (1, 8) and "segment_ids" not in batch
    visible = (~batch["attention_mask"][0, 0]).numpy()
    assert (visible[:3, :3] == np.tri(3, dtype=bool)).all() and not visible[3:5, :3].any()
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]


def _per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = labels[..., 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[..., :-1, :].flatten(0, -2).float(), shifted.flatten(), ignore_index=-100, reduction="none"
    )
    return nll.view(shifted.shape)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_packed_training_gives_the_same_per_sample_loss_as_unpacked(tiny_tokenizers, family: str) -> None:
    checkpoint = pytest.importorskip("glmtune.modeling.checkpoint", reason="model code not present yet")
    from glmtune.modeling.tiny import tiny_config

    tok = tiny_tokenizers[family]
    torch.manual_seed(0)
    model = checkpoint.model_classes(family)[1](tiny_config(family, "tiny", tok)).eval()
    encoder = SampleEncoder(tok, family, "packing", 48)
    samples = [
        Sample("你好", "你好！我是助手。"),
        Sample("今天天气怎么样？", "晴天，适合出门散步。", (("早", "早上好"),)),
        Sample("讲个故事", "从前有座山，山里有座庙，庙里有个老和尚在给小和尚讲故事。" * 2),
        Sample("1+1=?", "2"),
    ]
    windows = [w for i, s in enumerate(samples) for w in encoder.encode(s, i)]
    assert any(w.truncated for w in windows)  # a long answer spilled into a continuation window
    with torch.no_grad():
        alone = []
        for w in windows:  # unpacked: one window per forward, masks/positions built by the model itself
            ids = torch.tensor([w.ids])
            labels = torch.from_numpy(record_of([w]).labels())[None]
            alone.append(_per_token_nll(model(input_ids=ids).logits, labels)[0])
        sequences = [[windows[i] for i in group] for group in pack_lengths([len(w) for w in windows], 96)]
        assert len(sequences) < len(windows)
        batch = Collator(family, tok.pad_token_id, segment_ids=True)([record_of(s) for s in sequences])
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        packed_nll = _per_token_nll(logits, batch["labels"])
    flat = [w for s in sequences for w in s]
    seg = batch["segment_ids"][:, 1:]
    row_of = [r for r, s in enumerate(sequences) for _ in s]
    number = [k for s in sequences for k in range(len(s))]
    for w, row, k in zip(flat, row_of, number, strict=True):
        mine = packed_nll[row][(seg[row] == k) & (batch["labels"][row, 1:] != -100)]
        reference = alone[windows.index(w)]
        reference = reference[torch.tensor(record_of([w]).labels()[1:]) != -100]
        assert mine.shape == reference.shape and mine.numel() > 0
        assert torch.allclose(mine.mean(), reference.mean(), atol=1e-5, rtol=0)
        assert torch.allclose(mine, reference, atol=1e-4, rtol=0)

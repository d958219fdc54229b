"""Packed rows attend one window at a time (glmtune.modeling.windows): same numbers as the masked product."""

from __future__ import annotations

import pytest
import torch

from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration, padding_attention_mask
from glmtune.modeling.hf_compat import enable_activation_checkpointing
from glmtune.modeling.windows import find_windows


def random_v2() -> ChatGLM2ForConditionalGeneration:
    """A 2-layer model with 4 query heads over 2 key/value groups, weights large enough to matter."""
    torch.manual_seed(0)
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(
        num_layers=2, padded_vocab_size=128, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
        num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
        seq_length=64))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.25)
    return model


def packed_mask(rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The collator's mask (True = masked; windows causal, each pad sees itself) and positions for `rows` of
    window lengths, padded to `length`."""
    masked = torch.ones(len(rows), 1, length, length, dtype=torch.bool)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for row, sizes in enumerate(rows):
        start = 0
        for size in sizes:
            masked[row, 0, start : start + size, start : start + size] = ~torch.ones(size, size).tril().bool()
            positions[row, start : start + size] = torch.arange(size)
            start += size
        for pad in range(start, length):
            masked[row, 0, pad, pad] = False
    return masked, positions


def test_windows_are_found_with_pad_runs_merged() -> None:
    masked, _ = packed_mask([[3, 4, 1], [5]], 10)
    found = find_windows(masked)
    assert found is not None and found.masked is masked
    # a one-token sample and the pads after it are all "see yourself only": one run
    assert found.rows == (((0, 3, False), (3, 4, False), (7, 3, True)), ((0, 5, False), (5, 5, True)))


@pytest.mark.parametrize("case", ["prefix-lm", "padding-mask", "past-columns", "leaky", "2d"])
def test_other_masks_keep_the_masked_path(case: str) -> None:
    masked, _ = packed_mask([[4, 4]], 8)
    if case == "prefix-lm":  # v1: the context before <sop> is bidirectional
        masked[0, 0, 0, 1] = False
    elif case == "padding-mask":  # left padding: pad queries see everything (the original get_masks)
        masked = padding_attention_mask(torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]]), 8, 0, 1, torch.device("cpu"))
    elif case == "past-columns":
        masked = torch.cat((torch.zeros(1, 1, 8, 2, dtype=torch.bool), masked), dim=-1)
    elif case == "leaky":  # the second window sees one token of the first
        masked[0, 0, 6, 1] = False
    else:
        masked = masked[0, 0]
    assert find_windows(masked) is None


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_windowed_attention_equals_the_masked_reference(checkpointing: bool) -> None:
    """Loss, logits and every gradient of a packed batch (two rows, different windows, pads) agree with the
    explicit-softmax reference (`attn_impl: math`, which always applies the whole mask)."""
    model = random_v2().train()
    if checkpointing:
        enable_activation_checkpointing(model)
    masked, positions = packed_mask([[5, 1, 7], [9, 3]], 16)
    assert find_windows(masked) is not None
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": masked, "position_ids": positions, "labels": ids}
    model.config.attn_impl = "math"
    ref_loss, ref_logits, ref_grads = _loss_and_grads(model, batch)
    model.config.attn_impl = "sdpa"
    loss, logits, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_windowed_attention_is_what_runs(monkeypatch) -> None:
    """The packed batch goes through windowed_attention (no masked SDPA call) and an unpacked one does not."""
    from glmtune.modeling import chatglm2_layers

    calls = []
    real = chatglm2_layers.windowed_attention
    monkeypatch.setattr(chatglm2_layers, "windowed_attention", lambda *a: calls.append(1) or real(*a))
    model = random_v2().train()
    masked, positions = packed_mask([[5, 3]], 8)
    ids = torch.randint(3, 128, (1, 8))
    model(input_ids=ids, attention_mask=masked, position_ids=positions)
    assert len(calls) == 2  # one per layer
    model(input_ids=ids)
    assert len(calls) == 2

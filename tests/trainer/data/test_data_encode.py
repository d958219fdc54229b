"""Samples → token windows: prompts identical to inference, labels on answers only, the seed's strategies."""

from __future__ import annotations

import pytest
from glmtune_trainer.data.encode import SampleEncoder
from glmtune_trainer.data.formats import Sample
from glmtune_trainer.data.packing import pack_lengths
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtune import templates

LONG_Q = "请详细解释一下机器学习中的过拟合问题以及常见的解决办法。" * 6
NUMBERED_Q = "".join(f"第{i}个问题是什么？" for i in range(40))  # no repeated stretch: windows are locatable
LONG_A = "过拟合是指模型在训练数据上表现很好，但在新数据上表现较差的现象。" * 12


def _trained(window) -> list[int]:
    return list(window.ids[window.untrained :])


@pytest.mark.parametrize("template", ["v1", "v2", "v3"])
def test_prompt_is_what_inference_feeds_and_only_the_answer_is_trained(
    tiny_tokenizers, template: str
) -> None:
    tok = tiny_tokenizers[template]
    sample = Sample("今天天气怎么样？", "晴天。", (("你好", "你好！"),), "你是助手")
    (window,) = SampleEncoder(tok, template, "truncation", 512).encode(sample, 7)
    prompt = templates.encode_prompt(tok, template, sample.query, sample.history, sample.system).ids
    answer = templates.encode_answer(tok, template, sample.answer)
    assert list(window.ids) == prompt + answer and window.sample == 7 and not window.truncated
    assert window.untrained == len(prompt) and _trained(window) == answer and answer[-1] == tok.eos_token_id
    assert window.bidirectional == (len(prompt) - 1 if template == "v1" else 0)  # v1 prefix LM up to <sop>


def test_chatglm3_history_turns_are_context_only_the_last_assistant_turn_is_trained(tiny_tokenizers) -> None:
    tok = tiny_tokenizers["v3"]
    (window,) = SampleEncoder(tok, "v3", "truncation", 512).encode(
        Sample("q2", "最后的回答", (("q1", "早先的回答"),)), 0
    )
    assert tok.decode(_trained(window)).strip().startswith("最后的回答")
    assert "早先的回答" in tok.decode(list(window.ids[: window.untrained]))


@pytest.mark.parametrize("template", ["v1", "v2", "v3"])
def test_truncation_cuts_the_prompt_end_and_spills_the_answer_into_windows(tiny_tokenizers, template) -> None:
    tok = tiny_tokenizers[template]
    encoder = SampleEncoder(tok, template, "truncation", 64)
    windows = encoder.encode(Sample(LONG_Q, LONG_A), 3)
    answer = templates.encode_answer(tok, template, LONG_A)
    prompt = templates.encode_prompt(tok, template, LONG_Q)
    assert len(windows) > 2 and all(len(w) <= 64 and w.truncated for w in windows)
    first = windows[0]
    kept_body = list(first.ids[len(prompt.prefix_ids) : first.untrained - len(prompt.suffix_ids)])
    assert kept_body == prompt.body_ids[: len(kept_body)] and len(kept_body) >= (64 - 3) // 2
    window_prefix = templates.answer_window_prefix(tok, template)
    assert all(list(w.ids[: len(window_prefix)]) == window_prefix for w in windows[1:])
    assert sum((_trained(w) for w in windows), []) == answer  # every answer token trained exactly once


@pytest.mark.parametrize("strategy", ["singlesliding", "doublesliding"])
def test_sliding_covers_the_whole_prompt_and_ends_with_the_query(tiny_tokenizers, strategy: str) -> None:
    tok = tiny_tokenizers["v1"]
    windows = SampleEncoder(tok, "v1", strategy, 48).encode(Sample(NUMBERED_Q, LONG_A), 0)
    body = templates.encode_prompt(tok, "v1", NUMBERED_Q).body_ids
    prompt_windows = [w for w in windows if w.ids[0] != tok.gmask_token_id]
    seen = set()
    for w in prompt_windows:
        text = list(w.ids[: w.untrained - 2])
        start = next(i for i in range(len(body)) if body[i : i + len(text)] == text)
        seen.update(range(start, start + len(text)))
    assert len(prompt_windows) > 2 and seen == set(range(len(body)))
    assert list(prompt_windows[-1].ids[: prompt_windows[-1].untrained - 2]) == body[-len(text) :]
    answer = templates.encode_answer(tok, "v1", LONG_A)
    continuation = [w for w in windows if w.ids[0] == tok.gmask_token_id]
    first_chunk = _trained(prompt_windows[0])
    assert all(_trained(w) == first_chunk for w in prompt_windows)
    assert first_chunk + sum((_trained(w) for w in continuation), []) == answer


def test_doublesliding_answer_windows_overlap_as_untrained_context(tiny_tokenizers) -> None:
    tok = tiny_tokenizers["v2"]
    windows = SampleEncoder(tok, "v2", "doublesliding", 40).encode(Sample("短问题", LONG_A), 0)
    continuation = windows[1:]
    assert continuation and all(w.untrained > 2 for w in continuation)
    previous = windows[0]
    for w in continuation:
        overlap = list(w.ids[2 : w.untrained])
        assert overlap == list(previous.ids[len(previous) - len(overlap) :])
        previous = w


def test_a_sample_that_fits_is_one_window_for_every_strategy(tiny_tokenizers) -> None:
    tok = tiny_tokenizers["v1"]
    results = {
        s: SampleEncoder(tok, "v1", s, 256).encode(Sample("你好", "你好！"), 0)
        for s in ("truncation", "singlesliding", "doublesliding", "packing")
    }
    assert len({tuple(w.ids for w in ws) for ws in results.values()}) == 1


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), max_size=60), capacity=st.integers(50, 120))
def test_packing_places_every_window_once_within_capacity(lengths: list[int], capacity: int) -> None:
    bins = pack_lengths(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity and b == sorted(b) for b in bins)
    assert pack_lengths(lengths, capacity) == bins


def test_packing_fills_sequences_almost_completely() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 280) for _ in range(2000)]
    bins = pack_lengths(lengths, 1024)
    assert sum(lengths) / (len(bins) * 1024) > 0.99

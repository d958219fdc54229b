"""Per-request decoding rules: parameter validation, logits guards and filters, stop-string streaming."""

from __future__ import annotations

import math

import pytest
import torch
from glmtune_inference.generation import (
    GenerationParams,
    TextDeltaDecoder,
    apply_answer_penalties,
    apply_repetition_penalty,
    choose_token,
    choose_tokens,
    filter_top_k_top_p,
    sanitize_logits,
    token_logprobs,
)

from glmtune.errors import InvalidInputError


class CharTokenizer:
    """Token id = one character's code point; enough to test text streaming."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
    ("repetition_penalty", 0.0), ("max_length", 0), ("temperature", math.nan), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5), ("frequency_penalty", math.inf), ("logprobs", 21), ("logprobs", -1),
])
def test_invalid_generation_params_name_the_field(field, value):
    with pytest.raises(InvalidInputError) as err:
        GenerationParams(**{field: value})
    assert err.value.where == field


def test_new_token_budget_respects_max_length_and_max_new_tokens():
    assert GenerationParams(max_length=10).new_token_budget(4) == 6
    assert GenerationParams(max_length=10, max_new_tokens=3).new_token_budget(4) == 3
    assert GenerationParams(max_length=4).new_token_budget(9) == 0


def test_nan_or_inf_logits_become_the_originals_safe_row():
    logits = torch.tensor([[0.5, float("nan"), 1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    fixed = sanitize_logits(logits)
    assert fixed[0].tolist() == [0, 0, 0, 0, 0, 5e4, 0]
    assert torch.equal(fixed[1], logits[1])
    assert choose_token(torch.tensor([float("inf")] * 8), GenerationParams(do_sample=False), torch.empty(0,
                        dtype=torch.long), None) == 5


def test_top_k_and_top_p_keep_only_the_best_tokens():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(scores, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(scores, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(scores, 0, 0.4)).tolist() == [[False, True, True, True]]


def test_repetition_penalty_lowers_tokens_already_seen():
    scores = torch.tensor([[2.0, -1.0, 2.0]])
    out = apply_repetition_penalty(scores, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 2.0]]


def test_greedy_when_sampling_off_or_temperature_zero():
    logits = torch.tensor([0.1, 3.0, 0.2])
    none = torch.empty(0, dtype=torch.long)
    assert choose_token(logits, GenerationParams(do_sample=False), none, None) == 1
    assert choose_token(logits, GenerationParams(temperature=0.0), none, None) == 1


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(50)
    none = torch.empty(0, dtype=torch.long)
    params = GenerationParams(top_p=1.0, temperature=1.0, seed=7)
    first = [choose_token(logits, params, none, g) for g in [torch.Generator().manual_seed(7)] * 5]
    second = [choose_token(logits, params, none, g) for g in [torch.Generator().manual_seed(7)] * 5]
    assert first == second


def test_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    decoder = TextDeltaDecoder(CharTokenizer(), stop=("END",))
    answer = "abc EN"
    deltas = [decoder.push(ids(answer[: i + 1])) for i in range(len(answer))]
    assert "".join(deltas) == "abc "  # "EN" may start "END": not released yet
    assert decoder.push(ids("abc END and more")) == ""
    assert decoder.stopped and decoder.text == "abc "


def test_stream_releases_held_text_when_it_is_not_a_stop_after_all():
    decoder = TextDeltaDecoder(CharTokenizer(), stop=("END",))
    assert decoder.push(ids("x E")) == "x "
    assert decoder.push(ids("x Ex")) == "Ex"
    assert decoder.finish(ids("x ExE")) == "E"
    assert not decoder.stopped


def test_incomplete_utf8_is_not_streamed_until_complete():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    decoder = TextDeltaDecoder(Bytes())
    raw = list("好".encode())
    assert decoder.push(raw[:1]) == ""
    assert decoder.push(raw[:2]) == ""
    assert decoder.push(raw) == "好"


def test_a_tiny_temperature_samples_the_best_token_instead_of_failing():
    logits = torch.tensor([0.1, 3.0, 0.2, -50.0])
    params = GenerationParams(temperature=1e-300, top_p=1.0)
    assert choose_token(logits, params, torch.empty(0, dtype=torch.long), torch.Generator().manual_seed(0)) == 1


def test_a_top_p_that_rounds_to_zero_keeps_the_best_token():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isinf(filter_top_k_top_p(scores, 0, 5e-324)).tolist() == [[False, True, True]]


def test_sampling_follows_the_distribution_and_never_picks_filtered_tokens():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1, 1e-9]))
    params = GenerationParams(temperature=1.0, top_p=0.85)
    rng = torch.Generator().manual_seed(1)
    draws = [choose_token(logits, params, torch.empty(0, dtype=torch.long), rng) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(0) / len(draws) - 2 / 3) < 0.05


def test_a_batch_of_rows_gets_exactly_the_tokens_each_row_gets_alone():
    import random

    rnd = random.Random(0)
    vocab = 1001  # not a multiple of any SIMD width: row ends take the kernels' tail paths
    for _ in range(20):
        rows = rnd.randint(1, 9)
        logits = torch.randn(rows, vocab) * rnd.choice([1.0, 5.0, 30.0])
        if rnd.random() < 0.3:
            logits[0, 3] = float("nan")  # the guard replaces only this row
        if rnd.random() < 0.3:
            logits[-1, :4] = 3e38  # finite, but the row sum overflows: the full guard must leave it alone
        params = [GenerationParams(temperature=rnd.choice([0.0, 0.3, 1.0, 1.7]), top_p=rnd.choice([1.0, 0.7]),
                                   top_k=rnd.choice([0, 0, 5]), repetition_penalty=rnd.choice([1.0, 1.3]),
                                   do_sample=rnd.random() > 0.1) for _ in range(rows)]
        seen = [torch.randint(0, vocab, (rnd.randint(0, 12),)) for _ in range(rows)]
        seeds = [rnd.randint(0, 10**6) for _ in range(rows)]
        before = logits.clone()
        alone = [choose_token(logits[i], params[i], seen[i], torch.Generator().manual_seed(seeds[i]))
                 for i in range(rows)]
        batched = choose_tokens(logits, params, seen, [torch.Generator().manual_seed(s) for s in seeds])
        assert batched == alone
        assert torch.equal(logits.nan_to_num(), before.nan_to_num())  # the model's logits are not modified
        if logits[-1, 0] == 3e38 and params[-1].greedy and params[-1].repetition_penalty == 1.0:
            assert batched[-1] == 0


def test_broken_rows_choose_the_safe_token_in_a_batch_without_touching_good_rows():
    """Greedy and sampled rows alike: a NaN/Inf row gives token 5 (the original's safe row), its neighbours
    their own best token; the check is exact for huge but finite scores (no overflow in the row sums)."""
    good = torch.zeros(130).index_fill(0, torch.tensor([42]), 9.0)
    huge = torch.full((130,), 3e38).index_fill(0, torch.tensor([7]), 3.3e38)
    broken = good.clone().index_fill(0, torch.tensor([3]), float("nan"))
    logits = torch.stack([broken, good, huge, broken.clone().fill_(float("-inf"))])
    params = [GenerationParams(do_sample=False), GenerationParams(do_sample=False), GenerationParams(do_sample=False),
              GenerationParams(temperature=0.95, top_p=0.7)]
    none = [torch.empty(0, dtype=torch.long)] * 4
    assert choose_tokens(logits, params, none, [None, None, None, torch.Generator().manual_seed(0)]) == [5, 42, 7, 5]


def test_frequency_penalty_counts_each_occurrence_and_presence_penalty_counts_once():
    scores = torch.zeros(6)
    answer = torch.tensor([2, 2, 2, 4])
    got = apply_answer_penalties(scores, answer, presence=0.5, frequency=0.25)
    assert got.tolist() == [0.0, 0.0, -1.25, 0.0, -0.75, 0.0]
    assert apply_answer_penalties(scores, torch.tensor([], dtype=torch.long), 0.5, 0.25).tolist() == [0.0] * 6


def test_answer_penalties_steer_greedy_choice_away_from_repeats_but_not_the_prompt():
    logits = torch.tensor([0.0, 3.0, 2.5, 0.0])
    params = GenerationParams(do_sample=False, frequency_penalty=1.0)
    seen = torch.tensor([1, 1])  # the prompt repeats token 1: these penalties ignore it
    assert choose_token(logits, params, seen, None, answer_ids=torch.tensor([], dtype=torch.long)) == 1
    assert choose_token(logits, params, seen, None, answer_ids=torch.tensor([1])) == 2
    negative = GenerationParams(do_sample=False, presence_penalty=-2.0)  # a negative penalty favours repeats
    assert choose_token(logits, negative, seen, None, answer_ids=torch.tensor([2])) == 2


def test_token_logprobs_are_the_models_log_softmax_with_the_best_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    got = token_logprobs(logits, [2, 2], [2, 0])
    expected = logits.log_softmax(-1)
    assert got[0].token_id == 2 and got[0].logprob == pytest.approx(expected[0, 2].item())
    assert [t for t, _ in got[0].top] == [1, 2]
    assert [v for _, v in got[0].top] == pytest.approx(expected[0, [1, 2]].tolist())
    assert got[1].top == () and got[1].logprob == pytest.approx(expected[1, 2].item())

"""Batching must not change answers: greedy decoding in a shared left-padded batch, with requests joining
and leaving at different steps, gives exactly the tokens each request gets alone."""

from __future__ import annotations

import pytest
import torch
from glmtune_inference.batching import DecodeBatch, DecodeSequence
from glmtune_inference.generation import TextDeltaDecoder

QUERIES = ("你好", "从南京到上海的路线", "Hello, world! How are you doing today?", "什么是机器学习？请介绍一下。")


def new_sequence(model, query, max_new_tokens=16):
    params = model.params(do_sample=False, max_new_tokens=max_new_tokens)
    return DecodeSequence(model.encode(query), params, TextDeltaDecoder(model.tokenizer))


def alone(model, query, max_new_tokens=16):
    batch = DecodeBatch(model.model, model.prefix_len)
    seq = new_sequence(model, query, max_new_tokens)
    batch.prefill(seq)
    while not seq.finished:
        batch.step()
        batch.remove_finished()
    return seq.generated


def staggered(model, queries, budgets):
    """Requests join after different numbers of steps and, with different budgets, leave at different steps."""
    batch = DecodeBatch(model.model, model.prefix_len)
    seqs = [new_sequence(model, q, n) for q, n in zip(queries, budgets, strict=True)]
    batch.prefill(seqs[0])
    batch.step()
    batch.step()
    batch.prefill(seqs[1])
    batch.step()
    batch.remove_finished()
    for seq in seqs[2:]:
        batch.prefill(seq)
    widths = []
    while len(batch):
        widths.append(len(batch))
        batch.step()
        batch.remove_finished()
    return [s.generated for s in seqs], widths


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("kind", ["base", "full", "prefix"])
def test_greedy_batched_tokens_equal_unbatched(exports, served, family, kind):
    model = next(iter(served(exports.get(kind, family)).values()))
    budgets = (5, 16, 9, 16)
    expected = [alone(model, q, n) for q, n in zip(QUERIES, budgets, strict=True)]
    got, widths = staggered(model, QUERIES, budgets)
    assert max(widths) >= 3, "the scenario must really batch"
    assert got == expected


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("kind", ["base", "prefix"])
def test_requests_prefilled_together_get_the_tokens_they_get_alone(exports, served, family, kind):
    model = next(iter(served(exports.get(kind, family)).values()))
    budgets = (6, 12, 9, 12)
    expected = [alone(model, q, n) for q, n in zip(QUERIES, budgets, strict=True)]
    batch = DecodeBatch(model.model, model.prefix_len)
    seqs = [new_sequence(model, q, n) for q, n in zip(QUERIES, budgets, strict=True)]
    batch.prefill(seqs[0])
    batch.step()
    # Three arrivals of different prompt lengths in one left-padded forward, joining a running request.
    first = batch.prefill_many(seqs[1:])
    assert [seq for seq, _ in first] == seqs[1:] and len(batch) == 4
    while len(batch):
        batch.step()
        batch.remove_finished()
    assert [s.generated for s in seqs] == expected


def test_prompts_of_very_different_lengths_are_not_padded_to_each_other():
    from glmtune_inference.batching import _length_groups
    from glmtune_inference.generation import GenerationParams

    def seq(n):
        return DecodeSequence(list(range(5, 5 + n)), GenerationParams(max_new_tokens=4), TextDeltaDecoder(None))

    long, mid, shorts = seq(1500), seq(1100), [seq(n) for n in (9, 14, 30)]
    groups = _length_groups([shorts[0], long, shorts[1], mid, shorts[2]])
    assert groups == [[long, mid], shorts[::-1]]


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_decoding_matches_transformers_generate(exports, served, family):
    model = next(iter(served(exports.get("base", family)).values()))
    for query in QUERIES[:2]:
        ids = torch.tensor([model.encode(query)])
        out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=12, eos_token_id=list(model.params().stop_token_ids),
                                   pad_token_id=model.tokenizer.pad_token_id)
        reference = [t for t in out[0, ids.shape[1]:].tolist() if t not in model.params().stop_token_ids]
        assert alone(model, query, 12)[: len(reference)] == reference


def test_finished_and_cancelled_requests_leave_and_the_cache_shrinks(exports, served):
    model = next(iter(served(exports.get("base", "v2")).values()))
    batch = DecodeBatch(model.model, model.prefix_len)
    long_prompt, short_prompt = new_sequence(model, QUERIES[3] * 3), new_sequence(model, "你好")
    batch.prefill(long_prompt)
    batch.prefill(short_prompt)
    width_before = batch._mask.shape[1]
    long_prompt.cancelled = True
    gone = batch.remove_finished()
    assert gone == [long_prompt] and long_prompt.finish_reason == "cancelled"
    assert batch._mask.shape[1] == len(short_prompt.prompt_ids) < width_before
    assert batch._cache.layers[0].keys.shape[2] == len(short_prompt.prompt_ids)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_the_model_places_decode_tokens_itself(exports, served, family):
    """The batcher asks the model for decode positions (it knows no family): ChatGLM-6B's are the last column of
    its 2D positions over prompt + answer, for adapters too; ChatGLM2 derives its own (None)."""
    from glmtune.modeling.chatglm6b_masks import glm_position_ids

    models = served(exports.get("base", family), {"lora": exports.get("adapter", family)}, name="glm")
    for served_model in models.values():
        prompts = [served_model.encode(q) for q in QUERIES[:2]]
        got = served_model.model.decode_position_ids(prompts, [0, 3])
        if family == "v2":
            assert got is None
            continue
        config = served_model.model.config
        for row, (prompt, answered) in enumerate(zip(prompts, [0, 3], strict=True)):
            ids = torch.tensor([prompt + [7] * answered])
            full = glm_position_ids(ids, bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
                                    gmask_token_id=config.gmask_token_id)
            assert got[row].tolist() == full[0, :, -1:].tolist()

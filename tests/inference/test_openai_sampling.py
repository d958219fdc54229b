"""The OpenAI sampling fields for real (official client, uvicorn on 127.0.0.1): `n` choices from one shared
prefill, `logprobs`/`top_logprobs`, `seed`, presence/frequency penalties, `max_completion_tokens`, and
`/v1/completions` for raw prompts, streamed and not."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from glmtune_inference.batching import DecodeBatch, DecodeSequence
from glmtune_inference.generation import TextDeltaDecoder

from glmtune.templates import render_prompt


@pytest.fixture(scope="module", params=["v1", "v2"])
def glm(request, exports, served, server_factory):
    """The fine-tuned model ("glm") and the untrained base ("base", whose samples vary) of one family."""
    models = {**served(exports.get("full", request.param), name="glm"),
              **served(exports.get("base", request.param), name="base")}
    with server_factory(models, max_prompt_tokens=200, max_tokens_limit=64) as running:
        running.family = request.param
        yield running


@pytest.fixture(scope="module")
def qa(trained_qa):
    return trained_qa["full"]


def client(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(running, query, model="glm", **extra):
    return client(running).chat.completions.create(model=model, messages=[{"role": "user", "content": query}],
                                                   **extra)


def test_n_greedy_choices_are_each_the_trained_answer(glm, qa):
    query, answer = qa[0]
    one = chat(glm, query, temperature=0)
    reply = chat(glm, query, temperature=0, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [answer] * 3
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_streamed_choices_each_get_their_text_and_finish(glm, qa):
    query, answer = qa[1]
    chunks = list(chat(glm, query, temperature=0, n=2, stream=True))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(choice.delta.content or "" for choice in mine) == answer
        assert mine[-1].finish_reason == "stop"


def test_the_choices_of_one_prompt_share_one_prefill_row(exports, served):
    """n choices are n sequences with one prompt: the prefill forward runs it once, and each choice decodes on."""
    (model,) = served(exports.get("full", "v2")).values()
    rows = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        batch = DecodeBatch(model.model, model.prefix_len)
        seqs = [DecodeSequence(model.encode("你好"), model.params(do_sample=False, max_new_tokens=8),
                               TextDeltaDecoder(model.tokenizer)) for _ in range(3)]
        batch.prefill_many(seqs)
        while len(batch):
            batch.step()
            batch.remove_finished()
    finally:
        hook.remove()
    assert rows[0][0] == 1 and rows[0][1] == len(seqs[0].prompt_ids)
    assert rows[1] == torch.Size([3, 1])
    assert seqs[0].generated == seqs[1].generated == seqs[2].generated


def test_the_same_seed_gives_the_same_samples_and_choices_differ(glm):
    def sample(seed):
        reply = chat(glm, "你好", model="base", temperature=1.5, max_tokens=12, n=3, seed=seed)
        return [c.message.content for c in reply.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) > 1, "each choice must draw its own sample"
    assert sample(8) != first


def test_logprobs_of_a_greedy_answer_name_each_token_and_its_best_alternatives(glm, qa):
    query, answer = qa[0]
    reply = chat(glm, query, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the best one
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
    assert b"".join(bytes(item.bytes) for item in content).decode().strip() == answer.strip()
    streamed = [item for chunk in chat(glm, query, temperature=0, logprobs=True, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [(i.token, round(i.logprob, 4)) for i in content]
    assert all(item.top_logprobs == [] for item in streamed)
    assert chat(glm, query, temperature=0).choices[0].logprobs is None


def test_frequency_and_presence_penalties_break_the_base_models_repeats(glm):
    def tokens(**penalties):
        reply = chat(glm, "你好", model="base", temperature=0, max_tokens=24, logprobs=True, **penalties)
        return [item.token for item in reply.choices[0].logprobs.content]

    plain = tokens()
    assert len(set(plain)) < len(plain), "the untrained base repeats tokens greedily"
    assert len(set(tokens(frequency_penalty=2.0))) > len(set(plain))
    assert len(set(tokens(presence_penalty=2.0))) > len(set(plain))


def test_max_completion_tokens_cuts_with_finish_reason_length(glm, qa):
    reply = chat(glm, qa[0][0], temperature=0, max_completion_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_completions_continue_a_raw_prompt(glm, qa):
    """The chat template rendered by hand is a raw prompt like any other: the trained answer follows it."""
    query, answer = qa[0]
    prompt = render_prompt(glm.family, query)
    api = client(glm)
    reply = api.completions.create(model="glm", prompt=prompt, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == answer and reply.choices[0].finish_reason == "stop"
    chunks = list(api.completions.create(model="glm", prompt=prompt, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_take_several_prompts_n_each_echo_and_logprobs(glm, qa):
    prompts = [render_prompt(glm.family, q) for q, _ in qa]
    api = client(glm)
    reply = api.completions.create(model="glm", prompt=prompts, n=2, temperature=0, max_tokens=24)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [qa[0][1], qa[0][1], qa[1][1], qa[1][1]]
    echoed = api.completions.create(model="glm", prompt=prompts[0], echo=True, temperature=0)
    assert echoed.choices[0].text == prompts[0] + qa[0][1]
    scored = api.completions.create(model="glm", prompt=prompts[0], logprobs=2, temperature=0)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == scored.usage.completion_tokens
    assert all(len(top) <= 2 and token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


@pytest.mark.parametrize(("extra", "param"), [
    ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"echo": True, "logprobs": 1}, "echo"),
    ({"logprobs": 6}, "logprobs"), ({"prompt": "你好" * 400}, "prompt"), ({"prompt": ["a", "你好" * 400]}, "prompt[1]"),
    ({"max_tokens": 65}, "max_tokens"), ({"n": 17}, "n"),
])
def test_completions_out_of_bounds_get_400_naming_the_field(glm, extra, param):
    request = {"model": "glm", "prompt": "你好", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client(glm).completions.create(**request)
    assert caught.value.param == param, caught.value.body


@pytest.mark.parametrize("stream", [False, True])
def test_time_to_first_token_is_measured_once_per_request(glm, qa, stream):
    """One request of three choices, streamed or not, is one time-to-first-token observation."""

    def observations() -> float:
        text = httpx.get(f"{glm.url}/metrics", timeout=30).text
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("glmtune_time_to_first_token_seconds_count"))

    before = observations()
    reply = chat(glm, qa[0][0], temperature=0, n=3, stream=stream)
    if stream:
        list(reply)
    assert observations() == before + 1

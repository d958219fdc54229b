"""`chat()` / `stream_chat()` on tiny models fine-tuned by the tests: the trained answers come back."""

from __future__ import annotations

import pytest
from glmtune_inference.chat import ChatModel


@pytest.fixture(scope="module", params=["v1", "v2"])
def trained(request, exports, served):
    return ChatModel(next(iter(served(exports.get("full", request.param)).values())))


@pytest.fixture(scope="module")
def qa(trained_qa):
    return trained_qa["full"]


def test_chat_returns_the_trained_answers(trained, qa):
    for query, answer in qa:
        response, history = trained.chat(query, do_sample=False)
        assert response == answer
        assert history == [(query, answer)]
        assert trained.last_finish_reason == "stop"


def test_chat_keeps_the_callers_history(trained, qa):
    past = [("你好", "你好！")]
    _, history = trained.chat(qa[1][0], past, do_sample=False, max_new_tokens=4)
    assert history[:1] == past and history[1][0] == qa[1][0]


def test_stream_chat_deltas_add_up_to_the_chat_answer(trained, qa):
    deltas = list(trained.stream_chat(qa[1][0], do_sample=False))
    assert len(deltas) > 1
    assert "".join(deltas) == qa[1][1]


def test_stop_sequence_ends_the_answer_before_it(trained, qa):
    query, answer = qa[0]
    stop = answer[3:5]
    response, _ = trained.chat(query, do_sample=False, stop=(stop,))
    assert response == answer[: answer.index(stop)]
    assert trained.last_finish_reason == "stop"


def test_max_new_tokens_ends_with_length(trained, qa):
    response, _ = trained.chat(qa[0][0], do_sample=False, max_new_tokens=2)
    assert trained.last_finish_reason == "length"
    assert qa[0][1].startswith(response) and response != qa[0][1]


def test_sampling_with_a_seed_is_reproducible(trained):
    first = trained.chat("随便说点什么", temperature=1.0, top_p=0.9, top_k=50, seed=3, max_new_tokens=8)[0]
    second = trained.chat("随便说点什么", temperature=1.0, top_p=0.9, top_k=50, seed=3, max_new_tokens=8)[0]
    assert first == second


def test_glmtune_chat_streams_answers_and_keeps_history(exports, trained_qa, monkeypatch, capsys):
    import io

    from glmtune_app.cli import main

    (first_q, first_a), (second_q, second_a) = trained_qa["full"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first_q}\nclear\n{second_q}\nexit\n"))
    assert main(["chat", str(exports.get("full", "v2")), "--greedy"]) == 0
    out = capsys.readouterr().out
    assert first_a in out and second_a in out

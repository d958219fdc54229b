"""Serving memory: finished requests give their KV cache back, a request that would not fit the KV budget waits
in the queue (429 once the queue is full, 503 if it could never fit) instead of running the device out of
memory, a forward that does run out fails only its own requests (503) while the server goes on, and /metrics
shows the memory in use."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from glmtune_inference.batching import DecodeBatch, DecodeSequence
from glmtune_inference.generation import TextDeltaDecoder
from glmtune_inference.memory import batch_need, kv_bytes_per_token, request_tokens


def _chat(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "base", "messages": [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": max_tokens, "stream": stream}


@pytest.fixture(scope="module")
def base_v2(exports: Any, served: Any) -> dict:
    """The untrained v2 base: it never says eos, so a request runs exactly max_tokens tokens."""
    return served(exports.get("base", "v2"), name="base")


def test_kv_bytes_per_token_follow_layers_kv_heads_head_dim_and_dtype(base_v2: dict) -> None:
    model = base_v2["base"].model
    c = model.config
    assert kv_bytes_per_token(model) == c.num_layers * 2 * c.multi_query_group_num * c.kv_channels * 4
    assert batch_need(10, [5, 9, 7]) == 10 * 3 * 9  # every row of a left-padded batch is as wide as the widest


def test_finished_requests_leave_the_cache_and_free_their_rows(base_v2: dict) -> None:
    served = base_v2["base"]
    batch = DecodeBatch(served.model, served.prefix_len)
    seqs = [DecodeSequence(served.encode("你好"), served.params(max_new_tokens=n, do_sample=False),
                     TextDeltaDecoder(served.tokenizer)) for n in (2, 4, 30)]
    batch.prefill_many(seqs)
    assert batch._cache.layers[0].keys.shape[0] == 3
    full = batch.kv_bytes()
    while not seqs[1].finished:
        batch.step()
        batch.remove_finished()
    assert [s.finished for s in seqs] == [True, True, False]
    assert batch._cache.layers[0].keys.shape[0] == 1 and batch._cache.layers[0]._key_room.shape[0] == 1
    assert 0 < batch.kv_bytes() < full / 2
    while not seqs[2].finished:
        batch.step()
        batch.remove_finished()
    assert batch._cache is None and batch.kv_bytes() == 0


def test_kv_budget_queues_what_does_not_fit_yet_and_refuses_what_never_fits(base_v2: dict,
                                                                          server_factory: Any) -> None:
    """Budget for one request: a second waits in the queue (never sharing a forward with the first), a third
    finds the queue full (429), one that could never fit gets 503, and the waiting one runs once memory frees."""
    served = base_v2["base"]
    # 1200 tokens: the first request must still be decoding while the second queues and the third is refused
    # (300 finished too soon under load once the CPU decode-attention path made tiny models faster)
    one = batch_need(kv_bytes_per_token(served.model), [request_tokens(len(served.encode("你好")), 1200)])
    with server_factory(base_v2, kv_budget=one + one // 2, queue_size=1) as running, \
            httpx.Client(base_url=running.url, timeout=60) as client:
        never = client.post("/v1/chat/completions", json=_chat(2000))
        assert never.status_code == 503 and "fewer max_tokens" in never.json()["error"]["message"]
        answers: list[httpx.Response] = []
        with client.stream("POST", "/v1/chat/completions", json=_chat(1200, stream=True)) as first:
            lines = first.iter_lines()
            next(lines)  # the first request is running
            second = threading.Thread(target=lambda: answers.append(client.post("/v1/chat/completions",
                                                                                json=_chat(1200))))
            second.start()
            wait_for(lambda: running.engine.queue_depth == 1)  # it waits: the budget holds one request
            assert running.engine.running == 1
            busy = client.post("/v1/chat/completions", json=_chat(5))
            assert busy.status_code == 429 and busy.headers["Retry-After"]
            ready = client.get("/readyz")  # busy is still ready: a full pod must stay in its Service
            assert ready.status_code == 200 and ready.json()["busy"] is True
            assert "data: [DONE]" in list(lines)
        second.join(60)
        assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 1200
        metrics = client.get("/metrics").text
        assert _metric(metrics, "glmtune_kv_budget_bytes") == float(one + one // 2)
        forwards = _metric(metrics, "glmtune_batch_size_count")
        assert _metric(metrics, 'glmtune_batch_size_bucket{le="1.0"}') == forwards > 0  # never two at once
        assert running.engine.kv_reserved_bytes == 0


def _metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@contextlib.contextmanager
def out_of_memory_when(model: torch.nn.Module, rows: int, new_tokens: int) -> Iterator[list[int]]:
    """Make the model's forward raise torch.OutOfMemoryError for inputs of shape [rows, new_tokens] (what a CUDA
    allocator raises when a batch outgrows the GPU); yields the list of shapes that failed."""
    failed: list[int] = []

    def check(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and tuple(ids.shape[:1]) == (rows,) and (new_tokens == 0 or ids.shape[1] == new_tokens):
            failed.append(ids.shape[1])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield failed
    finally:
        handle.remove()


@pytest.mark.parametrize(("where", "new_tokens"), [("prefill", 0), ("decode", 1)])
def test_out_of_memory_in_a_forward_fails_its_requests_with_503_and_the_server_goes_on(
        exports: Any, served: Any, server_factory: Any, where: str, new_tokens: int) -> None:
    models = served(exports.get("base", "v2"), name="base", dtype="float32")  # a model of its own for the hook
    model = models["base"].model
    with server_factory(models) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        with out_of_memory_when(model, rows=2, new_tokens=new_tokens) as failed:
            answers: list[httpx.Response] = []
            barrier = threading.Barrier(2)

            def ask() -> None:
                barrier.wait()
                answers.append(client.post("/v1/chat/completions", json=_chat(20)))

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert failed, f"no forward of 2 rows at {where}: the two requests did not share a batch"
            assert [a.status_code for a in answers] == [503, 503]
            assert "out of device memory" in answers[0].json()["error"]["message"]
            alone = client.post("/v1/chat/completions", json=_chat(5))  # one row: no failure, server alive
            assert alone.status_code == 200 and alone.json()["usage"]["completion_tokens"] == 5
        assert running.engine.running == 0 and running.engine.kv_cache_bytes == 0
        metrics = client.get("/metrics").text
        assert 'glmtune_generations_total{model="base",reason="out_of_memory"} 2.0' in metrics


def test_metrics_report_device_memory_and_kv_cache_bytes(base_v2: dict, server_factory: Any) -> None:
    with server_factory(base_v2) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        assert client.post("/v1/chat/completions", json=_chat(3)).status_code == 200
        lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
                 if line.startswith("glmtune_") and " " in line}
    device = str(next(base_v2["base"].model.parameters()).device)
    assert lines[f'glmtune_device_memory_bytes{{device="{device}"}}'] > 10 * 2**20  # at least the interpreter
    assert lines["glmtune_kv_cache_bytes"] == 0.0  # nothing running any more
    assert not any(name.startswith("glmtune_kv_budget_bytes") for name in lines)  # no budget on CPU

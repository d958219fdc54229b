"""Benchmark serving the small v1 model on CPU: batch-1 generation with the KV cache, then the real server
(uvicorn on 127.0.0.1) with 1 streaming client vs 8 concurrent streaming clients (aggregate tokens/s, target
>= 4x) and time-to-first-token p50/p95 under that load.

The model is random-initialised "small" ChatGLM-6B (4 layers, hidden 512, 8 heads, inner 2048) with the real
ice_text.model vocabulary from ../shared when present (else the tiny tokenizer; the output projection, and
so the timings, then differ). Random weights answer greedy requests with special tokens (no text), so
requests sample (temperature 1, top_p 1, a seed each); the server runs as `glmtune serve` in its own process,
as deployed, and the clients (httpx, streaming) in this one.

    OMP_NUM_THREADS=2 python bench/bench_serve.py            # prints a table and appends it to RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import record

REAL_V1_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/reference/vectors/tokenizers/chatglm6b"
QUERIES = ("你好", "从南京到上海的路线", "请介绍一下你自己。", "什么是机器学习？", "如何学习编程？",
           "请帮我写一首关于春天的诗。", "今天天气怎么样？", "健康的生活方式包括哪些？")


def build_small_v1(out: Path) -> str:
    """Write the small v1 model (real vocabulary when ../shared has it); returns a note on the vocabulary."""
    import torch

    from glmtune.modeling import create_model_dir, save_pretrained
    from glmtune.modeling.checkpoint import model_classes
    from glmtune.modeling.tiny import tiny_config
    from glmtune.tokenization import load_tokenizer

    if not (REAL_V1_TOKENIZER / "ice_text.model").is_file():
        create_model_dir("v1", "small", out, seed=0)
        return "tiny tokenizer vocabulary (../shared absent)"
    tokenizer = load_tokenizer(REAL_V1_TOKENIZER)
    torch.manual_seed(0)
    _, model_class = model_classes("v1")
    save_pretrained(model_class(tiny_config("v1", "small", tokenizer)), out, tokenizer=tokenizer)
    return f"real ice_text.model vocabulary ({len(tokenizer)} tokens)"


def bench_batch1(served, new_tokens: int) -> dict:
    """Tokens/s of one request decoded alone (prefill excluded), as chat() runs it."""
    from glmtune_inference.batching import DecodeBatch, DecodeSequence
    from glmtune_inference.generation import TextDeltaDecoder

    params = served.params(temperature=1.0, top_p=1.0, seed=0, max_new_tokens=new_tokens)
    batch = DecodeBatch(served.model, served.prefix_len)
    seq = DecodeSequence(served.encode(QUERIES[1]), params, TextDeltaDecoder(served.tokenizer))
    batch.prefill(seq)
    start = time.perf_counter()
    while not seq.finished:
        batch.step()
        batch.remove_finished()
    elapsed = time.perf_counter() - start
    return {"tokens": len(seq.generated) - 1, "seconds": elapsed, "tok_s": (len(seq.generated) - 1) / elapsed}


async def stream_one(client, query: str, new_tokens: int, seed: int) -> tuple[float, float, int]:
    """(time to first content, total time, generated tokens) of one streamed request."""
    body = {"model": "small", "messages": [{"role": "user", "content": query}], "temperature": 1.0, "top_p": 1.0,
            "seed": seed, "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), time.perf_counter() - start, tokens


async def bench_clients(url: str, clients: int, new_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream_one(client, QUERIES[0], 2, 0)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, QUERIES[i % len(QUERIES)], new_tokens, i)
                                         for i in range(clients)))
        elapsed = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * len(ttft)) - 1)]}


def start_server(model_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`glmtune serve` in a child process; returns it and its URL once /readyz answers."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "glmtune_app.cli", "serve", str(model_dir), "--model-name", "small",
               "--port", str(port), "--max-batch", str(max_batch)]
    child = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise RuntimeError(f"the server did not become ready: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=60).status_code == 200:
                return child, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--no-record", action="store_true", help="do not append the table to bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from glmtune_inference.loading import load_served_models

    with tempfile.TemporaryDirectory() as scratch:
        vocab_note = build_small_v1(Path(scratch) / "small-v1")
        served = next(iter(load_served_models(str(Path(scratch) / "small-v1")).values()))
        alone = bench_batch1(served, args.new_tokens)
        del served
        server, url = start_server(Path(scratch) / "small-v1", max_batch=args.clients)
        try:
            one = asyncio.run(bench_clients(url, 1, args.new_tokens))
            many = asyncio.run(bench_clients(url, args.clients, args.new_tokens))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    ratio = many["tok_s"] / one["tok_s"]
    table = "\n".join([
        f"v1 small (4 layers, hidden 512, 8 heads, inner 2048), fp32, {vocab_note}; sampling, up to "
        f"{args.new_tokens} new tokens per request",
        "",
        "| measurement | tokens/s | detail |",
        "|---|---|---|",
        f"| batch 1, KV cache (in-process) | {alone['tok_s']:.1f} | {alone['tokens']} tokens in {alone['seconds']:.2f} s |",
        f"| server, 1 streaming client | {one['tok_s']:.1f} | TTFT {one['ttft_p50'] * 1000:.0f} ms |",
        f"| server, {args.clients} streaming clients (aggregate) | {many['tok_s']:.1f} | TTFT p50 "
        f"{many['ttft_p50'] * 1000:.0f} ms, p95 {many['ttft_p95'] * 1000:.0f} ms |",
        "",
        f"{args.clients} clients vs 1: {ratio:.2f}x (target >= 4x)",
    ])
    print(table)
    if not args.no_record:
        record("bench_serve.py", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

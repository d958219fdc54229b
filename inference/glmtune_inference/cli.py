"""`glmtune chat MODEL_URI` (interactive terminal chat) and `glmtune serve MODEL_URI` (the HTTP server).

Registration stays torch-free; the handlers import the heavy modules when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import get_args

from glmtune.errors import InvalidInputError
from glmtune.spec.model import ServingDtype

API_KEY_ENV = "GLMTUNE_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `chat` and `serve` commands."""
    chat = subparsers.add_parser("chat", help="chat with a model in the terminal (streaming, with history)",
                                 description="Interactive chat: type a message; 'clear' forgets the history, "
                                             "'exit' or Ctrl-D quits.")
    chat.add_argument("model", metavar="MODEL_URI", help="model folder or s3:// prefix (any export kind)")
    chat.add_argument("--adapter", metavar="URI", help="adapter or prefix export to apply over MODEL_URI")
    chat.add_argument("--system", help="system text put before the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.95)
    chat.add_argument("--top-p", type=float, default=0.7)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    _add_load_options(chat)
    chat.set_defaults(func=run_chat)

    serve = subparsers.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                                  description=f"Serve MODEL_URI (and adapters) over HTTP. The API key, if any, "
                                              f"is read from ${API_KEY_ENV}.")
    serve.add_argument("model", metavar="MODEL_URI", help="model folder or s3:// prefix (any export kind)")
    serve.add_argument("--adapter", metavar="NAME=URI", action="append", default=[],
                       help="serve an adapter/prefix export over the model as model name NAME (repeatable)")
    serve.add_argument("--model-name", help="name clients use for MODEL_URI (default: the run's spec name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together per step")
    serve.add_argument("--queue-size", type=int, default=64, help="waiting requests before answering 429")
    serve.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048)
    serve.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    serve.add_argument("--default-max-tokens", type=int, default=512)
    serve.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish streams on shutdown")
    serve.add_argument("--drain-notice", type=float, default=0.0, metavar="SECONDS",
                       help="after SIGTERM, keep listening this long while answering new requests and /readyz "
                            "with 503 (so a Service stops routing here), then shut down")
    serve.add_argument("--log-prompts", action="store_true", help="include prompts and answers in access logs")
    serve.add_argument("--max-kv-memory", type=kv_memory_size, metavar="SIZE",
                       help="KV cache bytes the running requests may grow to (e.g. 2GiB): a request waits in the "
                            "queue until it fits, one that could never fit gets 503 (default: 80%% of the GPU "
                            "memory free after loading on CUDA, no limit on CPU)")
    _add_load_options(serve)
    serve.set_defaults(func=run_serve)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                        help="where the model runs (default auto: the GPU when torch can use one, else the CPU)")
    parser.add_argument("--dtype", choices=get_args(ServingDtype), default="auto",
                        help="weights and activations dtype (default auto: float32 on CPU, bfloat16 on GPUs "
                             "that support it, else float16)")
    parser.add_argument("--quantize", type=quantize_bits, metavar="{4,8,none}",
                        help="weight-only int4/int8 quantize the base at load, or 'none' (0) for full precision "
                             "(default: as the export records, e.g. the int4 base a ptv2-int4 run trained over)")
    parser.add_argument("--cache-dir", help="where s3:// models are downloaded (default $GLMTUNE_CACHE)")
    parser.add_argument("--allow-base-mismatch", action="store_true",
                        help="apply adapter/prefix exports over a base whose fingerprint differs from the one they "
                             "were trained over (refused by default: the answers silently lose quality)")


def quantize_bits(value: str) -> int:
    """`--quantize` values: 4 or 8 bits, or none/0 for full precision."""
    text = value.strip().lower()
    if text in ("none", "0"):
        return 0
    if text in ("4", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 4, 8 or none, not {value!r}")


def kv_memory_size(value: str) -> int:
    """`--max-kv-memory` values: a positive size such as 2GiB, 512MB or a byte count."""
    from glmtune.modeling.checkpoint import parse_size

    try:
        size = parse_size(value)
    except InvalidInputError:
        raise argparse.ArgumentTypeError(f"cannot read a size from {value!r} (e.g. 2GiB, 512MB)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value!r}")
    return size


def _load_options(args: argparse.Namespace):
    from glmtune_inference.loading import LoadOptions

    return LoadOptions(dtype=args.dtype, quantization_bit=args.quantize, cache_dir=args.cache_dir,
                       device=args.device, allow_base_mismatch=args.allow_base_mismatch)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`NAME=URI` pairs as a dict; a malformed or repeated NAME is an input error."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not name or not uri:
            raise InvalidInputError("expected NAME=URI", where=f"--adapter {spec}")
        if name in adapters:
            raise InvalidInputError(f"adapter name {name!r} given twice", where=f"--adapter {spec}")
        adapters[name] = uri
    return adapters


def run_chat(args: argparse.Namespace) -> int:
    """Read a line, stream the answer, keep the history; 'clear' resets it, 'exit'/EOF quits."""
    from glmtune_inference.chat import ChatModel

    model = ChatModel.load(args.model, args.adapter, _load_options(args))
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "do_sample": not args.greedy}
    model.served.params(**params)  # reject bad values before the first prompt
    history: list[tuple[str, str]] = []
    print(f"glmtune chat: {args.model} ('clear' forgets the history, 'exit' or Ctrl-D quits)", file=sys.stderr)
    while True:
        try:
            query = input("\n用户: ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if query in ("exit", "quit", "stop"):
            return 0
        if query == "clear":
            history = []
            continue
        if not query:
            continue
        print("\nChatGLM: ", end="", flush=True)
        answer = []
        for delta in model.stream_chat(query, history, args.system, **params):
            answer.append(delta)
            print(delta, end="", flush=True)
        print(flush=True)
        history.append((query, "".join(answer)))


def run_serve(args: argparse.Namespace) -> int:
    """Handler of `glmtune serve`: its flags as `serving.serve` arguments."""
    from glmtune_inference.serving import ServeOptions, serve

    options = ServeOptions(
        max_batch=args.max_batch, queue_size=args.queue_size, request_timeout_s=args.request_timeout,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
        default_max_tokens=args.default_max_tokens, drain_timeout_s=args.drain_timeout,
        drain_notice_s=args.drain_notice, log_prompts=args.log_prompts, max_kv_memory=args.max_kv_memory)
    serve(args.model, args.model_name, args.host, args.port, parse_adapters(args.adapter), _load_options(args),
          options, api_key=os.environ.get(API_KEY_ENV) or None)
    return 0



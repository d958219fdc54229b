"""`serve(uri, ...)`: load a model (and adapters) and run the OpenAI-compatible server until SIGINT/SIGTERM.

The one way to start serving: `glmtune serve` parses its flags into these arguments, and `glmtune run --serve`
(the app layer) calls it directly with the spec's `serving` settings. Torch loads only when it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError


@dataclass(frozen=True)
class ServeOptions:
    """Engine and HTTP limits: requests decoded together, waiting requests before 429, per-request timeout,
    prompt / max_tokens bounds, shutdown drain (timeout for open streams, notice while /readyz fails), access-log
    prompts, and the KV cache budget in bytes (None: 80% of free GPU memory on CUDA, no limit on CPU)."""

    max_batch: int = 8
    queue_size: int = 64
    request_timeout_s: float = 300.0
    max_prompt_tokens: int = 2048
    max_tokens: int = 2048
    default_max_tokens: int = 512
    drain_timeout_s: float = 30.0
    drain_notice_s: float = 0.0
    log_prompts: bool = False
    max_kv_memory: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"must be at least 1, got {getattr(self, name)}", where=_flag(name))
        if self.drain_notice_s < 0:
            raise InvalidInputError(f"must not be negative, got {self.drain_notice_s}", where=_flag("drain_notice_s"))


def _flag(name: str) -> str:
    """The `glmtune serve` flag of an option, for error locations users can act on."""
    return "--" + name.removesuffix("_s").replace("_", "-")



def serve(uri: str, name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          adapters: Mapping[str, str] | None = None, load: Any = None, options: ServeOptions | None = None,
          api_key: str | None = None) -> None:
    """Serve `uri` (any export kind, local or s3://) as model `name`, with `adapters` (name → adapter/prefix
    export URI) over it, on `host:port`; `load` is a `loading.LoadOptions` (device, dtype, quantization), `api_key`
    when clients must send one. Returns when the server has shut down and drained."""
    import uvicorn

    from glmtune_inference.access_log import configure_access_log
    from glmtune_inference.loading import LoadOptions, load_served_models, served_device
    from glmtune_inference.memory import default_kv_budget
    from glmtune_inference.scheduler import ServingEngine
    from glmtune_inference.server import DrainingServer, ServerSettings, create_app

    options = options or ServeOptions()
    served = load_served_models(uri, dict(adapters or {}), name, load or LoadOptions())
    device = served_device(served)
    kv_budget = options.max_kv_memory if options.max_kv_memory is not None else default_kv_budget(device)
    engine = ServingEngine(served, max_batch=options.max_batch, queue_size=options.queue_size, kv_budget=kv_budget)
    settings = ServerSettings(
        max_prompt_tokens=options.max_prompt_tokens, max_tokens_limit=options.max_tokens,
        default_max_tokens=options.default_max_tokens, request_timeout_s=options.request_timeout_s,
        api_key=api_key or None, log_prompts=options.log_prompts, drain_timeout_s=options.drain_timeout_s,
        report_path=served_report(served))
    configure_access_log()
    listing = ", ".join(f"{model_name} ({model.source})" for model_name, model in served.items())
    print(f"glmtune serve: {listing} on {device} at http://{host}:{port}", file=sys.stderr)
    config = uvicorn.Config(create_app(engine, settings), host=host, port=port, access_log=False,
                            timeout_graceful_shutdown=int(options.drain_timeout_s) or None)
    DrainingServer(config, engine, options.drain_notice_s).run()


def served_report(served: Mapping[str, Any]) -> Path | None:
    """The training report shipped in the served export (the main model's first, else an adapter's), if any."""
    from glmtune.export_format import REPORT_FILE

    for model in served.values():
        if model.directory is not None and (model.directory / REPORT_FILE).is_file():
            return model.directory / REPORT_FILE
    return None

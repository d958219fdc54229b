"""KV cache memory: what one token of a request costs, the budget the server admits requests against, and
how much memory the serving device holds right now (for `/metrics`).

A request's KV cache grows to (prompt + max new tokens) columns, and in the left-padded batch every row is as
wide as the longest one, so the engine lets a queued request join only if the batch would still fit when every
row reached its full length: rows x (widest row) x bytes per token. That is the worst case, which is what keeps
a full batch from running out of memory halfway through its answers; the cost is keeping some requests queued
that a luckier mix of early stops would have run at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from glmtune_inference.kv_cache import ROOM

# Of the device memory free after loading, the share the KV cache may take by default; the rest is headroom
# for activations (a prefill of a long prompt), the allocator's fragmentation and CUDA's own workspaces.
CUDA_KV_SHARE = 0.8


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one cached token costs over all layers: layers x 2 (keys, values) x KV heads x head dim x dtype size."""
    config = model.config
    layers = config.num_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "kv_channels", None) or config.hidden_size // heads
    if getattr(config, "multi_query_attention", False):  # ChatGLM2/3: a few shared KV groups
        heads = config.multi_query_group_num
    # Activations (and so the cache) run in the embeddings' dtype, the first floating weight of a GLM.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return layers * 2 * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def request_tokens(prompt_tokens: int, new_tokens: int, prefix_len: int = 0) -> int:
    """Cache columns a request may come to hold: prompt, answer, p-tuning prefix and the buffer's spare room."""
    return prompt_tokens + new_tokens + prefix_len + ROOM


def batch_need(per_token: int, rows: Iterable[int]) -> int:
    """Bytes a left-padded batch of requests needs once each is at its full length (`rows` in tokens)."""
    widths = list(rows)
    return per_token * len(widths) * max(widths, default=0)


def default_kv_budget(device: torch.device) -> int | None:
    """The KV budget when none is configured: a share of the GPU memory free now; none on the CPU (the
    operating system's memory limit applies there, and `--max-kv-memory` sets one)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * CUDA_KV_SHARE)


def device_memory_bytes(device: torch.device) -> int:
    """Memory in use on the serving device: tensors torch allocated on a GPU, the process's resident set on
    the CPU (where weights and caches are ordinary process memory)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return resident_set_bytes()


def resident_set_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where that is not readable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def format_bytes(count: int) -> str:
    """`1.5 GiB`-style text for messages."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"

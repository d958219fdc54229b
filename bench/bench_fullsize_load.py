"""How long glmtune.load_model takes on a full-size checkpoint against reading its files once, and the RSS it
peaks at (issue #12's load targets), up to the first decode step; used by bench/fullsize.py --measure-load and
bench/bench_fullsize.py's load-fp16 / load-int4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def evict(folder: Path) -> None:
    """Drop this checkpoint's files from the page cache, so the next read comes from disk (ours only)."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_files_once(folder: Path) -> dict[str, float]:
    """Seconds and bytes to read every weight file once, sequentially, in 16 MiB blocks."""
    import time

    buffer = bytearray(16 << 20)
    total, start = 0, time.perf_counter()
    for path in sorted(folder.glob("pytorch_model*.bin")):
        with path.open("rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                total += count
    return {"read_s": time.perf_counter() - start, "bytes": total}


def _rss_breakdown() -> dict[str, float]:
    with open("/proc/self/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {key: int(value.split()[0]) / 1024 for key, value in fields.items()}


def load_once(folder: str, dtype: str, quantize: int | None, decode_tokens: int = 0) -> dict[str, Any]:
    """glmtune.load_model's wall time, peak RSS and the bytes of the weights it holds, then optionally batch-1
    greedy decode speed (run in a fresh child process, so the peak RSS is this load's)."""
    import resource
    import time

    import glmtune
    import glmtune.export_loading
    import glmtune.modeling.chatglm2
    import glmtune.modeling.chatglm6b  # imports (transformers: seconds) are not loading

    start = time.perf_counter()
    model = glmtune.load_model(folder, dtype=dtype, quantization_bit=quantize)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"load_s": seconds,
                              "peak_rss_load_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              **{f"{k}_load": v for k, v in _rss_breakdown().items()}}
    # memory-mapped .bin tensors are read lazily: reading one element per 4 KiB page pays what the first
    # forward would, so "load" and "load + touch" together bound what a user waits for
    start, seen, weights = time.perf_counter(), set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen and tensor.numel():
            seen.add(key)
            weights += tensor.numel() * tensor.element_size()
            tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].float().sum()
    result.update(touch_s=time.perf_counter() - start, weights_bytes=weights,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **_rss_breakdown())
    # the first prefill and decode step do what loading left for first use (the int4 decode kernels' weight
    # layout is built on the first call with few rows), so "+ first two tokens" is what a user waits for before
    # an answer flows, and the RSS it peaks at
    ids = glmtune.load_tokenizer(folder)("你好，请介绍一下你自己", return_tensors="pt").input_ids
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2)
    result.update(first_token_s=time.perf_counter() - start, prompt_tokens=ids.shape[1],
                  peak_rss_first_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  **{f"{k}_first": v for k, v in _rss_breakdown().items()})
    if decode_tokens:

        def generate(count: int) -> float:
            began = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=count, min_new_tokens=count)
            return time.perf_counter() - began

        with torch.no_grad():
            prefill = min(generate(1) for _ in range(2))
            total = generate(decode_tokens + 1)
        result.update(prefill_s=prefill, decode_tokens=decode_tokens,
                      decode_tokens_per_s=decode_tokens / (total - prefill),
                      peak_rss_decode_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      **{f"{k}_decode": v for k, v in _rss_breakdown().items()})
    return result


def measure_load(folder: Path, dtype: str, quantize: int | None, decode_tokens: int = 0) -> dict[str, Any]:
    """Cold read of the files, then a cold glmtune.load_model in a fresh process (its own peak RSS)."""
    import subprocess

    evict(folder)
    read = read_files_once(folder)
    evict(folder)
    params = json.dumps({"folder": str(folder), "dtype": dtype, "quantize": quantize, "decode_tokens": decode_tokens})
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_fullsize_load as m; "
            "print(json.dumps(m.load_once(**json.loads(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), params],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"load_model failed:\n{done.stderr[-4000:]}")
    return {**read, **json.loads(done.stdout.strip().splitlines()[-1])}


def load_report(name: str, folder: Path, dtype: str, quantize: int | None, result: dict[str, Any]) -> str:
    """A markdown table of one --measure-load run, with the ratios issue 12 sets targets for."""
    gib = 1 << 30
    weights = result["weights_bytes"] / gib
    peak_load, peak, peak_first = (result[key] / 1024 for key in ("peak_rss_load_mib", "peak_rss_mib",
                                                                  "peak_rss_first_mib"))
    touched = result["load_s"] + result["touch_s"]
    first = touched + result["first_token_s"]
    return "\n".join([
        f"{name} at {folder} ({result['bytes'] / gib:.2f} GiB of weight files), glmtune.load_model(dtype={dtype!r}, "
        f"quantization_bit={quantize}) in a fresh process; page cache of these files dropped before each pass", "",
        "| | seconds | x file read | peak RSS GiB | x weights held | RSS anon / file-backed GiB |",
        "|---|---|---|---|---|---|",
        f"| read the files once | {result['read_s']:.1f} | 1.00x | | | |",
        f"| load_model returns | {result['load_s']:.1f} | {result['load_s'] / result['read_s']:.2f}x | {peak_load:.2f} "
        f"| {peak_load / weights:.2f}x | {result['RssAnon_load'] / 1024:.2f} / {result['RssFile_load'] / 1024:.2f} |",
        f"| + every weight page read | {touched:.1f} | {touched / result['read_s']:.2f}x | {peak:.2f} "
        f"| {peak / weights:.2f}x | {result['RssAnon'] / 1024:.2f} / {result['RssFile'] / 1024:.2f} |",
        f"| + first two tokens ({result['prompt_tokens']}-token prompt, one decode step) | {first:.1f} "
        f"| {first / result['read_s']:.2f}x "
        f"| {peak_first:.2f} | {peak_first / weights:.2f}x | {result['RssAnon_first'] / 1024:.2f} / "
        f"{result['RssFile_first'] / 1024:.2f} |", "",
        f"weights held by the model: {weights:.2f} GiB. Issue 12 targets (fp16): peak RSS <= 1.15x the loaded weights; "
        "load time <= 2x the file read", *_quantize_lines(folder, quantize, result), *_decode_lines(result)])


def _quantize_lines(folder: Path, quantize: int | None, result: dict[str, Any]) -> list[str]:
    """Quantize-at-load's target: peak RSS <= the quantized model + one shard (ChatGLM2-6B int4: <= 6 GiB)."""
    if not quantize:
        return []
    gib = 1 << 30
    shard = max(path.stat().st_size for path in folder.glob("pytorch_model*.bin")) / gib
    bound = result["weights_bytes"] / gib + shard
    peak = result["peak_rss_mib"] / 1024
    return ["", f"int{quantize} quantize-at-load: peak RSS {peak:.2f} GiB vs quantized model + largest shard "
            f"{bound:.2f} GiB ({'met' if peak <= bound else 'NOT met'}; issue 12 names <= 6 GiB for ChatGLM2-6B int4); "
            f"through the first two tokens {result['peak_rss_first_mib'] / 1024:.2f} GiB"]


def _decode_lines(result: dict[str, Any]) -> list[str]:
    if "decode_tokens_per_s" not in result:
        return []
    return ["", f"Greedy decode after the load, batch 1, {torch.get_num_threads()} threads: prompt "
            f"{result['prompt_tokens']} tokens, prefill {result['prefill_s']:.1f} s; {result['decode_tokens']} tokens at "
            f"{result['decode_tokens_per_s']:.2f} tokens/s; RSS after decoding {result['VmRSS_decode'] / 1024:.2f} GiB "
            f"(anon {result['RssAnon_decode'] / 1024:.2f}), peak {result['peak_rss_decode_mib'] / 1024:.2f} GiB"]

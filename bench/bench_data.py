"""Data pipeline benchmark: build speed, padding efficiency of seed / dynamic / packed batches, flat memory.

On alpaca_zh (3,243 valid samples) with the real ChatGLM-6B tokenizer, max length 1024:
  * samples/s of `glmtune data build` with 2 workers (truncation, the seed's default);
  * padding efficiency = real / computed tokens for pad-to-max (the seed), dynamic padding (shuffled
    batches, with and without length grouping) and packing;
  * peak RSS of a process streaming every batch of a 10x replicated copy vs the 1x copy.
Run: `python bench/bench_data.py [--shared ../shared] [--batch-size 4]`; prints a Markdown table and JSON and
appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import record

REPO = Path(__file__).resolve().parent.parent


def _build(inputs: list[Path], tokenizer: Path, out: Path, strategy: str, workers: int) -> dict:
    from glmtune_trainer.data.build import BuildConfig, build_records

    config = BuildConfig(
        inputs=[str(p) for p in inputs],
        tokenizer=str(tokenizer),
        out=str(out),
        strategy=strategy,
        max_length=1024,
        workers=workers,
        skip_invalid=True,
        progress=False,
    )
    started = time.perf_counter()
    manifest = build_records(config).manifest
    return {"seconds": time.perf_counter() - started, "manifest": manifest}


def _efficiency(records_dir: Path, batch_size: int, group: bool) -> float:
    from glmtune_trainer.data.dataset import RecordDataset, plan_epoch

    lengths = RecordDataset(records_dir).lengths()
    plan = plan_epoch(
        lengths, batch_size, epoch=0, seed=0, shuffle=True, rank=0, world_size=1, group_by_length=group
    )
    return float(sum(lengths[b].sum() for b in plan) / sum(len(b) * lengths[b].max() for b in plan))


def _stream_peak_rss(records_dir: Path, batch_size: int) -> dict:
    """Peak RSS (MiB) of a fresh process that iterates every collated batch once."""
    code = f"""
import resource, time, torch
from torch.utils.data import DataLoader
from glmtune_trainer.data.dataset import RecordBatches, RecordDataset
data = RecordDataset({str(records_dir)!r})
stream = RecordBatches(data, {batch_size}, data.collator(), seed=0, rank=0, world_size=1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); tokens = 0
for batch in DataLoader(stream, batch_size=None, num_workers=0):
    tokens += int((batch["input_ids"] != -1).sum())
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, len(data), time.perf_counter() - t)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    return {
        "rss_before_mib": int(out[0]) / 1024,
        "peak_rss_mib": int(out[1]) / 1024,
        "sequences": int(out[2]),
        "seconds": float(out[3]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    data = args.shared / "data" / "alpaca_zh_0-3252.json"
    tokenizer = args.shared / "reference" / "vectors" / "tokenizers" / "chatglm6b"
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    from glmtune.tokenization import load_tokenizer

    load_tokenizer(tokenizer)  # one-time imports (transformers, sentencepiece) stay out of the timings
    try:
        seed = _build([data], tokenizer, work / "truncation", "truncation", workers=2)
        one_worker = _build([data], tokenizer, work / "truncation-1w", "truncation", workers=1)
        packed = _build([data], tokenizer, work / "packing", "packing", workers=2)
        stats = seed["manifest"]["stats"]
        copies = []
        for i in range(10):
            copy = work / f"copy{i}.json"
            shutil.copyfile(data, copy)
            copies.append(copy)
        tenfold = _build(copies, tokenizer, work / "tenfold", "truncation", workers=2)
        rss_1 = _stream_peak_rss(work / "truncation", args.batch_size)
        rss_10 = _stream_peak_rss(work / "tenfold", args.batch_size)
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "samples": stats["samples"],
            "build_samples_per_s_2_workers": stats["samples"] / seed["seconds"],
            "build_samples_per_s_1_worker": stats["samples"] / one_worker["seconds"],
            "build_samples_per_s_2_workers_10x": tenfold["manifest"]["stats"]["samples"] / tenfold["seconds"],
            "padding_efficiency": {
                "pad_to_max_1024_seed": stats["padding_efficiency_pad_to_max"],
                f"dynamic_batch{args.batch_size}": _efficiency(work / "truncation", args.batch_size, False),
                f"dynamic_batch{args.batch_size}_length_grouped": _efficiency(
                    work / "truncation", args.batch_size, True
                ),
                f"packing_dynamic_batch{args.batch_size}": _efficiency(
                    work / "packing", args.batch_size, False
                ),
                "packing_pad_to_max": packed["manifest"]["stats"]["padding_efficiency_pad_to_max"],
            },
            "stream_1x": rss_1,
            "stream_10x": rss_10,
            "peak_rss_ratio_10x_vs_1x": rss_10["peak_rss_mib"] / rss_1["peak_rss_mib"],
            "bench_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| metric | value |", "|---|---|"]
    lines.append(f"| build, 2 workers (samples/s) | {result['build_samples_per_s_2_workers']:.0f} |")
    lines.append(f"| build, 1 worker (samples/s) | {result['build_samples_per_s_1_worker']:.0f} |")
    lines.append(f"| build 10x copy, 2 workers (samples/s) | {result['build_samples_per_s_2_workers_10x']:.0f} |")
    for name, value in result["padding_efficiency"].items():
        lines.append(f"| padding efficiency, {name} | {value:.1%} |")
    lines.append(
        f"| peak RSS streaming 1x / 10x (MiB) | {rss_1['peak_rss_mib']:.0f} / {rss_10['peak_rss_mib']:.0f} "
        f"(ratio {result['peak_rss_ratio_10x_vs_1x']:.3f}) |"
    )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record("bench_data.py", "alpaca_zh_0-3252.json, real ice_text tokenizer, max length 1024, "
               f"{result['samples']} samples; targets: packing >= 97%, 10x/1x streaming RSS <= 1.2\n\n{table}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

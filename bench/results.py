"""One way for every benchmark to record itself: a dated section appended to bench/RESULTS.md.

Appending (never rewriting the file) keeps concurrent benchmark runs from losing each other's sections.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nOne section per run: date, command, machine, numbers (bench/*.py append here).\n"


def machine() -> str:
    """CPU count, thread settings, load and library versions: what a reader needs to weigh the numbers."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    parts = [f"{platform.machine()} {os.cpu_count()} cpus (load average {load})",
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def record(script: str, body: str, argv: list[str] | None = None) -> None:
    """Append `body` under a dated heading with the exact command line of `script` and the machine."""
    args = sys.argv[1:] if argv is None else argv
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python", f"bench/{script}", *args])
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    section = f"\n## {stamp} {script}\n\ncommand: `{command}`  \nmachine: {machine()}\n\n{body.strip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text(HEADER, encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(section)


def add_worker_arguments(parser: argparse.ArgumentParser, workers: Iterable[str]) -> None:
    """The options of a benchmark that runs each measurement in a child process of itself: which ones to
    run, whether to record, and the hidden flag a child gets to run one measurement."""
    names = sorted(workers)
    parser.add_argument("--only", choices=names, action="append", help="run only these measurements")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--worker", choices=names, help=argparse.SUPPRESS)


def run_workers(script: str, names: Iterable[str], forwarded: list[str],
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run each measurement `name` as `python script ... --worker name` in its own process (fresh memory and
    threads) and collect the JSON each prints last; a failing child ends the benchmark with its stderr."""
    results: dict[str, Any] = {}
    for name in names:
        done = subprocess.run([sys.executable, script, *forwarded, "--worker", name],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(done.returncode)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", flush=True)
    return results

"""Training metrics: a progress bar on a terminal, JSON lines in the log folder, TensorBoard event files.

Only rank 0 writes; other ranks get a logger that does nothing, so call sites stay unconditional.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes one JSON object per logged event and mirrors scalars to TensorBoard."""

    def __init__(self, log_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool | None = None) -> None:
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._jsonl = None
        self._writer = None
        self._bar = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = open(self.log_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"), purge_step=start_step or None)
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Record `values` (numbers) for `step` under `kind` ("train", "eval", "checkpoint", ...)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(f"{kind}/{key}", value, step)
        if self._bar is not None and kind == "train":
            self._bar.set_postfix({k: values[k] for k in ("loss", "lr") if k in values}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(log_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The JSON-lines records of a run (optionally only one kind), in order."""
    path = Path(log_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]

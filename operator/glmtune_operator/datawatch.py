"""S3 data drops: when the objects under a GLMFineTune's `s3://` sources change, start one new run.

Pure decisions over listings (object URI → ETag/version). A changed listing must stay the same for the
debounce period before it counts (an upload of several files finishes first), and a run starts only after
the previous one finished; the listing a run trains on is recorded in `status.dataVersions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from glmtune.spec.data import DATA_SUFFIXES


@dataclass
class DropWatch:
    """Per-resource memory between polls: when it last listed, and a changed listing waiting to settle."""

    last_poll: float | None = None
    pending: dict[str, str] | None = None
    pending_since: float = 0.0


def poll_due(watch: DropWatch, interval_seconds: float, now: float) -> bool:
    """Whether `data.watchIntervalSeconds` passed since the last listing (or none was made yet)."""
    return watch.last_poll is None or now - watch.last_poll >= interval_seconds


def changes(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two listings: new, changed and removed objects."""
    new = [f"new {uri}" for uri in sorted(current) if uri not in recorded]
    changed = [f"changed {uri}" for uri in sorted(current) if uri in recorded and recorded[uri] != current[uri]]
    gone = [f"removed {uri}" for uri in sorted(recorded) if uri not in current]
    return new + changed + gone


def observe(watch: DropWatch, recorded: Mapping[str, str], current: Mapping[str, str], debounce_seconds: float,
            now: float) -> bool:
    """Record a poll; True when `current` differs from `recorded` and has been stable for the debounce period."""
    watch.last_poll = now
    if dict(current) == dict(recorded):
        watch.pending = None
        return False
    if watch.pending != dict(current):
        watch.pending, watch.pending_since = dict(current), now
    return now - watch.pending_since >= debounce_seconds


def is_data_key(key: str) -> bool:
    """An object the trainer would read (same suffixes as its S3 source expansion)."""
    return key.lower().endswith(DATA_SUFFIXES)

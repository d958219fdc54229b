"""Helpers shared by every test area (import as `testkit`): repo paths and the ../shared reference folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The ../shared folder (reference vectors, real tokenizers, real data); GLMTUNE_SHARED overrides it."""
    return Path(os.environ.get("GLMTUNE_SHARED", REPO_ROOT.parent / "shared")).resolve()


def require_shared(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with the reason when a user's clone lacks it."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (set GLMTUNE_SHARED to the shared folder)")
    return path


def reference_mismatches(reference: dict, key: str, produce) -> list:
    """(kind, produced, expected) for every reference case whose `key` differs from `produce(case)`."""
    return [(case["kind"], got, case[key]) for case in reference["cases"] if (got := produce(case)) != case[key]]


def record_of(windows: list) -> object:
    """A SequenceRecord holding `windows` (data-pipeline Windows) back to back, as the record builder lays
    them out: rows of (offset, length, untrained, bidirectional, sample)."""
    import numpy as np
    from glmtune_trainer.data.records import SequenceRecord

    rows, ids, offset = [], [], 0
    for w in windows:
        rows.append((offset, len(w), w.untrained, w.bidirectional, w.sample))
        ids.extend(w.ids)
        offset += len(w)
    return SequenceRecord(np.asarray(ids, np.int32), np.asarray(rows, np.int64).reshape(-1, 5))

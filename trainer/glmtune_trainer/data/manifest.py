"""A build's manifest: the record of a finished build, and the atomic swap that publishes one.

`manifest.json` is written last and atomically; a folder without it holds no (finished) records.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune_trainer.data.records import SUFFIXES, RecordSet

FORMAT_VERSION = "glmtune-records/v1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def read_manifest(directory: str | os.PathLike) -> dict:
    """A finished build's manifest; InvalidInputError when the folder holds no finished build."""
    path = Path(directory) / MANIFEST
    manifest = storage.read_json_object(
        path, "no records here (manifest.json is missing: run `glmtune data build`, or the build was interrupted)",
        where=str(directory),
    )
    if manifest.get("format") != FORMAT_VERSION:
        raise InvalidInputError(f"not a {FORMAT_VERSION} manifest", where=str(path))
    return manifest


def open_records(directory: str | os.PathLike, dataset: str | None = None) -> RecordSet:
    """The sequences of one record set of a finished build (the only one, or `dataset` by name)."""
    manifest = read_manifest(directory)
    names = list(manifest["datasets"])
    name = dataset if dataset is not None else names[0]
    if name not in manifest["datasets"] or (dataset is None and len(names) > 1):
        raise InvalidInputError(f"choose a record set: {', '.join(names)}", where=str(directory))
    return RecordSet(directory, manifest["datasets"][name]["shards"])


def _ours(path: Path) -> bool:
    """Files a build writes into its output folder (nothing else there is ever touched)."""
    return path.name in (MANIFEST, TOKENIZER_DIR, storage.MANIFEST_NAME) or path.name.endswith(SUFFIXES)


def commit_build(staged: Path, out: Path, manifest: dict) -> None:
    """Swap the staged files into `out`: the old manifest goes first, the new one is written last."""
    (out / MANIFEST).unlink(missing_ok=True)
    for old in out.iterdir():
        if _ours(old):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for item in staged.iterdir():
        if item.name != MANIFEST:
            os.replace(item, out / item.name)
    storage.atomic_write_json(out / MANIFEST, manifest)


def complete_build(out: Path, digest: str) -> dict | None:
    """The manifest in `out` if it is a finished build with this hash whose shard files are all there."""
    try:
        manifest = read_manifest(out)
    except InvalidInputError:
        return None
    if manifest.get("hash") != digest:
        return None
    for dataset in manifest["datasets"].values():
        for shard in dataset["shards"]:
            sizes = (shard["tokens"] * 4, shard["segments"] * 40, (shard["sequences"] + 1) * 16)
            for suffix, size in zip(SUFFIXES, sizes, strict=True):
                path = out / f"{shard['name']}{suffix}"
                if not path.is_file() or path.stat().st_size != size:
                    return None
    return manifest

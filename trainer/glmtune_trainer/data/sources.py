"""Input locations → concrete data files: local files, directories, globs and `s3://bucket/prefix` URIs.

Each file carries a fingerprint (sha256 of local content; key, size and ETag for S3 objects, so a cache
lookup never has to download the data) and the name errors should show (the user's path or URI).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.spec.data import DATA_SUFFIXES


@dataclass(frozen=True)
class SourceFile:
    """One input file: `name` as the user knows it, `fingerprint` of its content, `uri` to open."""

    name: str
    fingerprint: str
    uri: str
    size: int

    def local_path(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """A local copy to read (downloaded once for S3 objects)."""
        return storage.fetch(self.uri, cache_dir=cache_dir)


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def _local_file(path: Path, name: str) -> SourceFile:
    return SourceFile(
        name=name, fingerprint="sha256:" + storage.file_sha256(path), uri=str(path), size=path.stat().st_size
    )


def _expand_local(spec: str) -> list[SourceFile]:
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise InvalidInputError("the pattern matches no files", where=spec)
        return [_local_file(p, str(p)) for p in files]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p.name))
        if not files:
            raise InvalidInputError(
                f"no data files ({', '.join(DATA_SUFFIXES)}) in this directory", where=spec
            )
        return [_local_file(p, str(p)) for p in files]
    if path.is_file():
        return [_local_file(path, spec)]
    raise InvalidInputError("no such file or directory", where=spec)


def _expand_s3(spec: str) -> list[SourceFile]:
    _, prefix = storage.parse_s3_uri(spec)
    objects = [o for o in storage.list_objects(spec) if o.key == prefix or is_data_file(o.key)]
    if not objects:
        raise InvalidInputError(f"no data objects ({', '.join(DATA_SUFFIXES)}) under this prefix", where=spec)
    return [
        SourceFile(
            name=o.uri, fingerprint=f"s3:{o.size}:{o.etag}:{o.version_id or ''}", uri=o.uri, size=o.size
        )
        for o in objects
    ]


def expand_sources(specs: list[str]) -> list[SourceFile]:
    """Every data file named by `specs`, in the given order (sorted within a directory, glob or prefix)."""
    if not specs:
        raise InvalidInputError("no input given: name at least one data file, directory, glob or s3:// URI")
    files: list[SourceFile] = []
    seen: set[str] = set()
    for spec in specs:
        for source in _expand_s3(spec) if storage.is_s3_uri(spec) else _expand_local(spec):
            if source.uri not in seen:
                seen.add(source.uri)
                files.append(source)
    return files

"""Local file primitives of glmtune.storage: checksums, atomic writes, atomic folder swaps, JSON, file locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write `data` under a temporary name in the same folder, then rename: readers see all or nothing.

    `mode` sets the file's permissions (the temporary file starts as 0600, private to this user)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `staging` at `target` (same filesystem), replacing what is there.

    `target` holds the old folder or the new one, each complete, at every instant: an existing one is swapped
    with `staging` in one atomic rename (Linux renameat2 RENAME_EXCHANGE) and deleted after; where the kernel
    cannot swap, it is renamed aside, the new one renamed in, and the old one put back if that fails.
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    aside = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where the kernel or filesystem cannot (the caller falls back)."""
    import ctypes
    import errno

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_bytes` of pretty-printed JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode())


def read_json_object(path: str | os.PathLike, missing: str = "file is missing", where: str | None = None) -> dict:
    """The JSON object stored in `path`. InvalidInputError when the file is missing (`missing`, at `where`, by
    default the file), is not JSON (naming file:line), cannot be read, or holds something else than an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(missing, where=where or str(path)) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"unreadable JSON: {exc}", where=str(path)) from None
    if not isinstance(data, dict):
        raise InvalidInputError("expected a JSON object", where=str(path))
    return data


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (kept, never deleted: deleting a lock file reopens the race)."""
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

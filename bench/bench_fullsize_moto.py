"""moto's S3 server for bench/bench_fullsize.py, changed so that a 12 GB upload and its download fit on one disk.

Test harness only: the product's storage code talks to it as to any S3. moto 5 keeps each object (and part)
in a `SpooledTemporaryFile`, on disk as an unlinked file. Its `list_object_versions` (what
`glmtune.storage.list_objects` calls, to pin version ids) `copy.deepcopy`s every stored key just to set
`is_latest` on the copies; copying a `FakeKey` reads its whole body into memory and spools it again to a new
unlinked file, and moto's instance tracking (`BaseModel.instances_tracked`, for its dashboard) keeps every
copy alive. So each listing of the bucket costs its full size on disk for good: the upload's listing plus
the download's (fingerprint, manifest check) took the 11.6 GiB export's footprint past 35 GiB, and the disk
ran out. Here that one `deepcopy` hands back the same keys (the listing recomputes `is_latest` on every key
before it is read, and nothing else reads it). Parts are not the problem: moto disposes them when the
upload completes. Completion still assembles the object in memory: the bench reports moto's peak RSS.

    python bench/bench_fullsize_moto.py -H 127.0.0.1 -p 5000        # moto_server's own arguments
"""

from __future__ import annotations

import os
import sys
from typing import Any


def list_versions_without_copying_objects() -> None:
    """Make moto's `list_object_versions` list the stored keys themselves instead of deep copies of them."""
    import copy
    import types

    from moto.s3 import models

    if isinstance(models.copy, types.SimpleNamespace):
        return  # already applied

    def deepcopy(value: Any, memo: dict[int, Any] | None = None) -> Any:
        if isinstance(value, list) and all(isinstance(v, (models.FakeKey, models.FakeDeleteMarker)) for v in value):
            return list(value)  # the only deepcopy in moto.s3.models: a key's versions, for the listing
        return copy.deepcopy(value, memo)

    # moto.s3.models uses `copy` only for this deepcopy and `copy.copy` of a key's bytes
    models.copy = types.SimpleNamespace(copy=copy.copy, deepcopy=deepcopy)  # type: ignore[assignment]


def spooled_bytes(pid: int) -> int:
    """Bytes a process holds in deleted-but-open files (moto's spooled objects and parts): disk that
    `df` counts but no directory shows."""
    total, fds = 0, f"/proc/{pid}/fd"
    for name in os.listdir(fds):
        try:
            if os.readlink(f"{fds}/{name}").endswith(" (deleted)"):
                total += os.stat(f"{fds}/{name}").st_size
        except OSError:
            continue  # closed between listdir and stat
    return total


def main(argv: list[str] | None = None) -> None:
    """Run moto's server (its own command line) with the patch applied."""
    list_versions_without_copying_objects()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()

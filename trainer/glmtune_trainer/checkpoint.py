"""Checkpoints: atomic step directories, keep-last-K, an optional `s3://` mirror, and `resume: auto`.

A checkpoint is written into `.tmp-step-N` and renamed to `step-N` once every rank has finished, so a
directory named `step-N` is always complete. It holds the trained weights (`model.safetensors`, only the
parameters that train), the engine state (optimizer / ZeRO partitions), every rank's RNG state and
`trainer_state.json` (step, data position, guard counters, scheduler) — enough to continue bit for bit.
Each work dir has one writer (see `distributed`): nodes that do not share storage each keep a complete
copy of the replicated state plus every rank's RNG, so each resumes from its own disk; global rank 0 mirrors.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmtune import storage
from glmtune.errors import InvalidInputError

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every random generator a step consumes: python, numpy, torch CPU (and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(c for c in found if (c[1] / STATE_FILE).is_file())


def prepare_tmp_dir(root: Path, step: int, writer: bool) -> Path:
    """The temporary directory every rank writes checkpoint `step` into (the work dir's writer makes it fresh)."""
    tmp = root / f".tmp-{step_dir_name(step)}"
    if writer:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Trainable weights as safetensors (contiguous CPU copies, shared storage broken)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_rng(directory: Path, rank: int, state: dict[str, Any]) -> None:
    """Rank `rank`'s generator states (gathered from that rank by the writer)."""
    torch.save(state, directory / f"rng-rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise InvalidInputError(f"checkpoint has no RNG state for rank {rank} (saved with fewer processes?)",
                                where=str(directory))
    set_rng_state(torch.load(path, weights_only=False))


def finalize(root: Path, tmp: Path, step: int, keep_last: int, mirror_uri: str | None) -> Path:
    """The writer, after every rank wrote into `tmp`: rename into place, prune, mirror. Returns the directory."""
    final = root / step_dir_name(step)
    storage.publish_dir(tmp, final)
    for _step, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    if mirror_uri:
        storage.upload_dir(final, f"{mirror_uri.rstrip('/')}/{final.name}")
    return final


def _mirror_steps(mirror_uri: str) -> list[int]:
    """Steps of complete checkpoints in the mirror (a manifest is uploaded last, so it marks completeness)."""
    prefix = mirror_uri.rstrip("/") + "/"
    steps = set()
    for obj in storage.list_objects(prefix):
        rel = obj.uri[len(prefix):]
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == storage.MANIFEST_NAME and (m := _STEP_DIR.match(parts[0])):
            steps.add(int(m.group(1)))
    return sorted(steps)


def resolve_location(resume: str) -> Path:
    """A checkpoint named by path or `s3://` URI (`training.checkpoint.resume`), fetched and checked."""
    path = storage.fetch(resume, require_manifest=storage.is_s3_uri(resume))
    if not (Path(path) / STATE_FILE).is_file():
        raise InvalidInputError(f"not a training checkpoint ({STATE_FILE} missing)",
                                where="spec.training.checkpoint.resume")
    return Path(path)


def available_steps(root: Path, mirror_uri: str | None) -> list[int]:
    """Steps this work dir can resume from: complete local checkpoints and complete mirrored ones."""
    steps = {step for step, _path in list_checkpoints(root)}
    return sorted(steps | set(_mirror_steps(mirror_uri) if mirror_uri else ()))


def materialise(root: Path, step: int, mirror_uri: str | None) -> Path:
    """Checkpoint `step` under `root`: the local copy if complete, else downloaded from the mirror first."""
    target = root / step_dir_name(step)
    if (target / STATE_FILE).is_file():
        return target
    if not mirror_uri:
        raise InvalidInputError(f"no complete checkpoint {target.name} here or in a mirror", where=str(root))
    remote = f"{mirror_uri.rstrip('/')}/{target.name}"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    storage.download_prefix(remote, staging)
    storage.verify_manifest(staging, display=remote)
    storage.publish_dir(staging, target)
    return target


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))

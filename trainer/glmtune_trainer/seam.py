"""The trainer's seam for callers above it (`glmtune run`, `glmtune train`, the PyTorchJob entry).

`run_locations` places a run's files; `prepare(spec, workdir)` makes the base model and the token records
once per work dir and plans the steps; `train(prepared, ...)` trains on exactly that. Torch-free at import:
`glmtune --help` and the app layer's parsers import this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune import storage
from glmtune.errors import GlmtuneError, InvalidInputError

PREP_TIMEOUT_S = 6 * 3600.0
# on_event(kind, step, values): what `prepare` and `run.train` tell their caller as they go.
EventCallback = Callable[[str, int, dict[str, Any]], None]
RECORDS_DIR = "records"


@dataclass(frozen=True)
class Prepared:
    """A run made ready once per work dir: the resolved base model, this rank's batches and the step plan.

    `topology` and `roles` are the process layout it was prepared for; `records` is None when a caller's
    batch source replaced the spec's data (tests).
    """

    spec: Any
    workdir: Path
    topology: Any  # glmtune_trainer.distributed.Topology
    roles: Any  # glmtune_trainer.distributed.WorkDirRoles
    base: dict[str, Any]
    source: Any  # glmtune_trainer.loop.BatchSource
    records: Path | None
    records_reused: bool
    steps_per_epoch: int
    total_steps: int

    def records_stats(self) -> dict[str, int]:
        """samples, sequences, tokens, trained_tokens and invalid (skipped) records of the built data."""
        from glmtune_trainer.data.manifest import read_manifest

        if self.records is None:
            raise GlmtuneError("this run trains on a batch source it was given, not on built records")
        manifest = read_manifest(self.records)
        stats = manifest["stats"]
        return {key: int(stats[key]) for key in ("samples", "sequences", "tokens", "trained_tokens")} | {
            "invalid": int(manifest["invalid"]["records"])}


def run_locations(spec: Any, workdir: str | os.PathLike[str] | None) -> tuple[Any, Path]:
    """The run's absolute work directory (`workdir`, else ./glmtune-runs/<spec name>) and `spec` with its
    locations resolved against it: how `glmtune run`, `glmtune train` and the PyTorchJob entry all place files."""
    directory = (Path(workdir) if workdir else Path("glmtune-runs") / spec.name).expanduser().resolve()
    return resolve_locations(spec, directory), directory


def resolve_locations(spec: Any, workdir: Path) -> Any:
    """A copy of `spec` with relative output locations under `workdir`; `pvc://` anywhere is an input error."""
    for where, value in spec.spec.locations().items():
        if value.startswith("pvc://"):
            raise InvalidInputError(
                "pvc:// names a Kubernetes PersistentVolumeClaim, which only exists inside a cluster: apply "
                "this spec with kubectl there, or use a local path or s3:// URI with `glmtune run`", where=where)
    spec = spec.model_copy(deep=True)
    spec.spec.output.uri = _under(workdir, spec.spec.output.uri)
    if spec.spec.data.cache is not None:
        spec.spec.data.cache = _under(workdir, spec.spec.data.cache)
    return spec


def _under(workdir: Path, location: str) -> str:
    """`location` itself when it is an s3:// URI or absolute path; otherwise that path inside `workdir`."""
    if storage.is_s3_uri(location):
        return location
    path = Path(location.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else workdir / path)


def prepare(spec: Any, workdir: str | os.PathLike[str], world_size: int | None = None, source: Any = None,
            on_event: EventCallback | None = None) -> Prepared:
    """Make the base model and the token records of `spec` once per work dir, then plan the steps.

    In a training process (`world_size` None) the topology comes from the launcher and the process group is
    joined: each work dir's writer prepares, the others wait on its marker. A caller that is about to launch
    `world_size` processes on this machine (`glmtune run --nproc`) passes it to prepare here, alone, and plan
    for them; such a Prepared cannot train (`run.train` refuses it). `source` replaces the records (tests).
    `on_event("model", 0, base)` hears when the base model is ready, before the records are built.
    """
    from glmtune_trainer.batches import build_batch_source
    from glmtune_trainer.distributed import (
        Topology,
        WorkDirRoles,
        init_distributed,
        read_topology,
        work_dir_roles,
    )
    from glmtune_trainer.loop import plan_steps
    from glmtune_trainer.model_setup import prepare_base_model
    from glmtune_trainer.run import seed_everything

    workdir = Path(workdir)
    training = spec.spec.training
    workdir.mkdir(parents=True, exist_ok=True)
    if world_size is None:
        topology = read_topology()
        init_distributed(topology)
        roles = work_dir_roles(topology, workdir)
    else:
        if world_size < 1:
            raise InvalidInputError(f"must be at least 1, got {world_size}", where="--nproc")
        topology = Topology(rank=0, world_size=world_size)
        roles = WorkDirRoles(writer=True, owner_node=0, all_shared=True)
    _check_nodes(spec, roles)
    seed_everything(training.seed)
    coordinated = world_size is None and topology.distributed

    def once(marker: Path, make: Any) -> Any:
        if not coordinated:
            return make()
        value = _prepare_once(roles, marker, make)
        if not roles.writer:
            _check_visible(value["path"] if isinstance(value, dict) else value, roles, topology)
        return value

    base = once(workdir / ".prepared-model.json", lambda: prepare_base_model(spec, workdir))
    if on_event is not None:
        on_event("model", 0, dict(base))
    records, reused = None, False
    if source is None:
        records = workdir / RECORDS_DIR
        before = _manifest_stamp(records)

        def build() -> str:
            from glmtune_trainer.data.build import BuildConfig, build_records

            config = BuildConfig.from_data_spec(spec.spec.data, tokenizer=base["path"], out=str(records),
                                                template=base["template"])
            return str(build_records(config).out)

        # Only the writer's view of "reused" is exact; it is what `glmtune run` reports.
        records = Path(once(workdir / ".prepared-records.json", build))
        source = build_batch_source(spec, records, topology)
        reused = before is not None and before == _manifest_stamp(records)
    per_epoch, total = plan_steps(source.num_micro_batches(), training.gradient_accumulation_steps,
                                  training.epochs, training.max_steps)
    return Prepared(spec=spec, workdir=workdir, topology=topology, roles=roles, base=base, source=source,
                    records=records, records_reused=reused, steps_per_epoch=per_epoch, total_steps=total)


def _manifest_stamp(records: Path) -> tuple[str, str] | None:
    """(hash, created) of a records folder's manifest, or None before the first build."""
    path = records / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest.get("hash", ""), manifest.get("created", "")


def _prepare_once(roles: Any, marker: Path, make: Any) -> Any:
    """The work dir's writer runs `make()` and writes `marker` (JSON); the others wait on that file.

    A marker left by an earlier launch is removed between two barriers first, so nobody reads it.
    """
    from glmtune_trainer.distributed import barrier, wait_for_file

    barrier()
    if roles.writer:
        marker.unlink(missing_ok=True)
    barrier()
    if roles.writer:
        value = make()
        storage.atomic_write_bytes(marker, json.dumps({"value": value}).encode())
        return value
    wait_for_file(marker, PREP_TIMEOUT_S, writer=f"local rank 0 of node {roles.owner_node}")
    return json.loads(marker.read_text(encoding="utf-8"))["value"]


def _check_visible(path: str, roles: Any, topology: Any) -> None:
    """A path prepared by another node's writer must exist here too (shared work dir, unshared cache)."""
    if not Path(path).exists():
        raise GlmtuneError(f"node {topology.node_rank} shares its work dir with node {roles.owner_node} but cannot "
                           f"see {path}, which that node prepared: mount GLMTUNE_CACHE and the work dir from the "
                           "same shared storage at the same paths on every node")


def _check_nodes(spec: Any, roles: Any) -> None:
    """Fail before any work when the nodes' work dirs cannot hold this run's checkpoints."""
    if spec.spec.training.deepspeed is not None and not roles.all_shared:
        raise InvalidInputError(
            "DeepSpeed ZeRO across nodes needs one work dir shared by every node: each rank writes its own "
            "optimizer shard and on resume every rank reads all of them. Put --workdir / GLMTUNE_WORKDIR on a "
            "ReadWriteMany volume (on Kubernetes: spec.resources.workdirClaim), or train without training.deepspeed "
            "(plain DDP works with per-node work dirs)",
            where="spec.training.deepspeed")

"""Process topology: the env torchrun and the Kubeflow training operator inject, process groups, barriers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK per process. A PyTorchJob pod started without torchrun
gets the pod-level MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK and PET_NNODES / PET_NPROC_PER_NODE /
PET_NODE_RANK; `torchrun_command` turns those into a torchrun launch so one pod command fits both.

Work-dir rule (one writer per directory): every node has its own work dir (a PyTorchJob pod's emptyDir)
unless the nodes share one (a ReadWriteMany volume). `work_dir_roles` finds out at start-up with a probe
file per node, and makes the local rank 0 of the lowest node that sees a directory its only writer: it
prepares the base model and the records there and writes the checkpoint files that belong in it. Every
other process waits on a marker in its OWN work dir (a file, not a collective, so slow preprocessing never
trips a gloo/NCCL timeout), so no process ever waits on a file written only on another node.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from glmtune.errors import GlmtuneError

PROBE_PREFIX = ".node-probe-"


@dataclass(frozen=True)
class Topology:
    """Where this process sits: global rank, world size, rank on its node, and its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_topology(env: dict[str, str] | None = None) -> Topology:
    """The topology from the launcher's environment (single process when nothing is set)."""
    env = os.environ if env is None else env
    return Topology(
        rank=int(env.get("RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        # torchrun's GROUP_RANK is the node's rank in the rendezvous; PET_NODE_RANK is what a pod was given.
        node_rank=int(env.get("GROUP_RANK", env.get("PET_NODE_RANK", "0"))),
    )


@dataclass(frozen=True)
class WorkDirRoles:
    """Who writes into this process's work dir: the local rank 0 of `owner_node`, the lowest node sharing it."""

    writer: bool
    owner_node: int
    all_shared: bool  # every node sees the same work dir (node 0's)


def work_dir_roles(topology: Topology, workdir: Path) -> WorkDirRoles:
    """Probe which nodes share `workdir`: each node's local rank 0 touches a file, then looks for the others'."""
    if not topology.distributed:
        return WorkDirRoles(writer=True, owner_node=topology.node_rank, all_shared=True)
    box = [uuid.uuid4().hex if topology.is_main else None]
    dist.broadcast_object_list(box, src=0)
    stem = f"{PROBE_PREFIX}{box[0]}-"
    probe = workdir / f"{stem}{topology.node_rank}"
    if topology.local_rank == 0:
        probe.touch()
    barrier()
    seen = None
    if topology.local_rank == 0:
        seen = sorted(int(found.name[len(stem):]) for found in workdir.glob(f"{stem}*"))
    gathered = [(node, nodes) for node, nodes in gather_objects((topology.node_rank, seen)) if nodes is not None]
    views = dict(gathered)
    if len(views) != len(gathered) or topology.node_rank not in views:
        raise GlmtuneError("several processes claim local rank 0 of the same node: launch with torchrun, which "
                           "sets GROUP_RANK and LOCAL_RANK per process")
    if topology.local_rank == 0:
        probe.unlink()  # everyone has looked: all_gather returned only after every rank contributed
    owner = min(views[topology.node_rank])
    return WorkDirRoles(writer=topology.local_rank == 0 and owner == topology.node_rank, owner_node=owner,
                        all_shared=all(min(nodes) == 0 for nodes in views.values()))


def gather_objects(value: object) -> list:
    """Every rank's `value`, in rank order ([value] in a single process)."""
    if not dist.is_initialized():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def per_directory(topology: Topology, roles: WorkDirRoles, compute: Callable[[], object]) -> object:
    """`compute()` run by the writer of each work dir; every rank gets the value of its own dir's writer."""
    value = compute() if roles.writer else None
    if not topology.distributed:
        return value
    found = {node: got for node, writer, got in gather_objects((topology.node_rank, roles.writer, value)) if writer}
    return found[roles.owner_node]


def torchrun_command(argv: list[str], env: dict[str, str] | None = None) -> list[str] | None:
    """The torchrun command that relaunches `argv` when a PyTorchJob pod runs us without torchrun.

    Returns None when already under torchrun (LOCAL_RANK set) or when no PET_* topology is present.
    """
    env = os.environ if env is None else env
    if "LOCAL_RANK" in env or "PET_NPROC_PER_NODE" not in env:
        return None
    nnodes = env.get("PET_NNODES", "1")
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={env['PET_NPROC_PER_NODE']}",
        f"--node_rank={env.get('PET_NODE_RANK', env.get('RANK', '0'))}",
        f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={env.get('MASTER_PORT', '29500')}",
        "-m", "glmtune_trainer", *argv,
    ]


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(topology: Topology, timeout_minutes: float = 30.0) -> None:
    """Join the default process group (gloo on CPU, NCCL on GPU) when running with several processes."""
    if not topology.distributed or dist.is_initialized():
        return
    _init_process_group(topology, timeout_minutes)


@contextlib.contextmanager
def process_group(topology: Topology, single_process: bool = False,
                  timeout_minutes: float = 30.0) -> Iterator[None]:
    """The run's process group: joined under a launcher, or (`single_process`) a world of one for DeepSpeed.

    DeepSpeed always needs torch.distributed; without RANK / WORLD_SIZE / MASTER_* it falls back to MPI
    discovery (mpi4py). A lone process therefore gets the missing rendezvous variables here (a free port on
    127.0.0.1; values the user or a pod set are kept), and the group and variables are removed on exit so a
    later run in the same process starts clean.
    """
    if topology.distributed or not single_process or dist.is_initialized():
        init_distributed(topology, timeout_minutes)
        yield
        return
    saved = {name: os.environ.get(name) for name in RENDEZVOUS_VARS}
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    try:
        _init_process_group(topology, timeout_minutes)
        yield
    finally:
        if dist.is_initialized():
            _destroy_world()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _destroy_world() -> None:
    """Leave the default process group, through DeepSpeed when it used it: DeepSpeed caches groups made
    from it, which a later world in this process would find stale ("Group ... is not registered")."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def _init_process_group(topology: Topology, timeout_minutes: float) -> None:
    """`init_process_group` from the environment; a failure becomes one message naming what to set."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(topology.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    except Exception as exc:  # noqa: BLE001 - any start-up failure gets the same explanation
        where = ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in RENDEZVOUS_VARS)
        advice = ("a launcher (torchrun, a PyTorchJob) sets them; in a single process unset them and glmtune "
                  "picks a free port on 127.0.0.1" if topology.world_size == 1 else
                  "launch with torchrun, which sets them for every process")
        raise GlmtuneError(f"torch.distributed could not start its {backend} process group ({where}): "
                           f"{type(exc).__name__}: {first_line(exc)}. Check MASTER_ADDR / MASTER_PORT "
                           f"(reachable, port free): {advice}") from exc


def import_deepspeed() -> Any:
    """The deepspeed module, told to use the CPU when glmtune computes on it (see `device_for`).

    Saying so spares DeepSpeed's "unable to detect" accelerator warning; an import failure becomes one
    message instead of a traceback.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - absent, or present but unusable on this machine
        raise GlmtuneError(f"training.deepspeed needs DeepSpeed, which failed to import ({type(exc).__name__}: "
                           f"{first_line(exc)}): pip install 'glmtune[train]', or drop training.deepspeed") from exc
    return deepspeed


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (torch appends C++ stacks), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else repr(exc)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now on `host` (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def device_for(topology: Topology) -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", topology.local_rank)
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float, device: torch.device | None = None) -> float:
    """Sum a number over ranks (identity in a single process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device or torch.device("cpu"))
    dist.all_reduce(tensor)
    return float(tensor.item())


def wait_for_file(path: Path, timeout_s: float, poll_s: float = 0.5, writer: str = "rank 0") -> None:
    """Block until `path` exists (written by `writer`), or fail naming it after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise GlmtuneError(f"timed out after {timeout_s:.0f}s waiting for {writer} to write {path}")
        time.sleep(poll_s)

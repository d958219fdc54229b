"""Process topology: the env torchrun and the Kubeflow training operator inject, process groups, barriers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK per process. A PyTorchJob pod started without torchrun
gets the pod-level MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK and PET_NNODES / PET_NPROC_PER_NODE /
PET_NODE_RANK; `torchrun_command` turns those into a torchrun launch so one pod command fits both.
Rank 0 prepares data while the others wait on a file (not on a collective), so slow preprocessing never
trips a gloo/NCCL timeout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from glmtune.errors import GlmtuneError

CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed"


@dataclass(frozen=True)
class Topology:
    """Where this process sits: global rank, world size, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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
    )


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


def init_distributed(topology: Topology, timeout_minutes: float = 30.0) -> None:
    """Join the default process group (gloo on CPU, NCCL on GPU) when running with several processes."""
    if not topology.distributed or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(topology.local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


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


def wait_for_file(path: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until `path` exists (written by rank 0), or fail naming it after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise GlmtuneError(f"timed out after {timeout_s:.0f}s waiting for rank 0 to write {path}")
        time.sleep(poll_s)


def deepspeed_config(
    stage: int,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    precision: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict:
    """The shipped ZeRO config for `stage`, completed with the run's batch sizes, clipping and precision."""
    config = json.loads((CONFIG_DIR / f"zero{stage}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * world_size
    config["gradient_clipping"] = max_grad_norm
    config["fp16"] = {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    config["bf16"] = {"enabled": precision == "bf16"}
    zero = config["zero_optimization"]
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return config

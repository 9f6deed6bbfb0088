"""Process groups and device meshes, built once from ParallelDims.

Ranks are numbered pp-major. Inside one pipeline stage the same ranks are seen two ways: the attention side as
DP x CP x TP (TP innermost, so tensor-parallel peers are neighbours), the MoE side as EDP x EP x ETP.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moonforge.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (or as a single process).

    NCCL on GPUs, gloo on CPUs. Returns (rank, world size, device).
    """
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Meshes:
    """Every mesh and group the parallel code uses; built collectively by ``build_meshes``."""

    dims: ParallelDims
    device: torch.device
    world: DeviceMesh        # (pp, dp, cp, tp)
    expert: DeviceMesh       # (pp, edp, ep, etp)
    dp_cp: DeviceMesh        # data-parallel replicas of the attention side (FSDP of dense parameters, loss tokens)
    stage: DeviceMesh        # all ranks of this pipeline stage (FSDP of MoE-side replicated parameters)
    cp_tp: DeviceMesh        # the ranks sharing one sequence (sequence-wise statistics of the MoE)
    # (replicate, shard=1) versions of dp_cp and stage, for replicated data parallelism; None unless asked for.
    dp_cp_replicate: DeviceMesh | None = None
    stage_replicate: DeviceMesh | None = None

    @property
    def tp(self) -> DeviceMesh:
        return self.world["tp"]

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]

    @property
    def pp(self) -> DeviceMesh:
        return self.world["pp"]

    @property
    def ep_etp(self) -> DeviceMesh:
        return self.expert["ep", "etp"]

    def group(self, name: str) -> dist.ProcessGroup:
        mesh = {"tp": self.world, "cp": self.world, "pp": self.world, "dp": self.world,
                "ep": self.expert, "etp": self.expert, "edp": self.expert}[name]
        return mesh.get_group(name)

    def coordinate(self, name: str) -> int:
        mesh = self.expert if name in ("ep", "etp", "edp") else self.world
        return mesh.get_local_rank(name)

    @property
    def dp_rank(self) -> int:
        return self.coordinate("dp")


def build_meshes(dims: ParallelDims, device: torch.device, replicate: bool = False) -> Meshes:
    world_size = dist.get_world_size()
    if dims.world_size != world_size:
        raise ValueError(f"layout {dims.describe()} needs {dims.world_size} processes, got {world_size}")
    device_type = device.type
    ranks = torch.arange(world_size)
    world = DeviceMesh(device_type, ranks.view(dims.pp, dims.dp, dims.cp, dims.tp),
                       mesh_dim_names=("pp", "dp", "cp", "tp"))
    expert = DeviceMesh(device_type, ranks.view(dims.pp, dims.edp, dims.ep, dims.etp),
                        mesh_dim_names=("pp", "edp", "ep", "etp"))
    dp_cp = world["dp", "cp"]._flatten("dp_cp")
    stage = world["dp", "cp", "tp"]._flatten("stage")
    cp_tp = world["cp", "tp"]._flatten("cp_tp")
    meshes = Meshes(dims=dims, device=device, world=world, expert=expert, dp_cp=dp_cp, stage=stage, cp_tp=cp_tp)
    if replicate:
        dense = DeviceMesh(device_type, ranks.view(dims.pp, dims.dp * dims.cp, dims.tp, 1).transpose(1, 2).contiguous(),
                           mesh_dim_names=("pp", "tp", "dp_cp_replicate", "dp_cp_shard"))
        meshes.dp_cp_replicate = dense["dp_cp_replicate", "dp_cp_shard"]
        whole = DeviceMesh(device_type, ranks.view(dims.pp, dims.stage_size, 1),
                           mesh_dim_names=("pp", "stage_replicate", "stage_shard"))
        meshes.stage_replicate = whole["stage_replicate", "stage_shard"]
    return meshes

"""Multi-process (gloo, 2 ranks) checkpoint tests: save in one parallel layout, load in another.

Layout A: experts as DTensors Shard(0) on an EP mesh, everything else FSDP2-sharded. Layout B: tensor parallel
(column/row-wise attention and MLPs, vocab-sharded embedding and lm_head, experts split on their intermediate
dimension). Plus one process with a plain model. Weights and AdamW states are compared bitwise as full tensors.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moonforge.checkpoint.hf import HFCheckpoint
from moonforge.checkpoint.native import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    load_model_weights,
    write_checkpoint_skeleton,
)
from moonforge.config import ModelConfig, preset
from moonforge.model import GroupedExperts, MLP, MLA, build_model

pytestmark = pytest.mark.slow
WORLD = 2


# ---------------------------------------------------------------------------------------------------- layouts
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _expert_params(model: nn.Module) -> list[tuple[GroupedExperts, str]]:
    return [(m, n) for m in model.modules() if isinstance(m, GroupedExperts) for n in ("gate_up_proj", "down_proj")]


def layout_ep_fsdp(model: nn.Module) -> nn.Module:
    """Experts Shard(0) over an 'ep' mesh, all other parameters FSDP2 Shard(0) over a 'dp' mesh (same ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    ep_mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
    dp_mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    ignored = set()
    for module, name in _expert_params(model):
        param = nn.Parameter(distribute_tensor(getattr(module, name).data, ep_mesh, [Shard(0)]))
        setattr(module, name, param)
        ignored.add(param)
    for block in model.model.layers.values():
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored)
    return model


def layout_tp(model: nn.Module) -> nn.Module:
    """Tensor parallel over a 'tp' mesh; experts split on their intermediate dimension (ETP-like)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    plan = {"model.embed_tokens": RowwiseParallel(), "lm_head": ColwiseParallel()}
    for name, module in model.named_modules():
        if isinstance(module, MLA):
            plan.update({f"{name}.q_proj": ColwiseParallel(), f"{name}.kv_b_proj": ColwiseParallel(),
                         f"{name}.o_proj": RowwiseParallel()})
        elif isinstance(module, MLP):
            plan.update({f"{name}.gate_proj": ColwiseParallel(), f"{name}.up_proj": ColwiseParallel(),
                         f"{name}.down_proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    for module, name in _expert_params(model):
        setattr(module, name, nn.Parameter(distribute_tensor(getattr(module, name).data, mesh, [Shard(2)])))
    return model


def fake_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One AdamW step with deterministic gradients (the same full gradient whatever the layout)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        grad = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if isinstance(param, DTensor):
            grad = distribute_tensor(grad, param.device_mesh, param.placements)
        param.grad = grad
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full tensors of the weights and optimizer states, keyed by name."""
    out = {f"model/{k}": _full(v) for k, v in ModelState(model).state_dict().items()}
    for k, v in OptimizerState(model, optimizer).state_dict().items():
        out[f"optim/{k}"] = _full(v) if isinstance(v, torch.Tensor) else v
    return out


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: different keys {set(got) ^ set(want)}"
    for k, w in want.items():
        if isinstance(w, torch.Tensor):
            assert got[k].dtype == w.dtype and torch.equal(got[k], w), f"{what}: {k} differs"
        else:
            assert got[k] == w, f"{what}: {k} is {got[k]!r}, want {w!r}"


# ---------------------------------------------------------------------------------------------------- workers
def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))


def _worker(rank: int, port: int, tmp: str) -> None:
    _init(rank, port)
    _save_and_reshard(rank, Path(tmp))
    _load_weights_sharded(Path(tmp) / "hf", Path(tmp) / "native")
    dist.destroy_process_group()


def _save_and_reshard(rank: int, tmp: Path) -> None:
    config = preset("tiny")
    model = layout_ep_fsdp(build_model(config, seed=0))
    optimizer = make_optimizer(model)
    fake_step(model, optimizer, seed=1)
    manager = CheckpointManager(tmp / "run", keep_last=2)
    if rank == 0:
        write_checkpoint_skeleton(tmp / "run", config, None)
    state = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer),
             "scheduler": {"last_epoch": 7, "base_lrs": [0.01]}, f"rng_rank{rank}": {"cpu": torch.get_rng_state()}}
    manager.save(7, state, {"consumed_tokens": 7 * 4096})
    want = snapshot(model, optimizer)
    if rank == 0:
        torch.save(want, tmp / "want.pt")

    # Asynchronous save: the step taken while it is in flight must not leak into the checkpoint.
    async_manager = CheckpointManager(tmp / "async", async_save=True)
    async_manager.save(8, state, {"consumed_tokens": 8 * 4096})
    fake_step(model, optimizer, seed=2)
    async_manager.wait()
    async_manager.close()

    # Load both checkpoints into the tensor-parallel layout.
    for root in ("run", "async"):
        model_b = layout_tp(build_model(config, seed=123))
        optimizer_b = make_optimizer(model_b)
        sched: dict = {}
        rng: dict = {}
        meta = CheckpointManager(tmp / root).load(
            {"model": ModelState(model_b), "optimizer": OptimizerState(model_b, optimizer_b), "scheduler": sched,
             f"rng_rank{rank}": rng})
        assert_same(snapshot(model_b, optimizer_b), want, f"TP layout from {root}")
        assert sched == {"last_epoch": 7, "base_lrs": [0.01]}
        assert torch.equal(rng["cpu"], state[f"rng_rank{rank}"]["cpu"])
        assert meta["world_size"] == WORLD


def _load_weights_sharded(hf_dir: Path, native_dir: Path) -> None:
    """load_model_weights from an HF directory and a converted checkpoint into both layouts."""
    config = ModelConfig.from_json(Path(hf_dir) / "config.json")
    ckpt = HFCheckpoint(hf_dir)
    want = {n: ckpt.read(n) for n in ckpt.native_names()}
    read_elements = []
    original_read = HFCheckpoint.read

    def counting_read(self, name, index=None):
        out = original_read(self, name, index)
        read_elements.append(out.numel())
        return out

    HFCheckpoint.read = counting_read
    for layout in (layout_ep_fsdp, layout_tp):
        for source in (hf_dir, native_dir):
            model = layout(build_model(config, seed=99))
            read_elements.clear()
            load_model_weights(model, source)
            got = {k: _full(v) for k, v in ModelState(model).state_dict().items()}
            for name, tensor in want.items():
                expect = tensor.float()  # the model is fp32; the router bias is fp32 whatever the source
                assert got[name].dtype == torch.float32 and torch.equal(got[name], expect), (layout, source, name)
            if source == hf_dir and layout is layout_ep_fsdp:
                # Every tensor is split over the two ranks: each reads about half of the model.
                total = sum(t.numel() for t in want.values())
                assert sum(read_elements) <= 0.55 * total, (sum(read_elements), total)
    HFCheckpoint.read = original_read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- tests
def test_save_in_one_layout_load_in_others(tmp_path):
    """EP+FSDP save (sync and async) -> TP load and one-process load; HF and converted weights -> both layouts."""
    from moonforge.checkpoint.convert import hf_to_native
    from tests.hf_reference import make_hf_model

    make_hf_model("moonlight", tmp_path / "hf", dtype=torch.bfloat16)
    hf_to_native(tmp_path / "hf", tmp_path / "native")
    # spawn, not fork: forking a process that already runs threads (torch's pools, earlier tests) can deadlock.
    workers = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn",
                                 join=False)
    deadline = time.time() + 300
    while not workers.join(timeout=5):
        if time.time() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the distributed workers did not finish within 300 s")
    want = torch.load(tmp_path / "want.pt")
    model = build_model(preset("tiny"), seed=5)
    optimizer = make_optimizer(model)
    meta = CheckpointManager(tmp_path / "run").load({"model": model, "optimizer": OptimizerState(model, optimizer)},
                                                    strict=False)
    assert_same(snapshot(model, optimizer), want, "one process")
    assert meta["iteration"] == 7 and meta["consumed_tokens"] == 7 * 4096

    # The sharded training checkpoint exports to Hugging Face's per-expert layout.
    from safetensors.torch import load_file

    from moonforge.checkpoint.convert import native_to_hf
    from moonforge.checkpoint.hf import native_to_hf as split_native

    native_to_hf(tmp_path / "run", tmp_path / "export")
    exported = {}
    for file in (tmp_path / "export").glob("*.safetensors"):
        exported.update(load_file(file))
    expect = {n: t for key, full in want.items() if key.startswith("model/")
              for n, t in split_native(key.removeprefix("model/"), full)}
    assert sorted(exported) == sorted(expect)
    for name, tensor in expect.items():
        assert torch.equal(exported[name], tensor), name


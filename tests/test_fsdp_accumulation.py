"""FSDP2's accumulation of unsharded gradients across micro-batches (``defer_grad_sync``), routed through
moonforge's element-wise kernels (moonforge.parallel.fsdp.route_unsharded_accumulation): bit-identical to
FSDP's own path and to summing each micro-batch's bf16 gradients in fp32 by hand; on the CPU and, where present,
on a GPU (NCCL)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moonforge.model import KERNELS
from moonforge.parallel.fsdp import route_unsharded_accumulation

MICRO_BATCHES = 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24, bias=False), nn.SiLU(), nn.Linear(24, 8, bias=False)).to(device)


def _inputs(device: str):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, 16, generator=g).to(device) for _ in range(MICRO_BATCHES)]


def _fsdp_grads(device: str) -> list[torch.Tensor]:
    model = _model(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=init_device_mesh(device, (1,)), mp_policy=mp)
    for i, x in enumerate(_inputs(device)):
        model.set_requires_gradient_sync(i == MICRO_BATCHES - 1)
        model(x).float().pow(2).sum().backward()
    return [p.grad.full_tensor() for p in model.parameters()]


def _by_hand(device: str) -> list[torch.Tensor]:
    """Each micro-batch's gradients in bf16, upcast, summed in fp32."""
    model = _model(device).bfloat16()
    totals = [torch.zeros(p.shape, device=device) for p in model.parameters()]
    for x in _inputs(device):
        model.zero_grad()
        model(x.bfloat16()).float().pow(2).sum().backward()
        for total, p in zip(totals, model.parameters()):
            total += p.grad.float()
    return totals


@pytest.mark.parametrize("device", DEVICES)
def test_routed_accumulation_is_fsdps_own_bit_for_bit(device, one_rank, kernels, monkeypatch):
    route_unsharded_accumulation()
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    calls = {"upcast": 0, "accumulate": 0}
    for name in calls:
        kernel = getattr(KERNELS, name)
        counted = lambda *a, _k=kernel, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _k(*a)  # noqa: E731
        monkeypatch.setattr(KERNELS, name, counted)
    routed = _fsdp_grads(device)
    n_params = len(list(_model("cpu").parameters()))
    assert calls == {"upcast": n_params, "accumulate": n_params * (MICRO_BATCHES - 1)}, calls

    for name, own in FSDPParam._moonforge_own.items():
        monkeypatch.setattr(FSDPParam, name, own)
    own = _fsdp_grads(device)
    reference = _by_hand(device)
    for r, o, h in zip(routed, own, reference):
        assert r.dtype == torch.float32
        torch.testing.assert_close(r, o, rtol=0, atol=0)
        torch.testing.assert_close(r, h, rtol=0, atol=0)

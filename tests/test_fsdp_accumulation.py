"""FSDP2's accumulation of unsharded gradients across micro-batches (``defer_grad_sync``), routed through
moonforge's element-wise kernels (moonforge.parallel.fsdp.route_unsharded_accumulation): bit-identical to
FSDP's own path and to summing each micro-batch's bf16 gradients in fp32 by hand; on the CPU and, where present,
on a GPU (NCCL), where the additions run on a stream of their own (moonforge.parallel.aside)."""

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


def _fsdp_grads(device: str, scribble: bool = False) -> list[torch.Tensor]:
    """``scribble``: after each backward, fill new tensors of the gradients' sizes with NaN (they take the memory
    of gradients just freed, if nothing holds it)."""
    model = _model(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model, mesh=init_device_mesh(device, (1,)), mp_policy=mp)
    for i, x in enumerate(_inputs(device)):
        model.set_requires_gradient_sync(i == MICRO_BATCHES - 1)
        model(x).float().pow(2).sum().backward()
        if scribble:
            junk = [torch.full(p.shape, float("nan"), dtype=torch.bfloat16, device=device)  # noqa: F841
                    for _ in range(4) for p in model.parameters()]
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

    calls = {"upcast_into": 0, "accumulate": 0}
    for name in calls:
        kernel = getattr(KERNELS, name)
        counted = lambda *a, _k=kernel, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _k(*a)  # noqa: E731
        monkeypatch.setattr(KERNELS, name, counted)
    routed = _fsdp_grads(device)
    n_params = len(list(_model("cpu").parameters()))
    assert calls == {"upcast_into": n_params, "accumulate": n_params * (MICRO_BATCHES - 1)}, calls

    for name, own in FSDPParam._moonforge_own.items():
        monkeypatch.setattr(FSDPParam, name, own)
    own = _fsdp_grads(device)
    reference = _by_hand(device)
    for r, o, h in zip(routed, own, reference):
        assert r.dtype == torch.float32
        torch.testing.assert_close(r, o, rtol=0, atol=0)
        torch.testing.assert_close(r, h, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("joined", [True, False])
def test_additions_aside_wait_for_their_inputs_and_are_waited_for(joined, one_rank, monkeypatch):
    """Every addition but the last micro-batch's runs on the side stream, made slow here (a sleep before each):
    the sums are still exact, so each addition waited for its gradient, no freed gradient's memory was written
    under it (the NaN scribbles), and the last reduction waited for all of them. Without that last wait the
    sums come out wrong: the check can fail."""
    from moonforge.parallel import aside

    route_unsharded_accumulation()
    streams = []

    def slow(kernel):
        def run(*args):
            torch.cuda._sleep(50_000_000)  # tens of ms on the stream the kernel is queued on
            streams.append(torch.cuda.current_stream())
            return kernel(*args)
        return run

    for name in ("upcast_into", "accumulate"):
        monkeypatch.setattr(KERNELS, name, slow(getattr(KERNELS, name)))
    if not joined:
        monkeypatch.setattr(aside, "join", lambda: None)
    grads = _fsdp_grads("cuda", scribble=True)
    torch.cuda.synchronize()
    monkeypatch.undo()
    aside.join()

    n_params = len(list(_model("cpu").parameters()))
    default = torch.cuda.default_stream()
    assert [s != default for s in streams] == [True] * (2 * n_params) + [False] * n_params
    matches = [torch.equal(g, h) for g, h in zip(grads, _by_hand("cuda"))]
    assert all(matches) if joined else not all(matches)


@pytest.mark.parametrize("device", DEVICES)
def test_passes_queued_aside_one_at_a_time(device, monkeypatch):
    """``aside.upcast``/``aside.accumulate`` outside any ``aside`` block (the one-GPU flat engine's and the expert
    weights' accumulation): each waits for its gradient and keeps it from reuse; ``join`` waits for all. On a GPU
    the side stream is made slow and each gradient is freed and scribbled over right after it is queued."""
    from moonforge.parallel import aside

    if device == "cuda":
        for name in ("upcast_into", "accumulate"):
            kernel = getattr(KERNELS, name)
            monkeypatch.setattr(KERNELS, name, lambda *a, _k=kernel: torch.cuda._sleep(20_000_000) or _k(*a))
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(3000, generator=g).bfloat16() for _ in range(4)]
    expected = values[0].float()
    for v in values[1:]:
        expected += v.float()

    total = None
    for v in values:
        grad = v.to(device) * 1  # a fresh tensor, freed below
        if total is None:
            total = aside.upcast(grad)
        else:
            aside.accumulate(total, grad)
        del grad
        junk = [torch.full((3000,), float("nan"), dtype=torch.bfloat16, device=device) for _ in range(4)]  # noqa: F841
    aside.join()
    assert total.dtype == torch.float32
    assert torch.equal(total.cpu(), expected)

"""Expert weights cast once per step (moonforge.parallel.expert._cast_once) against autograd's own cast, on the
CPU and, where present, on a GPU with the compiled (fused) gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moonforge.model import KERNELS, compile_kernels, expert_ffn
from moonforge.parallel.expert import _cast_once, release_weight_casts

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def kernels(request):
    if request.param:
        compile_kernels()
    yield
    KERNELS.reset()


def _experts(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = nn.Parameter((torch.randn(4, 2, 24, 16, generator=g) * 0.1).to(device))
    down = nn.Parameter((torch.randn(4, 16, 24, generator=g) * 0.1).to(device))
    return gate_up, down


def _micro_batches(device, n=3):
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([8, 0, 20, 12], device=device)
    return [(torch.randn(40, 16, generator=g).bfloat16().to(device), counts) for _ in range(n)]


def _grads(cast, device):
    gate_up, down = _experts(device)
    outs = []
    for x, counts in _micro_batches(device):
        out = expert_ffn(x, cast(gate_up), cast(down), counts)
        (out.float() ** 2).sum().backward()
        outs.append(out.detach())
    return gate_up.grad, down.grad, outs


@pytest.mark.parametrize("device", DEVICES)
def test_cast_once_gives_autograds_gradients_bit_for_bit(device, kernels):
    plain = _grads(lambda p: p.to(torch.bfloat16), device)
    cached = _grads(lambda p: _cast_once(p, torch.bfloat16), device)
    assert cached[0].dtype == torch.float32
    torch.testing.assert_close(cached[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(cached[1], plain[1], rtol=0, atol=0)
    for a, b in zip(cached[2], plain[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cast_once_reuses_the_copy_until_the_weights_change():
    gate_up, _ = _experts("cpu")
    first = _cast_once(gate_up, torch.bfloat16)
    assert _cast_once(gate_up, torch.bfloat16).data_ptr() == first.data_ptr()  # no second cast
    with torch.no_grad():
        gate_up.mul_(2)  # an optimizer step: in place, so the version counter moves
    second = _cast_once(gate_up, torch.bfloat16)
    torch.testing.assert_close(second.float(), gate_up.detach().bfloat16().float(), rtol=0, atol=0)
    release_weight_casts([gate_up])
    assert not hasattr(gate_up, "_moonforge_cast")

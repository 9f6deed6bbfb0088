"""The routed experts' compute: the grouped-GEMM SwiGLU (moonforge.model.expert_ffn, which rebuilds its SwiGLU
output in the backward) against plain autograd, and expert weights cast once per step or per use
(moonforge.parallel.expert) against autograd's own cast; on the CPU and, where present, on a GPU with the
compiled (fused) kernels."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moonforge.model import expert_ffn
from moonforge.parallel.expert import _cast_for_use, _cast_once, release_weight_casts

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def _plain_expert_ffn(x, gate_up, down, counts):
    """The same function written with autograd's own operations."""
    n_experts, _, inter, hidden = gate_up.shape
    offs = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x, gate_up.reshape(n_experts, 2 * inter, hidden).transpose(1, 2), offs=offs)
    gate, up = h.split(inter, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)


def _ffn_results(fn, device, dtype, counts, x, grad_out, gate_up, down):
    xs = x.detach().to(dtype).clone().requires_grad_()
    w = [t.detach().to(dtype).clone().requires_grad_() for t in (gate_up, down)]
    out = fn(xs, w[0], w[1], counts)
    out.backward(grad_out.to(dtype))
    return [t.float() for t in (out, xs.grad, w[0].grad, w[1].grad)]


@pytest.mark.parametrize("device", DEVICES)
def test_expert_ffn_gradients_match_autograd(device, kernels):
    """fp32: the same as autograd. bf16: no further from the fp32 result (relative L2 error) than autograd's own
    bf16 run; the SwiGLU gradient is formed in fp32 and rounded once, where autograd rounds twice."""
    gate_up, down = _experts(device)
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([8, 0, 20, 12], device=device)  # an expert without tokens too
    x, grad_out = torch.randn(40, 16, generator=g).to(device), torch.randn(40, 16, generator=g).to(device)
    args = (counts, x, grad_out, gate_up, down)
    exact = _ffn_results(_plain_expert_ffn, device, torch.float32, *args)
    ours32 = _ffn_results(expert_ffn, device, torch.float32, *args)
    ours16 = _ffn_results(expert_ffn, device, torch.bfloat16, *args)
    plain16 = _ffn_results(_plain_expert_ffn, device, torch.bfloat16, *args)
    for name, a, b, c, d in zip(("out", "d_x", "d_gate_up", "d_down"), ours32, exact, ours16, plain16):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} fp32: {m}")
        ours_err, plain_err = ((c - b).norm() / b.norm()).item(), ((d - b).norm() / b.norm()).item()
        assert ours_err <= 1.2 * plain_err + 1e-4, (name, ours_err, plain_err)
        torch.testing.assert_close(c, b, rtol=0.02, atol=0.02 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_cast_per_use_gives_the_cached_casts_gradients_and_keeps_no_copy(device, kernels):
    cached = _grads(lambda p: _cast_once(p, torch.bfloat16), device)
    gate_up, down = _experts(device)
    copies = []
    outs = []
    for x, counts in _micro_batches(device):
        (gu, gu_again), (dn, dn_again) = _cast_for_use(gate_up, torch.bfloat16), _cast_for_use(down, torch.bfloat16)
        copies += [weakref.ref(gu), weakref.ref(dn)]
        out = expert_ffn(x, gu, dn, counts, lambda: (gu_again(), dn_again()))
        del gu, dn
        gc.collect()
        # Between forward and backward no compute-dtype copy of the weights is alive.
        assert all(ref() is None for ref in copies)
        (out.float() ** 2).sum().backward()
        outs.append(out.detach())
    assert gate_up.grad.dtype == torch.float32
    torch.testing.assert_close(gate_up.grad, cached[0], rtol=0, atol=0)
    torch.testing.assert_close(down.grad, cached[1], rtol=0, atol=0)
    for a, b in zip(outs, cached[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

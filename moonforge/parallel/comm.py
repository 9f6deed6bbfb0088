"""Differentiable collectives on plain torch.distributed calls: issued and completed in program order on every
rank (no lazily-waited tensors), which keeps them safe next to FSDP's own collectives and compiled kernels."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows [sum(in_splits), ...] -> [sum(out_splits), ...]; the backward sends the gradients back."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_gather(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``; the backward sums the gradients and keeps this rank's part."""
    return _AllGather.apply(x, group, dim)


def reduce_scatter(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, keep this rank's chunk of ``dim``; the backward all-gathers the gradients."""
    return _ReduceScatter.apply(x, group, dim)


def host_values_later(t: torch.Tensor):
    """Start copying the small integer tensor ``t`` to the host; returns a function that waits for that copy
    alone and gives its values as a list.

    ``t.tolist()`` waits for all work queued so far and leaves the GPU idle until the host queues more. Queue the
    work that does not need the values between the two calls, and the GPU keeps busy with it while the host
    reads them. Off a GPU the values are read at once.
    """
    if t.device.type != "cuda":
        values = t.tolist()
        return lambda: values
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()

    return wait


def _all_to_all(x, out_splits, in_splits, group):
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _gather(x, group, dim):
    size = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out.movedim(0, dim)


def _scatter_sum(x, group, dim):
    size = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out.movedim(0, dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_sum(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _scatter_sum(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, ctx.dim), None, None


@torch.no_grad()
def all_reduce_in_place(tensors: list[torch.Tensor], group) -> None:
    """Sum each tensor over ``group`` in place, with one collective for all of them (same dtype)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()

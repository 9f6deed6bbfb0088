"""Expert parallelism: routed experts split over EP ranks (whole experts) and ETP ranks (slices of each expert's
intermediate dimension), with one of two token dispatchers.

Every rank of a pipeline stage enters the MoE with its own, distinct tokens. One MoE layer then does, with the
``alltoall`` dispatcher:

    ETP all-gather tokens and routing  ->  sort by expert  ->  EP all-to-all (dispatch)  ->  grouped GEMMs on the
    local experts' slices  ->  EP all-to-all (combine)  ->  weight and sum the k outputs  ->  ETP reduce-scatter

and with the ``allgather`` dispatcher:

    ETP and EP all-gather tokens and routing  ->  keep the (token, slot) pairs routed to local experts  ->
    grouped GEMMs  ->  weight and sum them per token  ->  EP and ETP reduce-scatter

Per rank and direction the all-to-all moves about T*k*(EP-1)/EP rows of a layer's T tokens and k slots, the
all-gather T*(EP-1): the all-gather sends less while EP < k (Moonlight: k = 6). Its shapes are static, so the
host never waits for the GPU, where the all-to-all waits once per layer for the split sizes. Its cost is memory:
the gathered tokens and EP*T*k rows for every slot through the experts' activations and the combine (the rows of
slots routed elsewhere are carried, not computed), which grows with EP.

Routed expert weights are fp32 masters; each step casts them to the compute dtype once, not per micro-batch
(``_cast_once``), or, to save memory, per use (``_cast_for_use``); their bf16 gradients are added straight into
the fp32 ``.grad``.

Expert weights become DTensors on the (ep, etp) mesh with placements (Shard(0), Shard(2)): global shapes stay
[E, 2, I, H] / [E, H, I], so checkpoints do not depend on the layout. Replicas across EDP get their gradients
summed by ``reduce_expert_grads``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moonforge.model import KERNELS, GroupedExperts, MoE, expert_ffn, expert_rows, sort_by_expert
from moonforge.parallel.comm import all_gather, all_reduce_in_place, all_to_all, host_values_later, reduce_scatter
from moonforge.parallel.mesh import Meshes


DISPATCHERS = ("alltoall", "allgather")


def apply_expert_parallel(parts: list[nn.Module], meshes: Meshes, dispatcher: str = "alltoall",
                          cache_casts: bool = True) -> list[nn.Parameter]:
    """Shard every MoE's routed experts over (EP, ETP); returns the expert parameters (FSDP must ignore them).

    ``cache_casts``: keep each expert weight's compute-dtype copy from its first use until the optimizer step
    (one cast per step); otherwise cast it per use, in the forward and again in the backward, so that only the
    layers being computed hold copies (at Moonlight EP 2, 14 GB less per GPU).
    """
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"unknown expert dispatcher {dispatcher!r}; choose one of {', '.join(DISPATCHERS)}")
    dims = meshes.dims
    params: list[nn.Parameter] = []
    if dims.ep * dims.etp == 1:
        return params
    mesh = meshes.ep_etp
    placements = (Shard(0), Shard(2))
    for part in parts:
        for moe in (m for m in part.modules() if isinstance(m, MoE)):
            experts = moe.experts
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(experts, name)
                dt = distribute_tensor(param.data, mesh, placements, src_data_rank=None) \
                    if param.device.type != "meta" else DTensor.from_local(
                        torch.empty(_local_shape(param.shape, mesh, placements), device="meta", dtype=param.dtype),
                        mesh, placements, run_check=False)
                new = nn.Parameter(dt, requires_grad=param.requires_grad)
                setattr(experts, name, new)
                params.append(new)
            # Eager even inside a compiled block: collectives, DTensor shards and per-step weight casts.
            experts.forward = torch.compiler.disable(_ParallelExperts(experts, meshes, dispatcher, cache_casts).forward)
    return params


def _local_shape(shape, mesh, placements) -> tuple[int, ...]:
    local = list(shape)
    for dim_size, p in zip(mesh.shape, placements):
        local[p.dim] //= dim_size
    return tuple(local)


class _ParallelExperts:
    """Replacement forward for a GroupedExperts whose weights are (EP, ETP)-sharded DTensors."""

    def __init__(self, experts: GroupedExperts, meshes: Meshes, dispatcher: str, cache_casts: bool = True):
        self.experts = experts
        self.cache_casts = cache_casts
        self.dispatcher = dispatcher if meshes.dims.ep > 1 else "alltoall"  # EP 1: nothing to dispatch
        self.ep_rank = meshes.coordinate("ep")
        self.ep_group = meshes.group("ep")
        self.etp_group = meshes.group("etp")
        self.ep = meshes.dims.ep
        self.etp = meshes.dims.etp
        self.n_experts = experts.gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.cache_casts:
            gate_up = _cast_once(self.experts.gate_up_proj, x.dtype)
            down = _cast_once(self.experts.down_proj, x.dtype)
            again = None
        else:
            (gate_up, gate_up_again), (down, down_again) = (_cast_for_use(self.experts.gate_up_proj, x.dtype),
                                                            _cast_for_use(self.experts.down_proj, x.dtype))
            again = (lambda: (gate_up_again(), down_again())) if gate_up_again is not None else None
        quantized = self.experts.quantized_weights(
            gate_up, down, sources=(_local(self.experts.gate_up_proj), _local(self.experts.down_proj))) \
            if self.experts.fp8 else None
        if self.etp > 1:
            x = all_gather(x, self.etp_group)
            weights = all_gather(weights, self.etp_group)
            indices = _all_gather_no_grad(indices, self.etp_group)
        if self.dispatcher == "allgather":
            out = self._gather_compute_scatter(x, weights, indices, gate_up, down, again, quantized)
        else:
            out = self._sort_and_exchange(x, weights, indices, gate_up, down, again, quantized)
        if self.etp > 1:
            out = reduce_scatter(out, self.etp_group)
        return out

    def _sort_and_exchange(self, x, weights, indices, gate_up, down, again, quantized) -> torch.Tensor:
        top_k = indices.shape[1]
        order, counts = sort_by_expert(indices, self.n_experts)
        if self.ep > 1:
            h = self._dispatch_compute_combine(x, order, top_k, counts, gate_up, down, again, quantized)
        else:
            h = expert_ffn(expert_rows(x, order, top_k), gate_up, down, counts, again, fp8=self.experts.fp8,
                           quantized=quantized)
        return KERNELS.combine(h, order, weights)

    def _gather_compute_scatter(self, x, weights, indices, gate_up, down, again, quantized) -> torch.Tensor:
        local_experts = self.n_experts // self.ep
        indices = _all_gather_no_grad(indices, self.ep_group)
        top_k = indices.shape[1]
        # Slots routed elsewhere get the key local_experts and sort last. Every slot keeps its row, so no shape
        # depends on the routing and the host never waits for the GPU: the grouped GEMMs stop where the local
        # experts' rows end (``routed``), and the combine and the rows' backward ignore what follows.
        key = indices - self.ep_rank * local_experts
        key = torch.where((key >= 0) & (key < local_experts), key, local_experts)
        order, counts = sort_by_expert(key, local_experts + 1)
        routed = key.numel() - counts[-1]
        x = all_gather(x, self.ep_group)
        weights = all_gather(weights, self.ep_group)
        h = expert_ffn(expert_rows(x, order, top_k, routed), gate_up, down, counts[:-1], again,
                       fp8=self.experts.fp8, quantized=quantized, rows_again=lambda: x[order // top_k])
        return reduce_scatter(KERNELS.combine(h, order, weights, routed), self.ep_group)

    def _dispatch_compute_combine(self, x: torch.Tensor, order: torch.Tensor, top_k: int, counts: torch.Tensor,
                                  gate_up: torch.Tensor, down: torch.Tensor, again=None,
                                  quantized=None) -> torch.Tensor:
        """Send ``x[order // top_k]`` (sorted by expert, ``counts`` per expert) to the ranks holding their experts,
        compute, and bring the results back in the same order."""
        ep, local_experts = self.ep, self.n_experts // self.ep
        send = counts.view(ep, local_experts)                  # rows for each destination rank, per its expert
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)  # recv[src, e]: rows from src for local expert e
        # One host synchronisation per layer for the split sizes; the GPU gathers the rows meanwhile.
        splits = host_values_later(torch.stack([send.sum(1), recv.sum(1)]))
        routed = expert_rows(x, order, top_k)
        send_splits, recv_splits = splits()
        received = all_to_all(routed, recv_splits, send_splits, self.ep_group)
        # Received rows are ordered (source rank, expert); the grouped GEMM wants (expert, source rank).
        segment = torch.arange(ep * local_experts, device=routed.device).view(ep, local_experts)
        segment_of_row = torch.repeat_interleave((segment % local_experts) * ep + segment // local_experts,
                                                 recv.flatten(), output_size=received.shape[0])
        by_expert = segment_of_row.argsort(stable=True)
        h = expert_ffn(received[by_expert], gate_up, down, recv.sum(0), again, fp8=self.experts.fp8,
                       quantized=quantized)
        h = torch.empty_like(h).index_copy_(0, by_expert, h)
        return all_to_all(h, send_splits, recv_splits, self.ep_group)


def _local(param: nn.Parameter) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _local_master(param: nn.Parameter, dtype: torch.dtype) -> torch.Tensor | None:
    """The local shard of ``param`` when it is a master weight whose gradient must come back through a cast to
    ``dtype``; None when a plain ``.to(dtype)`` does (same dtype, or no gradient wanted)."""
    local = _local(param)
    if local.dtype == dtype or not param.requires_grad or not torch.is_grad_enabled():
        return None
    return local


def _cast_once(param: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    """The local shard of an fp32 expert weight in ``dtype``, cast once per optimizer step.

    The copy is kept on the parameter until its value changes (the optimizer's in-place update bumps the
    version counter) or ``release_weight_casts`` drops it. In the backward the low-precision gradient is added
    straight into the fp32 ``param.grad``: one pass instead of a cast, a temporary and an accumulation per
    micro-batch.
    """
    local = _local_master(param, dtype)
    if local is None:
        return _local(param).to(dtype)
    cache = getattr(param, "_moonforge_cast", None)
    key = (dtype, local.data_ptr(), local._version)
    if cache is None or cache[0] != key:
        cache = (key, local.detach().to(dtype))
        param._moonforge_cast = cache
    return _AccumulateInto.apply(local, cache[1], param)


def _cast_for_use(param: nn.Parameter, dtype: torch.dtype):
    """The local shard of an fp32 expert weight in ``dtype``, cast afresh, and a function that casts it again
    (None when no gradient is needed). Its gradient is added into the fp32 ``param.grad`` as with _cast_once."""
    local = _local_master(param, dtype)
    if local is None:
        return _local(param).to(dtype), None
    master = local.detach()
    return _AccumulateInto.apply(local, master.to(dtype), param), lambda: master.to(dtype)


class _AccumulateInto(torch.autograd.Function):
    """Identity on a cached low-precision copy of ``master``; the backward adds the gradient into param.grad."""

    @staticmethod
    def forward(ctx, master, low, param):
        ctx.param = param
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad):
        param = ctx.param
        if param.grad is None:  # the gradient in the master's dtype (always a copy: ``low`` has another dtype)
            local = (KERNELS.upcast(grad) if param.dtype == torch.float32 else grad.to(param.dtype)).contiguous()
            param.grad = (DTensor.from_local(local, param.device_mesh, param.placements, run_check=False)
                          if isinstance(param, DTensor) else local)
        else:
            KERNELS.accumulate(_local(param.grad), grad)
        return None, None, None


def release_weight_casts(params: list[nn.Parameter]) -> None:
    """Free the cached low-precision copies (before the optimizer step: they would be stale after it)."""
    for p in params:
        if hasattr(p, "_moonforge_cast"):
            del p._moonforge_cast


def _all_gather_no_grad(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = torch.empty((size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


@torch.no_grad()
def reduce_expert_grads(expert_params: list[nn.Parameter], meshes: Meshes) -> None:
    """Sum expert gradients over EDP replicas (FSDP does not manage expert parameters)."""
    if meshes.dims.edp == 1 or not expert_params:
        return
    all_reduce_in_place([_local(p.grad) for p in expert_params if p.grad is not None], meshes.group("edp"))

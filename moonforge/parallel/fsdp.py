"""Data parallelism with FSDP2: parameters, gradients and optimizer state sharded over the data-parallel ranks
(``data_parallel: fsdp``, the seed's DO=true), or replicated with gradients all-reduced (``replicate``).

Groups: one per decoder block (over DP x CP), and the root (embedding, final norm, lm_head). With tensor
parallelism the MoE side of each block (shared experts; routed experts when EP x ETP = 1) is a group of its own
over the whole stage: its tokens differ on every rank of the stage, TP ranks included. Without it, the block's
group holds the MoE side too: fewer groups, so fewer FSDP hooks for the host to run per block and fewer breaks
in a compiled block. Expert-parallel weights are left to ``expert.reduce_expert_grads``; the routers' weights
stay whole fp32 tensors on every rank of the stage, outside FSDP, and ``reduce_replicated_grads`` sums their
gradients. Gradients are summed, not averaged: the loss is already divided by the global number of loss tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from moonforge.model import KERNELS, MoE, Transformer
from moonforge.parallel.comm import all_reduce_in_place
from moonforge.parallel.mesh import Meshes


def apply_fsdp(part: Transformer, meshes: Meshes, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               replicate: bool, reshard_after_forward: bool, ignored_params: set[nn.Parameter],
               offload_blocks: int = 0) -> list:
    """Wrap ``part`` with fully_shard; returns the FSDP modules (for gradient-sync control)."""
    route_unsharded_accumulation()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Inside an MoE the inputs are left as they are: the routing weights must stay fp32 (FSDP would cast them
    # to the compute dtype), and activation checkpointing must see the same dtypes when it recomputes.
    moe_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    dense_mesh = meshes.dp_cp_replicate if replicate else meshes.dp_cp
    stage_mesh = meshes.stage_replicate if replicate else meshes.stage
    ignored_params = set(ignored_params) | set(router_params(part))
    wrapped = []

    def shard(modules, mesh, **kwargs) -> None:
        wrapped.append(fully_shard(modules, mesh=mesh, ignored_params=ignored_params, **kwargs))
        if mesh.size() > 1:  # over one rank FSDP's default sums as it is; a factor, even 1, costs a pass
            _sum_gradients(wrapped[-1])

    part.offloaded_blocks = list(part.model.layers.values())[:offload_blocks]
    for i, block in enumerate(part.model.layers.values()):
        offload: OffloadPolicy = CPUOffloadPolicy() if i < offload_blocks else OffloadPolicy()
        if isinstance(block.mlp, MoE) and meshes.dims.tp > 1:
            moe = block.mlp
            moe_modules = [m for m in (moe.shared_experts, moe.experts) if m is not None]
            shard(moe_modules, stage_mesh, mp_policy=moe_mp, offload_policy=offload,
                  reshard_after_forward=reshard_after_forward)
        shard(block, dense_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    shard(part, dense_mesh, mp_policy=mp, reshard_after_forward=False)
    for module in wrapped[:-1]:
        state_module(module).configured_reshard_after_forward = reshard_after_forward
    state_module(wrapped[-1]).configured_reshard_after_forward = False
    return wrapped


def router_params(part: Transformer) -> list[nn.Parameter]:
    """The routers' weights: fp32 on every rank of the stage whatever the compute dtype (routing decisions are
    sensitive to rounding), 64 x 2048 each for Moonlight, so replicating them costs nothing."""
    return [m.gate.weight for m in part.modules() if isinstance(m, MoE)]


@torch.no_grad()
def reduce_replicated_grads(params: list[nn.Parameter], meshes: Meshes) -> None:
    """Sum the gradients of parameters held whole on every rank of a stage over that stage, in one collective."""
    if meshes.dims.stage_size > 1:
        all_reduce_in_place([p.grad for p in params if p.grad is not None], meshes.stage.get_group())


def state_module(module):
    return module[0] if isinstance(module, list) else module  # modules sharded together share one FSDP state


def _sum_gradients(module) -> None:
    module = state_module(module)
    module.set_gradient_divide_factor(1.0)
    # A plain sum needs no pre-multiplied reduction (which gloo lacks and NCCL cannot do zero-copy).
    module.set_force_sum_reduction_for_comms(True)


def route_unsharded_accumulation() -> None:
    """Have FSDP2 upcast and accumulate unsharded gradients across micro-batches (``defer_grad_sync``: low-precision
    gradients summed in the fp32 reduce dtype) with moonforge's element-wise kernels, which ``compile_kernels``
    fuses. Those passes run once per parameter and micro-batch. On one H100 (20 layers x 8 experts, 4
    micro-batches) they took 33 ms per step this way, against 48 ms through aten's mixed-dtype kernels.

    Same arithmetic either way (each value upcast, then one fp32 addition), so the results are bit-identical;
    anything other than plain contiguous tensors into fp32 takes FSDP's own path. Installed once per process, on
    FSDP's parameter class (a private one: a torch without these methods is left as it is)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    except ImportError:
        return
    names = ("to_accumulated_grad_if_needed", "accumulate_unsharded_grad_if_needed")
    if getattr(FSDPParam, "_moonforge_routed", False) or not all(hasattr(FSDPParam, n) for n in names):
        return
    own_upcast, own_accumulate = (getattr(FSDPParam, n) for n in names)

    def plain(t) -> bool:
        return type(t) is torch.Tensor and t.is_contiguous()

    def to_accumulated_grad_if_needed(self) -> None:
        grad = self._unsharded_param.grad
        if grad is None or self.reduce_dtype != torch.float32 or grad.dtype == torch.float32 or not plain(grad):
            return own_upcast(self)
        self._unsharded_param.grad = None
        self.unsharded_accumulated_grad = KERNELS.upcast(grad.view(-1)).view(grad.shape)

    def accumulate_unsharded_grad_if_needed(self) -> None:
        total = self.unsharded_accumulated_grad
        grad = self.unsharded_param.grad if total is not None else None
        if grad is None or not (plain(total) and plain(grad)) or total.shape != grad.shape:
            return own_accumulate(self)
        KERNELS.accumulate(total.view(-1), grad.view(-1))
        self.unsharded_param.grad = None

    FSDPParam.to_accumulated_grad_if_needed = to_accumulated_grad_if_needed
    FSDPParam.accumulate_unsharded_grad_if_needed = accumulate_unsharded_grad_if_needed
    FSDPParam._moonforge_routed = True
    FSDPParam._moonforge_own = dict(zip(names, (own_upcast, own_accumulate)))  # for tests: FSDP's own path

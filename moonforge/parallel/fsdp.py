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

from moonforge.model import MoE, Transformer
from moonforge.parallel.comm import all_reduce_in_place
from moonforge.parallel.mesh import Meshes


def apply_fsdp(part: Transformer, meshes: Meshes, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               replicate: bool, reshard_after_forward: bool, ignored_params: set[nn.Parameter],
               offload_blocks: int = 0) -> list:
    """Wrap ``part`` with fully_shard; returns the FSDP modules (for gradient-sync control)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Inside an MoE the inputs are left as they are: the routing weights must stay fp32 (FSDP would cast them
    # to the compute dtype), and activation checkpointing must see the same dtypes when it recomputes.
    moe_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    dense_mesh = meshes.dp_cp_replicate if replicate else meshes.dp_cp
    stage_mesh = meshes.stage_replicate if replicate else meshes.stage
    ignored_params = set(ignored_params) | set(router_params(part))
    wrapped = []
    part.offloaded_blocks = list(part.model.layers.values())[:offload_blocks]
    for i, block in enumerate(part.model.layers.values()):
        offload: OffloadPolicy = CPUOffloadPolicy() if i < offload_blocks else OffloadPolicy()
        if isinstance(block.mlp, MoE) and meshes.dims.tp > 1:
            moe = block.mlp
            moe_modules = [m for m in (moe.shared_experts, moe.experts) if m is not None]
            wrapped.append(fully_shard(moe_modules, mesh=stage_mesh, mp_policy=moe_mp, offload_policy=offload,
                                       reshard_after_forward=reshard_after_forward, ignored_params=ignored_params))
        wrapped.append(fully_shard(block, mesh=dense_mesh, mp_policy=mp, offload_policy=offload,
                                   reshard_after_forward=reshard_after_forward, ignored_params=ignored_params))
    wrapped.append(fully_shard(part, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False,
                               ignored_params=ignored_params))
    for module in wrapped:
        _sum_gradients(module)
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

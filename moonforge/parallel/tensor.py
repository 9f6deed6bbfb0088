"""Tensor parallelism (Megatron-style, with optional sequence parallelism) through DTensor.

Attention: q_proj / q_b_proj and kv_b_proj column-parallel (each rank keeps whole heads), o_proj row-parallel;
the small latent projections (q_a_proj, kv_a_proj_with_mqa and their norms) stay replicated. Dense MLP:
gate/up column-parallel, down row-parallel. Embedding row-parallel over the vocabulary, lm_head column-parallel.
With SP, norms and residuals hold a 1/TP share of the sequence.

MoE layers are not tensor-parallel: their input is the rank's own share of the sequence (SP keeps it so; without
SP it is cut out and gathered back), so the router, shared experts and experts see distinct tokens on each TP
rank and take their gradient sums from FSDP over the whole stage (see ``fsdp.py``). Routed experts can still
be split over ETP (``expert.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from moonforge.model import MLP, MoE, Transformer
from moonforge.parallel.mesh import Meshes


def apply_tensor_parallel(part: Transformer, meshes: Meshes) -> None:
    tp_mesh = meshes.tp
    sp = meshes.dims.sp
    seq = Shard(1) if sp else Replicate()
    m = part.model
    plan: dict[str, object] = {}
    if m.embed_tokens is not None:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if m.norm is not None:
        plan["model.norm"] = SequenceParallel() if sp else NoParallel()
    if part.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate(), use_local_output=True)
    parallelize_module(part, tp_mesh, plan)

    for block in m.layers.values():
        attn = block.self_attn
        layer_plan: dict[str, object] = {
            "input_layernorm": SequenceParallel() if sp else NoParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None), use_local_output=True),
            "self_attn.kv_a_proj_with_mqa": NoParallel(),
            "self_attn.kv_a_layernorm": NoParallel(),
            "self_attn.kv_b_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
            "post_attention_layernorm": SequenceParallel() if sp else NoParallel(),
        }
        if attn.q_lora_rank is None:
            layer_plan["self_attn.q_proj"] = ColwiseParallel()
        else:
            layer_plan.update({"self_attn.q_a_proj": NoParallel(), "self_attn.q_a_layernorm": NoParallel(),
                               "self_attn.q_b_proj": ColwiseParallel()})
        if isinstance(block.mlp, MLP):
            layer_plan.update({
                "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                          use_local_output=True),
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=seq),
            })
        parallelize_module(block, tp_mesh, layer_plan)
        attn.latent_hooks.append(_SumRopeKeyGrad(meshes.group("tp")))
        if isinstance(block.mlp, MoE):
            _make_moe_sequence_local(block.mlp, meshes)


class NoParallel(PrepareModuleInputOutput):
    """Replicated parameters inside a tensor-parallel region (DTensor Replicate); local tensor out."""

    def __init__(self):
        super().__init__(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                         output_layouts=(Replicate(),), desired_output_layouts=(Replicate(),),
                         use_local_input=False, use_local_output=True)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        return distribute_module(module, device_mesh, _replicate_params)


def _replicate_params(name, module, device_mesh):
    for pname, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()]),
                                                      requires_grad=param.requires_grad))


def _make_moe_sequence_local(moe: MoE, meshes: Meshes) -> None:
    """Give the MoE this rank's own tokens: the SP shard as a local tensor, or (without SP) a 1/TP slice."""
    group = meshes.group("tp")
    sp = meshes.dims.sp
    forward = moe.forward

    def local_forward(x):
        if sp:  # the residual stream is the local sequence shard; the norm hands over a Shard(1) DTensor
            return forward(x.to_local())
        return _GatherSequence.apply(forward(_SliceSequence.apply(x, group)), group)

    moe.forward = local_forward


class _SumRopeKeyGrad:
    """The RoPE key is shared by all heads, but each TP rank back-propagates through its own heads only: sum its
    gradient over the TP group (the latent c_kv gets that sum from kv_b_proj's column-parallel input)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, c_kv, k_pe):
        return c_kv, _AllReduceGrad.apply(k_pe, self.group)


class _AllReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SliceSequence(torch.autograd.Function):
    """Forward: keep this rank's 1/TP of the sequence (dim 1). Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(size, dim=1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather the sequence (dim 1). Backward: keep this rank's slice (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=1)[rank].contiguous(), None


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)

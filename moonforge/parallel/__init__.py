"""Apply parallelism to a Transformer from outside: pipeline split, tensor/sequence, expert, context, activation
checkpointing, compilation and FSDP, in that order (TorchTitan's recipe). Also the gradient norm over
differently sharded parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moonforge import fp8
from moonforge.model import MoE, Router, Transformer, compile_blocks as compile_each_block, compile_kernels
from moonforge.parallel.checkpointing import apply_activation_checkpointing
from moonforge.parallel.context import apply_context_parallel
from moonforge.parallel.dims import ParallelDims
from moonforge.parallel.expert import apply_expert_parallel, reduce_expert_grads, release_weight_casts
from moonforge.parallel.fsdp import apply_fsdp, reduce_replicated_grads, router_params, state_module
from moonforge.parallel.mesh import Meshes, build_meshes, init_distributed
from moonforge.parallel.pipeline import split_stages
from moonforge.parallel.tensor import apply_tensor_parallel

logger = logging.getLogger(__name__)

__all__ = ["ParallelDims", "ParallelModel", "Meshes", "build_meshes", "init_distributed", "parallelize",
           "clip_grad_norm"]


@dataclass
class ParallelModel:
    """The model parts this rank runs, and what the trainer needs to drive them."""

    parts: list[Transformer]
    stage_ids: list[int]
    meshes: Meshes
    expert_params: list[nn.Parameter] = field(default_factory=list)
    fsdp_modules: list = field(default_factory=list)
    fp8_modules: list[nn.Module] = field(default_factory=list)  # those that may cache FP8 weight copies

    @property
    def num_stages(self) -> int:
        return len(self.meshes.dims.stage_layers(self.parts[0].config.num_hidden_layers))

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def replicated_params(self) -> list[nn.Parameter]:
        """Held whole on every rank of the stage, outside FSDP (the routers' weights); ``reduce_gradients``
        sums their gradients. Looked up each time: materialising replaces plain parameters."""
        return [p for part in self.parts for p in router_params(part)] if self.fsdp_modules else []

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def named_parameters(self):
        for part in self.parts:
            yield from part.named_parameters()

    def routers(self) -> dict[int, Router]:
        routers = {}
        for part in self.parts:
            routers.update(part.routers())
        return routers

    def moe_layers(self) -> list[MoE]:
        return [m for part in self.parts for m in part.modules() if isinstance(m, MoE)]

    def set_gradient_sync(self, sync: bool) -> None:
        """Whether the next backward reduce-scatters FSDP gradients and reshards the weights. Off for all but a
        step's last micro-batch: gradients accumulate unsharded (in the reduce dtype) and the weights stay
        gathered from the step's first forward to its last backward, so each step gathers and reduces once
        instead of once per micro-batch. Recomputation then finds the weights as the forward did (selective
        recomputation requires it). ``end_gradient_sync_step`` restores the configured resharding."""
        for module in self.fsdp_modules:
            module = state_module(module)
            module.set_requires_gradient_sync(sync, recurse=False)
            module.set_reshard_after_backward(sync, recurse=False)
            module.set_reshard_after_forward(False, recurse=False)

    def end_gradient_sync_step(self) -> None:
        for module in self.fsdp_modules:
            module = state_module(module)
            module.set_reshard_after_forward(module.configured_reshard_after_forward, recurse=False)

    def reduce_gradients(self) -> None:
        """Gradient sums FSDP does not do itself (expert weights over their data-parallel replicas); call after
        the last backward of a step. Also frees the step's low-precision copies of the weights (expert casts,
        FP8 copies): the optimizer step is about to change the weights."""
        release_weight_casts(self.expert_params)
        fp8.release_cached(self.fp8_modules)
        reduce_expert_grads(self.expert_params, self.meshes)
        reduce_replicated_grads(self.replicated_params, self.meshes)


def parallelize(model: Transformer, meshes: Meshes, *, param_dtype: torch.dtype = torch.float32,
                reduce_dtype: torch.dtype = torch.float32, use_fsdp: bool = True, replicate: bool = False,
                reshard_after_forward: bool = True, activation_checkpointing: str = "none",
                ac_layers: int | None = None, compile: bool = False, compile_blocks: bool = False,
                attention_backend: str = "sdpa",
                offload_fraction: float = 0.0, ep_dispatcher: str = "alltoall",
                cache_expert_casts: bool = True) -> ParallelModel:
    """Parallelise a model built on the meta device; materialise with ``materialize`` afterwards."""
    if compile_blocks and activation_checkpointing == "sel":
        raise ValueError("compile_blocks does not combine with selective recomputation (its dispatch mode makes "
                         "compiled blocks fall back to eager); use full recomputation or none")
    dims = meshes.dims
    if dims.pp > 1:
        if model.config.tie_word_embeddings:
            raise ValueError("pipeline parallelism with tied embeddings is not supported")
        parts, stage_ids = split_stages(model, meshes)
    else:
        parts, stage_ids = [model], [0]
    pm = ParallelModel(parts=parts, stage_ids=stage_ids, meshes=meshes)
    pm.fp8_modules = [m for part in parts for m in part.modules() if getattr(m, "fp8_cache_weights", False)]
    sequence_split = dims.cp > 1 or dims.tp > 1
    for part in parts:
        part.attn_backend = attention_backend
        if dims.tp > 1:
            apply_tensor_parallel(part, meshes)
        pm.expert_params += apply_expert_parallel([part], meshes, ep_dispatcher, cache_expert_casts)
        if dims.cp > 1:
            apply_context_parallel(part, meshes.group("cp"))
        if sequence_split:
            for moe in (m for m in part.modules() if isinstance(m, MoE)):
                moe.seq_group = meshes.cp_tp.get_group()
        if compile or compile_blocks:
            compile_kernels()  # also what runs outside compiled blocks: expert dispatch, gradient accumulation
        if compile_blocks:  # before recomputation wraps them: checkpointing then re-runs the compiled forward
            compile_each_block(part)
        apply_activation_checkpointing(part, activation_checkpointing, ac_layers)
        if use_fsdp:
            n_blocks = len(part.model.layers)
            offload_blocks = round(offload_fraction * n_blocks) if meshes.device.type == "cuda" else 0
            if offload_fraction and not offload_blocks:
                logger.warning("optimizer_offload=%s has nothing to do here (parameters already live in host "
                               "memory or no whole block is selected)", offload_fraction)
            pm.fsdp_modules += apply_fsdp(part, meshes, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                          replicate=replicate, reshard_after_forward=reshard_after_forward,
                                          ignored_params=set(pm.expert_params), offload_blocks=offload_blocks)
    return pm


def materialize(pm: ParallelModel, device: torch.device, init_seed: int | None = None) -> None:
    """Allocate the parameters of a meta-device parallel model; random-initialise them if ``init_seed`` is set.

    Every tensor is drawn whole, as one process would draw it, and each rank keeps its own part: replicas agree
    and every layout starts from the same weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from moonforge.model import initial_tensor

    for part in pm.parts:
        part.to_empty(device=device)
        for block in getattr(part, "offloaded_blocks", []):  # FSDP keeps these parameters in host memory
            block.to_empty(device="cpu")
            for router in (m for m in block.modules() if isinstance(m, Router)):  # not FSDP's: on the device
                router.to_empty(device=device)
        part.reset_buffers()
        if init_seed is None:
            continue
        if not any(isinstance(p, DTensor) for p in part.parameters()):  # plain tensors: draw them in place
            part.init_weights(init_seed)
            continue
        options = StateDictOptions(full_state_dict=True, strict=False)
        for name, tensor in part.state_dict().items():
            home = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).device  # CPU when offloaded
            full = initial_tensor(part, name, tensor.shape, tensor.dtype, home, init_seed)
            # Loaded through the owning module: a part may hold some blocks in host memory (optimizer offload).
            owner_name, _, leaf = name.rpartition(".")
            set_model_state_dict(part.get_submodule(owner_name), {leaf: full}, options=options)
        part.reset_buffers()


def _is_shard(placement) -> bool:
    # FSDP2 on top of a tensor-parallel dim-0 shard uses _StridedShard, which is not a Shard subclass everywhere.
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, meshes: Meshes | None) -> torch.Tensor:
    """Global L2 norm of all gradients, however each is sharded or replicated, then clipped to ``max_norm``.

    Each rank weights its local squared norm by the number of distinct shards of that parameter and divides
    by the ranks per pipeline stage: summed over the world, every element then counts exactly once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[tuple, tuple[list[torch.Tensor], int]] = {}
    for g in grads:
        local, shards = g, 1
        if isinstance(g, DTensor):
            local = g.to_local()
            for size, placement in zip(g.device_mesh.shape, g.placements):
                if _is_shard(placement):
                    shards *= size
        key = (local.device, local.dtype, shards)
        groups.setdefault(key, ([], shards))[0].append(local)
    device = meshes.device if meshes is not None else (grads[0].device if grads else torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (dev, _, _), (tensors, shards) in groups.items():
        if dev.type == "cpu":  # small models on CPUs: exact enough to compare layouts to 1e-7
            squares = torch.stack([t.double().pow(2).sum() for t in tensors])
        else:  # one fused pass per group on GPUs
            squares = torch.stack(torch._foreach_norm(tensors, 2.0)).double().pow(2)
        total += squares.sum().to(device) * shards
    if meshes is not None and dist.is_initialized() and dist.get_world_size() > 1:
        total /= meshes.dims.stage_size
        dist.all_reduce(total)
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for (dev, dtype, _), (tensors, _) in groups.items():
            torch._foreach_mul_(tensors, coef.to(dev, dtype))  # no host sync: a factor of 1 when finite
    return norm

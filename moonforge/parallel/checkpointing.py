"""Activation memory: recomputation (full or selective) and CPU offload of activations, per decoder block.

Modes (the seed's AC): ``none``; ``full`` recomputes whole blocks; ``sel`` keeps the outputs of matrix products,
attention and communication and recomputes the cheap element-wise work (norms, RoPE, SwiGLU, routing math);
``offload`` keeps activations in host memory. ``layers`` limits it to the first N blocks of each stage (the
seed's MP_AC_LAYERS); None means all. The block's forward is wrapped in place, so parameter names do not change.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from moonforge.model import Transformer, routing_counts_paused

AC_MODES = ("none", "sel", "full", "offload")

# Outputs worth keeping under selective recomputation: expensive to recompute or they involve communication.
_SAVE_OP_NAMES = [
    ("aten", "mm", "default"), ("aten", "addmm", "default"), ("aten", "bmm", "default"),
    ("aten", "_grouped_mm", "default"), ("aten", "_scaled_dot_product_flash_attention", "default"),
    ("aten", "_scaled_dot_product_efficient_attention", "default"),
    ("aten", "_scaled_dot_product_cudnn_attention", "default"),
    ("aten", "_scaled_dot_product_flash_attention_for_cpu", "default"),
    ("_c10d_functional", "all_to_all_single", "default"), ("_c10d_functional", "all_gather_into_tensor", "default"),
    ("_c10d_functional", "reduce_scatter_tensor", "default"), ("aten", "topk", "default"), ("aten", "sort", "stable"),
]


@functools.cache
def _save_ops() -> frozenset:
    ops = set()
    for namespace, name, overload in _SAVE_OP_NAMES:
        try:
            ops.add(getattr(getattr(getattr(torch.ops, namespace), name), overload))
        except (AttributeError, RuntimeError):
            continue  # not in this build of torch
    return frozenset(ops)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _save_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(part: Transformer, mode: str, layers: int | None = None) -> None:
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    blocks = list(part.model.layers.values())
    for block in blocks[: layers if layers is not None else len(blocks)]:
        block.forward = _wrap(block.forward, mode)


def _wrap(forward, mode: str):
    if mode == "offload":
        @functools.wraps(forward)
        def offloaded(*args, **kwargs):
            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                return forward(*args, **kwargs)
        return offloaded

    context_fn = (functools.partial(create_selective_checkpoint_contexts, _selective_policy) if mode == "sel"
                  else None)

    def run(*args, **kwargs):
        if torch._C._current_graph_task_id() != -1:  # the re-run inside the backward: routing was counted already
            with routing_counts_paused():
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)
    return recomputed

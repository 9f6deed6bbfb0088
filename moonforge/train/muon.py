"""Muon with Moonlight's recipe, plus the AdamW it uses for everything that is not a matrix.

Muon (Moonlight paper, eq. 1-4) for each weight matrix W of shape [A, B]:

    M_t = mu M_{t-1} + G_t                        momentum, mu = 0.95
    U_t = G_t + mu M_t                            Nesterov
    O_t = NewtonSchulz5(U_t / (||U_t||_F + 1e-7))  5 steps, (a, b, c) = (3.4445, -4.7750, 2.0315), bf16
    W_t = W_{t-1} (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O_t

The factor 0.2 sqrt(max(A, B)) gives the update the RMS of a typical AdamW update, so AdamW's learning rate and
weight decay carry over unchanged. Embeddings, lm_head, norm weights and biases use AdamW (betas 0.9/0.95, eps
1e-8) at the same learning rate and weight decay. Stacked routed experts ([E, 2, I, H] gate/up, [E, H, I] down)
are batches of matrices: the last two dimensions are the matrix, so each expert's gate, up and down are
orthogonalised on their own, in one batched matmul per bucket.

Distributed parameters are DTensors. Newton-Schulz needs whole matrices, so the momentum-updated matrix is
redistributed over the mesh dimensions that split its rows or columns (FSDP's Shard(0), TP's Shard(0)/Shard(1),
ETP), never over those that split the batch of experts (EP). Parameters of the same shape and layout are
stacked into buckets; in ``spread`` mode each bucket is re-sharded along the stack so that every rank
orthogonalises whole matrices of its own share, then the results go back (two all-to-alls); in ``replicated``
mode every rank gathers and orthogonalises every matrix it holds a piece of (the simple reference).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Partial, _StridedShard
from torch.optim.adam import adam as adam_update

from moonforge.config import ConfigError

logger = logging.getLogger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
ADAMW_RMS = 0.2  # the RMS of an AdamW update that Muon's scale matches (paper §2.2)
DISTRIBUTED_MODES = ("spread", "replicated")
ROUTER_OPTIMIZERS = ("muon", "adamw")
# Largest stack (elements of the whole, unsharded stack) orthogonalised in one go; bounds the extra memory.
BUCKET_ELEMENTS = 1 << 28


def update_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Muon's update factor 0.2 * sqrt(max(A, B)) for matrices [..., A, B] (the global, unsharded shape)."""
    return ADAMW_RMS * math.sqrt(max(shape[-2], shape[-1]))


def newton_schulz(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The orthogonal factor of each matrix in ``update`` [..., A, B], by Muon's quintic Newton-Schulz iteration.

    Every matrix is normalised by its own Frobenius norm, then iterated ``steps`` times in ``dtype``; leading
    dimensions are a batch. Wide form is used internally (transpose when A > B), as in the paper's code.
    """
    a, b, c = NS_COEFFICIENTS
    shape = update.shape
    x = update.to(dtype).reshape(-1, shape[-2], shape[-1])
    if x.shape[0] == 0:
        return x.reshape(shape)
    tall = shape[-2] > shape[-1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A A
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + B X
    if tall:
        x = x.mT
    return x.reshape(shape)


# ---------------------------------------------------------------------------------------------------- groups
def muon_param_groups(model: nn.Module, *, lr: float, weight_decay: float, norm_weight_decay: bool = True,
                      router_optimizer: str = "muon", adamw_betas: tuple[float, float] = (0.9, 0.95),
                      adamw_eps: float = 1e-8) -> list[dict]:
    """Split ``model``'s trainable parameters into Muon and AdamW groups by name.

    Muon: every weight matrix (attention, dense and shared MLPs, stacked routed experts) and, when
    ``router_optimizer`` is "muon" (Moonlight's choice), the router weight ``mlp.gate.weight``. AdamW:
    ``embed_tokens.weight``, ``lm_head.weight``, the router when "adamw", and the 1-D parameters (RMSNorm
    weights, biases), which get ``weight_decay`` only when ``norm_weight_decay`` (the paper decays them and calls
    it crucial for stability). Only ``model.named_parameters()`` is used, so any module that yields moonforge
    names works (wrapper prefixes such as activation checkpointing's are fine). Each group carries
    ``param_names`` and ``use_muon``; groups with no parameters are left out.
    """
    if router_optimizer not in ROUTER_OPTIMIZERS:
        raise ConfigError(f"optimizer: router_optimizer is {router_optimizer!r}; use one of {ROUTER_OPTIMIZERS}")
    if lr < 0 or weight_decay < 0:
        raise ConfigError(f"optimizer: lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
    muon, decayed, one_dim = _NamedGroup(), _NamedGroup(), _NamedGroup()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_name(name, "embed_tokens.weight") or _is_name(name, "lm_head.weight"):
            decayed.add(name, p)
        elif p.ndim < 2:
            one_dim.add(name, p)
        elif _is_name(name, "mlp.gate.weight"):
            (muon if router_optimizer == "muon" else decayed).add(name, p)
        else:
            muon.add(name, p)
    adamw = {"use_muon": False, "lr": lr, "betas": tuple(adamw_betas), "eps": adamw_eps}
    groups = [
        {**muon.group(), "use_muon": True, "lr": lr, "weight_decay": weight_decay},
        {**decayed.group(), **adamw, "weight_decay": weight_decay},
        {**one_dim.group(), **adamw, "weight_decay": weight_decay if norm_weight_decay else 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        logger.info("optimizer group %s: %d tensors, %.2fM parameters, weight decay %g",
                    "muon" if g["use_muon"] else "adamw", len(g["params"]),
                    sum(p.numel() for p in g["params"]) / 1e6, g["weight_decay"])
    return groups


def _is_name(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


class _NamedGroup:
    def __init__(self):
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []

    def add(self, name: str, p: torch.Tensor) -> None:
        self.names.append(name)
        self.params.append(p)

    def group(self) -> dict:
        return {"params": self.params, "param_names": self.names}


# ---------------------------------------------------------------------------------------------------- layouts
def _is_shard(placement) -> bool:
    return isinstance(placement, (Shard, _StridedShard))


def _shifted(placement):
    """The same placement on a tensor with one more leading dimension."""
    if isinstance(placement, _StridedShard):
        return _StridedShard(placement.dim + 1, split_factor=placement.split_factor)
    if isinstance(placement, Shard):
        return Shard(placement.dim + 1)
    return placement


@dataclass(frozen=True)
class _Layout:
    """Where the pieces of a (stack of) parameter(s) live, and where Newton-Schulz wants them."""

    mesh: object | None  # DeviceMesh, or None for a plain tensor
    placements: tuple  # the parameter's own placements
    shape: tuple[int, ...]  # the global shape
    device: torch.device  # where the parameter's local data lives

    @classmethod
    def of(cls, p: torch.Tensor) -> "_Layout":
        if isinstance(p, DTensor):
            return cls(p.device_mesh, tuple(p.placements), tuple(p.shape), p.to_local().device)
        return cls(None, (), tuple(p.shape), p.device)

    @property
    def matrix_mesh_dims(self) -> list[int]:
        """Mesh dimensions that cut a matrix (its last two dims); those that cut the expert batch do not count,
        nor do dimensions of size 1 (one rank holds the whole matrix: no redistribution)."""
        first_matrix_dim = len(self.shape) - 2
        return [i for i, pl in enumerate(self.placements)
                if _is_shard(pl) and pl.dim % len(self.shape) >= first_matrix_dim and self.mesh.size(i) > 1]

    def stacked(self) -> tuple:
        return tuple(_shifted(pl) for pl in self.placements)

    def compute_placements(self, mode: str) -> tuple:
        """Placements of the stack while orthogonalising: whole matrices on every rank that computes them.

        ``replicated``: the matrix-cutting dims become Replicate (every rank computes what it holds a piece
        of). ``spread``: they become Shard(0) of the stack, so each rank gets whole matrices of its own.
        """
        cut = set(self.matrix_mesh_dims)
        whole = Shard(0) if mode == "spread" else Replicate()
        return tuple(whole if i in cut else pl for i, pl in enumerate(self.stacked()))


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------------- optimizer
class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others (see :func:`muon_param_groups`).

    Per-parameter state is ``momentum_buffer`` (Muon) or ``step`` / ``exp_avg`` / ``exp_avg_sq`` (AdamW),
    shaped and placed like the parameter, so ``torch.distributed.checkpoint`` saves and reshards it.
    ``ns_dtype`` is the Newton-Schulz precision (bf16 as in the paper; fp32 for exact comparisons).
    ``distributed_mode`` chooses how DTensor matrices are orthogonalised (see the module docstring).
    Newton-Schulz and its collectives run on a DTensor's mesh device (so CPU-offloaded FSDP2 parameters are
    orthogonalised on the accelerator); for plain tensors on ``compute_device``, by default the parameter's
    device. Optimizer state always stays on the parameter's device.
    """

    def __init__(self, param_groups, *, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16, weight_decay: float = 0.1,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 distributed_mode: str = "spread", compute_device: torch.device | str | None = None):
        if distributed_mode not in DISTRIBUTED_MODES:
            raise ConfigError(f"Muon: distributed_mode is {distributed_mode!r}; use one of {DISTRIBUTED_MODES}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"Muon: momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ConfigError(f"Muon: ns_steps must be >= 1, got {ns_steps}")
        param_groups = list(param_groups)
        for i, group in enumerate(param_groups):
            if not isinstance(group, dict) or "use_muon" not in group:
                raise ConfigError(
                    f"Muon: parameter group {i} has no 'use_muon' key; build the groups with "
                    f"moonforge.train.muon.muon_param_groups(model, ...) or set use_muon per group")
            if group["use_muon"]:
                names = group.get("param_names") or [f"#{j}" for j in range(len(group["params"]))]
                for name, p in zip(names, group["params"]):
                    if p.ndim < 2:
                        raise ConfigError(
                            f"Muon: parameter {name} of shape {tuple(p.shape)} is in a Muon group but is not a "
                            f"matrix; put 1-D parameters (norms, biases) in an AdamW group (use_muon=False)")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=tuple(adamw_betas), eps=adamw_eps)
        super().__init__(param_groups, defaults)
        self.ns_dtype = ns_dtype
        self.distributed_mode = distributed_mode
        self.compute_device = torch.device(compute_device) if compute_device is not None else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in self._muon_buckets():
            self._muon_step(*bucket)
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        return loss

    # --------------------------------------------------------------------------------------- Muon
    def _muon_buckets(self) -> list[tuple[dict, _Layout, list[torch.Tensor]]]:
        """Muon parameters with gradients, grouped by (group, layout) in a fixed order (the same on every rank,
        which the collectives rely on) and cut at BUCKET_ELEMENTS."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = _Layout.of(p)
                chunks = buckets.setdefault((gi, layout), [[]])
                if chunks[-1] and (len(chunks[-1]) + 1) * p.numel() > BUCKET_ELEMENTS:
                    chunks.append([])
                chunks[-1].append(p)
        return [(self.param_groups[gi], layout, params)
                for (gi, layout), chunks in buckets.items() for params in chunks]

    def _muon_step(self, group: dict, layout: _Layout, params: list[torch.Tensor]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        device = self._compute_device(layout)
        # The Newton-Schulz input of every parameter of the bucket, written straight into one stack in ns_dtype.
        stack = torch.empty((len(params), *_local(params[0]).shape), dtype=self.ns_dtype, device=device)
        for row, p in zip(stack, params):
            g = p.grad
            if isinstance(g, DTensor) and g.placements != p.placements:
                g = g.redistribute(p.device_mesh, p.placements)  # e.g. Partial gradients of a TP layer
            g = _local(g)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = _local(state["momentum_buffer"])
            torch.add(g, buf, alpha=mu, out=buf)  # M = mu M + G
            if not group["nesterov"]:
                row.copy_(buf)
            elif row.device == g.device:
                torch.add(g, buf, alpha=mu, out=row)  # G + mu M, rounded once to ns_dtype
            else:
                row.copy_(torch.add(g, buf, alpha=mu))
        ortho = self._orthogonalize(layout, stack, group["ns_steps"])
        locals_ = [_local(p) for p in params]
        if wd:
            torch._foreach_mul_(locals_, 1.0 - lr * wd)
        scale = lr * update_scale(layout.shape)
        for p_local, o in zip(locals_, ortho.unbind(0)):
            p_local.add_(o.to(p_local.device), alpha=-scale)

    def _orthogonalize(self, layout: _Layout, stack: torch.Tensor, steps: int) -> torch.Tensor:
        """Newton-Schulz of a bucket: ``stack`` holds the local shards of its k updates along dim 0; returns the
        local shards of the results, stacked the same way.

        Communication for a bucket of k matrices of N elements cut over W ranks (one mesh dim), per rank:
        ``replicated`` all-gathers (W-1)/W k N elements and orthogonalises all k matrices; ``spread`` sends and
        receives about (W-1)/W^2 k N elements in each of its two all-to-alls, i.e. 2/W of the all-gather, and
        orthogonalises ceil(k/W) matrices. Both travel in ``ns_dtype``: bf16 halves the bytes of the fp32 state.
        """
        if not layout.matrix_mesh_dims:
            return newton_schulz(stack, steps, self.ns_dtype)
        if any(isinstance(pl, Partial) for pl in layout.placements):
            raise RuntimeError("Muon: a parameter has a Partial placement; parameters must be sharded or replicated")
        shape = (stack.shape[0], *layout.shape)
        stride = _contiguous_stride(shape)
        stacked, compute = layout.stacked(), layout.compute_placements(self.distributed_mode)
        work = DTensor.from_local(stack, layout.mesh, stacked, shape=shape, stride=stride)
        work = work.redistribute(layout.mesh, compute).to_local()
        out = newton_schulz(work, steps, self.ns_dtype)
        out = DTensor.from_local(out, layout.mesh, compute, shape=shape, stride=stride)
        return out.redistribute(layout.mesh, stacked).to_local()

    def _compute_device(self, layout: _Layout) -> torch.device:
        if layout.mesh is not None:  # collectives run on the mesh's device
            return torch.device(layout.mesh.device_type)
        return self.compute_device or layout.device

    # --------------------------------------------------------------------------------------- AdamW
    def _adamw_step(self, group: dict) -> None:
        """torch's AdamW update (decoupled decay, bias correction) on the local shards, fused on CUDA."""
        by_device: dict[tuple, list] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if isinstance(g, DTensor) and g.placements != p.placements:
                g = g.redistribute(p.device_mesh, p.placements)
            p_local = _local(p)
            fused = p_local.device.type == "cuda"
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p_local.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif fused and state["step"].device != p_local.device:  # e.g. state loaded from a CPU run
                state["step"] = state["step"].to(p_local.device)
            lists = by_device.setdefault((p_local.device, p_local.dtype, fused), ([], [], [], [], []))
            for bucket, t in zip(lists, (p_local, _local(g), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                                         state["step"])):
                bucket.append(t)
        beta1, beta2 = group["betas"]
        for (_, _, fused), (params, grads, exp_avgs, exp_avg_sqs, steps) in by_device.items():
            adam_update(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=fused or None, amsgrad=False,
                        beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                        eps=group["eps"], maximize=False, decoupled_weight_decay=True)

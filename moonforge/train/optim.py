"""Optimizers: AdamW (the seed's Adam with betas 0.9/0.95, decoupled weight decay 0.1) or Muon, with the
parameter groups Megatron uses (no weight decay on biases and norm weights unless asked)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moonforge.train.config import TrainConfig


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and 1-D norm weights (Megatron's default exemption)."""
    return name.endswith(".bias") or param.ndim == 1


def build_optimizer(cfg: TrainConfig, named_params: list[tuple[str, nn.Parameter]], device: torch.device):
    norm_decay = cfg.norm_weight_decay if cfg.norm_weight_decay is not None else cfg.optimizer == "muon"
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if cfg.optimizer == "muon":
        from moonforge.train.muon import Muon, muon_param_groups

        model = _NamedParams(params)
        groups = muon_param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay, norm_weight_decay=norm_decay,
                                   router_optimizer=cfg.muon.router_optimizer,
                                   adamw_betas=(cfg.adam_beta1, cfg.adam_beta2), adamw_eps=cfg.adam_eps)
        return Muon(groups, lr=cfg.lr, momentum=cfg.muon.momentum, nesterov=cfg.muon.nesterov,
                    ns_steps=cfg.muon.ns_steps, weight_decay=cfg.weight_decay,
                    ns_dtype=torch.bfloat16 if cfg.muon.ns_dtype == "bf16" else torch.float32,
                    adamw_betas=(cfg.adam_beta1, cfg.adam_beta2), adamw_eps=cfg.adam_eps,
                    distributed_mode=cfg.muon.distributed_mode)
    groups: dict[tuple, dict] = {}
    for name, p in params:
        decay = cfg.weight_decay if (norm_decay or not is_no_decay(name, p)) else 0.0
        # One group per mesh and device: foreach/fused kernels cannot mix DTensor meshes or devices.
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        key = (decay, id(mesh), str(p.device), p.dtype)
        groups.setdefault(key, {"params": [], "names": [], "weight_decay": decay})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    from moonforge.train.adamw import AdamW

    return AdamW(list(groups.values()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                 weight_decay=cfg.weight_decay,
                 state_dtype=torch.bfloat16 if cfg.optimizer_state_dtype == "bf16" else torch.float32)


class _NamedParams(nn.Module):
    """Minimal module view over (name, parameter) pairs, for grouping functions that walk named_parameters."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        super().__init__()
        self._named = named

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self._named


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)

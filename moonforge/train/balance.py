"""Expert load balancing: Moonlight's aux-loss-free bias update, applied once per optimizer step."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moonforge.model import Router


@torch.no_grad()
def update_expert_bias(routers: dict[int, Router], rate: float, group: dist.ProcessGroup | None = None
                       ) -> torch.Tensor | None:
    """Apply ``b_i += u * (sign(e_i) - mean_j sign(e_j))`` with ``e_i = mean load - load_i`` to every router.

    Loads are the routed-slot counts accumulated since the last call, summed over ``group`` (all ranks that
    saw different tokens of this step). Returns the summed counts [layers, experts] and resets them. ``rate``
    0 leaves the bias frozen but still reports the loads.
    """
    if not routers:
        return None
    layers = sorted(routers)
    counts = torch.stack([routers[i].tokens_per_expert for i in layers])
    if group is not None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        dist.all_reduce(counts, group=group)
    if rate:
        violation = counts.mean(dim=-1, keepdim=True) - counts
        sign = violation.sign()
        delta = rate * (sign - sign.mean(dim=-1, keepdim=True))
        for row, i in enumerate(layers):
            bias = routers[i].e_score_correction_bias
            if bias is not None:
                bias.add_(delta[row].to(bias.dtype))
    for i in layers:
        routers[i].tokens_per_expert.zero_()
    return counts

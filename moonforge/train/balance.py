"""Expert load balancing: Moonlight's aux-loss-free bias update, applied once per optimizer step.

Two halves, so a training step can read the loads in the same host synchronisation as its loss:
``collect_expert_counts`` (after the last backward) and ``apply_expert_bias`` (once the step is known to be
finite).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moonforge.model import Router


@torch.no_grad()
def collect_expert_counts(routers: dict[int, Router], group: dist.ProcessGroup | None = None
                          ) -> torch.Tensor | None:
    """The routed-slot counts accumulated since the last call, [layers, experts] in layer order, summed over
    ``group`` (all ranks that saw different tokens of this step); resets the routers' counters."""
    if not routers:
        return None
    layers = sorted(routers)
    counts = torch.stack([routers[i].tokens_per_expert for i in layers])
    if group is not None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        dist.all_reduce(counts, group=group)
    for i in layers:
        routers[i].tokens_per_expert.zero_()
    return counts


@torch.no_grad()
def apply_expert_bias(routers: dict[int, Router], counts: torch.Tensor | None, rate: float) -> None:
    """``b_i += u * (sign(e_i) - mean_j sign(e_j))`` with ``e_i = mean load - load_i``, per router, from the
    counts of ``collect_expert_counts``. ``rate`` 0 leaves the biases as they are."""
    if not rate or counts is None:
        return
    violation = counts.mean(dim=-1, keepdim=True) - counts
    sign = violation.sign()
    delta = rate * (sign - sign.mean(dim=-1, keepdim=True))
    for row, i in enumerate(sorted(routers)):
        bias = routers[i].e_score_correction_bias
        if bias is not None:
            bias.add_(delta[row].to(bias.dtype))


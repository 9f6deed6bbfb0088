"""Pipeline parallelism through ``torch.distributed.pipelining``: the model is cut into stages by layer lists
(an uneven first stage and virtual stages included, see ParallelDims.stage_layers), each a Transformer holding
its own subset of ``model.layers`` under the original names.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from moonforge.model import Transformer, routing_counts_paused
from moonforge.parallel.mesh import Meshes


def split_stages(model: Transformer, meshes: Meshes) -> tuple[list[Transformer], list[int]]:
    """The model parts this pipeline rank runs (one, or several virtual stages) and their global stage ids."""
    dims = meshes.dims
    stages = dims.stage_layers(model.config.num_hidden_layers)
    pp_rank = meshes.coordinate("pp")
    stage_ids = [s for s in range(len(stages)) if s % dims.pp == pp_rank]
    parts = []
    for s in stage_ids:
        keep = {str(i) for i in stages[s]}
        part = copy.deepcopy(model) if len(stage_ids) > 1 else model
        for name in list(part.model.layers.keys()):
            if name not in keep:
                del part.model.layers[name]
        if s != 0:
            part.model.embed_tokens = None
        if s != len(stages) - 1:
            part.model.norm = None
            part.lm_head = None
        parts.append(part)
    return parts, stage_ids


def build_schedule(parts: list[nn.Module], stage_ids: list[int], meshes: Meshes, n_microbatches: int, loss_fn):
    num_stages = len(meshes.dims.stage_layers(parts[0].config.num_hidden_layers))
    group = meshes.group("pp")
    stages = [_Stage(_LossAsVector(part) if s == num_stages - 1 else part, stage_index=s, num_stages=num_stages,
                     device=meshes.device, group=group)
              for part, s in zip(parts, stage_ids)]
    if len(stages) > 1:
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                       scale_grads=False)
    return Schedule1F1B(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


class _LossAsVector(nn.Module):
    """The last stage returns the summed loss of its micro-batch; the schedule concatenates stage outputs,
    which needs at least one dimension."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, *args, **kwargs):
        return self.part(*args, **kwargs).reshape(1)


class _Stage(PipelineStage):
    """A PipelineStage whose metadata-inference forward (run once on placeholder tensors) leaves no routing
    counts behind, so expert balancing sees only real tokens."""


def _without_routing_counts(method):
    def wrapped(self, *args, **kwargs):
        with routing_counts_paused():
            return method(self, *args, **kwargs)
    return wrapped


for _name in ("_forward_metadata_inference", "_shape_inference"):
    if hasattr(PipelineStage, _name):
        setattr(_Stage, _name, _without_routing_counts(getattr(PipelineStage, _name)))

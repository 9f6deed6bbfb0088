"""Layer-wise placement of one model over several devices, for inference of a model too big for one GPU.

Embedding and the first layers go on the first device, the last layers with the final norm and ``lm_head`` on
the last; the contiguous split minimises the largest share of parameter bytes. Forward pre-hooks move
activations (and the rotary tables) to each module's device, so the model's own ``forward`` runs unchanged.
Devices are handled generically, so the code path runs on ``["cpu", "cpu"]`` in tests.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from moonforge.model import Transformer

logger = logging.getLogger(__name__)


def visible_devices() -> list[torch.device]:
    if not torch.cuda.is_available():
        raise RuntimeError("--device-map auto spreads the model over GPUs, and none is visible")
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def split_layers(sizes: list[int], n_devices: int) -> list[int]:
    """Device index of each item of a sequence (embedding, layers..., norm + lm_head), in contiguous runs whose
    largest total is as small as possible. Fewer devices are used when that does not raise the largest."""
    def runs(capacity: int) -> list[int] | None:
        devices, device, used = [], 0, 0
        for size in sizes:
            if size > capacity:
                return None
            if used + size > capacity:
                device, used = device + 1, 0
            devices.append(device)
            used += size
        return devices if device < n_devices else None

    low, high = max(sizes), sum(sizes)
    while low < high:  # smallest capacity that fits: runs() succeeds for every capacity above it
        mid = (low + high) // 2
        if runs(mid) is None:
            low = mid + 1
        else:
            high = mid
    return runs(low)


def place_layers(model: Transformer, devices: list[str | torch.device]) -> list[torch.device]:
    """Spread ``model`` over ``devices`` layer by layer; returns each layer's device."""
    devices = [torch.device(d) for d in devices]
    m = model.model
    nbytes = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    layer_names = list(m.layers.keys())
    tied = model.config.tie_word_embeddings
    if tied and len(set(devices)) > 1:
        raise ValueError("a model with tied embeddings shares one weight between embed_tokens and lm_head, so it "
                         "cannot be spread over several devices by layer; load it on one device")
    sizes = ([nbytes(m.embed_tokens)] + [nbytes(m.layers[name]) for name in layer_names]
             + [nbytes(m.norm) + (0 if tied else nbytes(model.lm_head))])
    assignment = [devices[i] for i in split_layers(sizes, len(devices))]
    first, layer_devices, last = assignment[0], assignment[1:-1], assignment[-1]

    _place(m.embed_tokens, first)
    _place(m.rotary_emb, first)
    for name, device in zip(layer_names, layer_devices):
        _place(m.layers[name], device)
    _place(m.norm, last)
    _place(model.lm_head, last)
    summary = {}
    for name, device in zip(layer_names, layer_devices):
        summary.setdefault(str(device), []).append(int(name))
    logger.info("layer placement: embedding on %s; %s; norm and lm_head on %s", first,
                ", ".join(f"layers {v[0]}-{v[-1]} on {d}" for d, v in summary.items()), last)
    return layer_devices


def _place(module: nn.Module, device: torch.device) -> None:
    module.to(device)
    module.register_forward_pre_hook(_move_inputs_hook(device), with_kwargs=True)


def _move_inputs_hook(device: torch.device):
    def hook(module, args, kwargs):
        return to_device(args, device), to_device(kwargs, device)

    return hook


def to_device(obj, device: torch.device):
    """Tensors inside tuples, lists, dicts and dataclasses (the attention mask), moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj

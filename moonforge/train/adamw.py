"""AdamW for sharded parameters (FSDP2/TP/EP DTensors or plain tensors), with moments in fp32 or bf16.

The update of each parameter is one fused element-wise kernel on GPUs (gradient clipping folded in), so a step
reads and writes each byte once, and each compiled call updates a chunk of a parameter group, so the host
launches the kernels back to back instead of paying Python and guard overhead per parameter. bf16 moments cut
the optimizer state from 8 to 4 bytes per parameter, which is what lets full Moonlight pretraining fit on two
H200s. The formula is torch.optim.AdamW's.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 state_dtype: torch.dtype = torch.float32, compile: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.compile = compile  # None: compiled on GPUs, eager elsewhere
        device = next(p.device for g in self.param_groups for p in g["params"])
        # Gradient clipping coefficient, applied inside the update (set by the trainer before step()).
        self.clip_coef = torch.ones((), dtype=torch.float32, device=device)
        self._prepared: list[tuple] | None = None

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to the parameter's dtype; bf16 moments must stay bf16 (memory, and the same
        # rounding as a run that was never interrupted).
        super().load_state_dict(state_dict)
        self._prepared = None  # refers to the replaced state
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != self.state_dtype:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def prepare(self) -> None:
        """Assemble this step's arguments now, host work alone. The trainer calls it before the step's host
        synchronisation, so the host does this while the device still runs the backward instead of after the
        device has drained (on one H100, 20 layers: a 5.5 ms gap before the first update kernel). ``step``
        uses them; ``zero_grad`` drops them."""
        self._prepared = self._arguments()

    def _arguments(self) -> list[tuple]:
        work = []
        for group in self.param_groups:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(_local(p).device, []).append(p)
            for device, params in by_device.items():
                states = [self._init_state(p) for p in params]
                tensors = (_flat(params), _flat([s["exp_avg"] for s in states]),
                           _flat([s["exp_avg_sq"] for s in states]), _flat([p.grad for p in params]))
                work.append((group, device, [s["step"] for s in states], tensors))
        return work

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._prepared = None  # holds views of the gradients
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        work = self._prepared or self._arguments()
        self._prepared = None
        for group, device, steps, tensors in work:
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            # Filled on the device once per group, not copied from the host for every parameter.
            lr = torch.full((), group["lr"], dtype=torch.float32, device=device)
            args = (*tensors, steps, self.clip_coef.to(device), lr, beta1, beta2, group["eps"],
                    group["weight_decay"])
            compiled = self.compile or (self.compile is None and device.type == "cuda")
            for start in range(0, len(steps), CHUNK):
                chunk = [a[start:start + CHUNK] if isinstance(a, list) else a for a in args]
                if compiled:
                    # Without duck shaping, equal sizes in different parameters do not become one symbol, so
                    # chunks whose parameters happen to coincide in size differently share the graph too.
                    with torch.fx.experimental._config.patch(use_duck_shape=False):
                        _compiled_update_many()(*chunk)
                else:
                    _update_many(*chunk)
        return None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _update(param, exp_avg, exp_avg_sq, grad, clip_coef, step, lr, beta1: float, beta2: float, eps: float,
            weight_decay: float) -> None:
    g = grad.float() * clip_coef
    m = exp_avg.float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
    param.copy_(param.float() * (1 - lr * weight_decay) - lr * update)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _flat(tensors) -> list[torch.Tensor]:
    """1-D aliases of the local shards that are not views, so the compiled call's guards do not depend on each
    base's rank."""
    return [_local(t).view(-1).detach() for t in tensors]


def _update_many(params, exp_avgs, exp_avg_sqs, grads, steps, clip_coef, lr, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    for p, m, v, g, step in zip(params, exp_avgs, exp_avg_sqs, grads, steps):
        _update(p, m, v, g, clip_coef, step, lr, beta1, beta2, eps, weight_decay)


# Parameters per compiled call. Sizes are symbolic, so every full chunk of a group reuses one graph (and one
# kernel, launched once per parameter from the compiled wrapper): a few compiled calls per step instead of one
# per parameter, and a graph small enough to compile in seconds.
CHUNK = 32


@functools.cache
def _compiled_update_many():
    return torch.compile(_update_many, dynamic=True, fullgraph=True)

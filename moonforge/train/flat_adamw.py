"""Single-device mixed precision with one contiguous buffer per parameter group.

On one GPU there is nothing to shard, so FSDP's casts and copies are pure overhead. Here the model keeps its
parameters in the compute dtype (bf16), viewed out of one flat buffer; the optimizer keeps fp32 master weights
and Adam moments in flat buffers of the same layout; gradients land in a flat buffer too (bf16 when each step is
one micro-batch, fp32 when micro-batches accumulate). The optimizer step (with gradient clipping folded in) is
then one fused elementwise kernel over all parameters, and the gradient norm one reduction.

The router weight stays fp32 (its own group), as the reference computes routing in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Group:
    names: list[str]
    params: list[nn.Parameter]
    weight_decay: float
    flat_param: torch.Tensor      # compute dtype; the model's parameters are views of it
    master: torch.Tensor          # fp32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    grad: torch.Tensor            # gradients (param dtype, or fp32 when accumulating)


class FlatAdamW(torch.optim.Optimizer):
    """AdamW over flat fp32 master weights; parameters, gradients and moments live in contiguous buffers.

    Its per-parameter ``state`` holds views (``master``, ``exp_avg``, ``exp_avg_sq``, ``step``) so that
    torch.distributed.checkpoint saves and restores it like any optimizer.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, no_decay=lambda name, p: False,
                 compute_dtype: torch.dtype = torch.bfloat16, keep_fp32=lambda name: False,
                 accumulate_fp32: bool = False, moment_dtype: torch.dtype = torch.float32):
        buckets: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        for name, p in named_params:
            dtype = torch.float32 if keep_fp32(name) else compute_dtype
            wd = 0.0 if no_decay(name, p) else weight_decay
            buckets.setdefault((dtype, wd), []).append((name, p))
        self.groups_flat: list[_Group] = []
        param_groups = []
        for (dtype, wd), items in buckets.items():
            group = _build_group(items, dtype, wd, accumulate_fp32, moment_dtype)
            self.groups_flat.append(group)
            param_groups.append({"params": group.params, "names": group.names, "weight_decay": wd})
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.groups_flat[0].master.device)
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.groups_flat:
            offset = 0
            for p in group.params:
                n = p.numel()
                self.state[p] = {"step": self.step_count, "master": group.master[offset:offset + n].view_as(p),
                                 "exp_avg": group.exp_avg[offset:offset + n].view_as(p),
                                 "exp_avg_sq": group.exp_avg_sq[offset:offset + n].view_as(p)}
                offset += n
        self.clip_coef = torch.ones((), dtype=torch.float32, device=self.step_count.device)

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Take the master weights from the parameters (after they were loaded from elsewhere)."""
        for g in self.groups_flat:
            if g.master.data_ptr() != g.flat_param.data_ptr():
                g.master.copy_(g.flat_param)

    # ------------------------------------------------------------------ gradients
    def grad_norm_squared(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.step_count.device)
        for g in self.groups_flat:
            # fp32 accumulation is accurate on GPUs (tree reduction) but not in the CPU kernel: use fp64 there.
            dtype = torch.float32 if g.grad.is_cuda else torch.float64
            total += torch.linalg.vector_norm(g.grad, dtype=dtype).double() ** 2
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.groups_flat:
            g.grad.zero_()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        hp = self.param_groups[0]
        lr = hp["lr"]
        beta1, beta2 = hp["betas"]
        self.step_count += 1
        step = self.step_count
        kernel = _compiled_update() if self.step_count.is_cuda else _update
        for g in self.groups_flat:
            kernel(g.master, g.exp_avg, g.exp_avg_sq, g.grad, g.flat_param, self.clip_coef, step,
                   torch.tensor(lr, device=step.device), beta1, beta2, hp["eps"], g.weight_decay)
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy loaded values into the flat buffers (the state tensors are views that must stay views)."""
        saved = state_dict["state"]
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if index in saved:
                    for key in ("master", "exp_avg", "exp_avg_sq"):
                        self.state[p][key].copy_(saved[index][key])
                    self.step_count.copy_(torch.as_tensor(saved[index]["step"], dtype=torch.float32))
                index += 1
        for mine, theirs in zip(self.param_groups, state_dict["param_groups"]):
            mine["lr"] = theirs.get("lr", mine["lr"])
        for g in self.groups_flat:  # parameters follow the restored master weights
            g.flat_param.copy_(g.master)


def _build_group(items, dtype, wd, accumulate_fp32: bool, moment_dtype) -> _Group:
    device = items[0][1].device
    total = sum(p.numel() for _, p in items)
    flat_param = torch.empty(total, dtype=dtype, device=device)
    master = torch.empty(total, dtype=torch.float32, device=device)
    grad_dtype = torch.float32 if (accumulate_fp32 or dtype == torch.float32) else dtype
    grad = torch.zeros(total, dtype=grad_dtype, device=device)
    offset = 0
    params = []
    for _, p in items:
        n = p.numel()
        master[offset:offset + n].copy_(p.detach().reshape(-1))
        flat_param[offset:offset + n].copy_(p.detach().reshape(-1))
        p.data = flat_param[offset:offset + n].view_as(p)
        view = grad[offset:offset + n].view_as(p)
        if grad_dtype == dtype:
            p.grad = view  # autograd accumulates into it in place
        else:
            p.register_post_accumulate_grad_hook(functools.partial(_accumulate, view))
        params.append(p)
        offset += n
    if dtype == torch.float32:
        master = flat_param  # already full precision: update the parameters directly
    return _Group(names=[n for n, _ in items], params=params, weight_decay=wd, flat_param=flat_param, master=master,
                  exp_avg=torch.zeros(total, dtype=moment_dtype, device=device),
                  exp_avg_sq=torch.zeros(total, dtype=moment_dtype, device=device), grad=grad)


def _accumulate(view: torch.Tensor, p: nn.Parameter) -> None:
    view.add_(p.grad)
    p.grad = None


def _update(master, exp_avg, exp_avg_sq, grad, param, clip_coef, step, lr, beta1: float, beta2: float,
            eps: float, weight_decay: float) -> None:
    g = grad.float() * clip_coef
    m = exp_avg.float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    update = (m / bc1) / ((v / bc2).sqrt() + eps)
    new = master * (1 - lr * weight_decay) - lr * update
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(new)
    if param.data_ptr() != master.data_ptr():
        param.copy_(new)


@functools.cache
def _compiled_update():
    return torch.compile(_update, dynamic=False)

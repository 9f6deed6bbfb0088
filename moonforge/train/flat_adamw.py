"""Single-device mixed precision with one contiguous buffer per parameter group.

On one GPU there is nothing to shard, so FSDP's casts and copies are pure overhead. Here the model keeps its
parameters in the compute dtype (bf16), viewed out of one flat buffer; the optimizer keeps fp32 master weights
and Adam moments in flat buffers of the same layout; gradients land in a flat buffer too (bf16 when each step is
one micro-batch, fp32 when micro-batches accumulate). The first gradient of a step is written into the buffer and
later ones are added, so the buffer is never zeroed (only the views of parameters that got no gradient are). The
optimizer step (with gradient clipping folded in) is then one fused elementwise kernel over all parameters, and
the gradient norm one reduction.

The router weight stays fp32 (its own group), as the reference computes routing in fp32.

Host offload (``offload`` > 0, bf16 only) moves the optimizer state of that fraction of the parameters to pinned
host memory, which is what lets the whole of Moonlight-16B-A3B train on one GPU. The GPU then holds only the
bf16 parameters and the gradients. An fp32 master weight is stored as two 16-bit halves: its upper half *is*
the bf16 parameter (rounded to nearest), its lower half (int16) lives on the host, so the master weights are
exact fp32 at 2 bytes per parameter of extra storage. The step streams chunks of state to the GPU, updates them
there with the same fused kernel and streams them back, copies in both directions overlapping the compute.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from moonforge.model import KERNELS

logger = logging.getLogger(__name__)
CHUNK = 1 << 26  # elements per streamed piece of offloaded state


@dataclass
class _Group:
    names: list[str]
    params: list[nn.Parameter]
    weight_decay: float
    flat_param: torch.Tensor      # compute dtype; the model's parameters are views of it
    master: torch.Tensor | None   # fp32 (None when offloaded: then ``low`` holds the master's lower half)
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    grad: torch.Tensor            # gradients (param dtype, or fp32 when accumulating); see FlatAdamW.gradients
    low: torch.Tensor | None = None  # int16 lower halves of the fp32 master weights, in host memory

    @property
    def offloaded(self) -> bool:
        return self.low is not None


class FlatAdamW(torch.optim.Optimizer):
    """AdamW over flat fp32 master weights; parameters, gradients and moments live in contiguous buffers.

    Its per-parameter ``state`` holds views (``master`` or, offloaded, ``master_low``; ``exp_avg``,
    ``exp_avg_sq``, ``step``) so that torch.distributed.checkpoint saves and restores it like any optimizer.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, no_decay=lambda name, p: False,
                 compute_dtype: torch.dtype = torch.bfloat16, keep_fp32=lambda name: False,
                 accumulate_fp32: bool = False, moment_dtype: torch.dtype = torch.float32, offload: float = 0.0):
        if offload and compute_dtype != torch.bfloat16:
            raise ValueError(f"host offload of the flat optimizer needs bf16 parameters, got {compute_dtype}")
        offloaded = _offloaded_names(named_params, offload, keep_fp32)
        _check_host_memory(sum(p.numel() for name, p in named_params if name in offloaded),
                           2 + 2 * torch.empty((), dtype=moment_dtype).element_size())
        buckets: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        for name, p in named_params:
            dtype = torch.float32 if keep_fp32(name) else compute_dtype
            wd = 0.0 if no_decay(name, p) else weight_decay
            buckets.setdefault((dtype, wd, name in offloaded), []).append((name, p))
        self.groups_flat: list[_Group] = []
        param_groups = []
        for (dtype, wd, on_host), items in buckets.items():
            group = _build_group(items, dtype, wd, accumulate_fp32, moment_dtype, on_host)
            self.groups_flat.append(group)
            param_groups.append({"params": group.params, "names": group.names, "weight_decay": wd})
        self._landing = _Landing({id(p): view for g in self.groups_flat
                                  for p, view in zip(g.params, _views(g.grad, g.params))})
        for g in self.groups_flat:
            for p in g.params:
                p.register_post_accumulate_grad_hook(self._landing)
        device = self.groups_flat[0].flat_param.device
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.groups_flat:
            flats = {"master_low" if group.offloaded else "master": group.low if group.offloaded else group.master,
                     "exp_avg": group.exp_avg, "exp_avg_sq": group.exp_avg_sq}
            pieces = {key: _views(flat, group.params) for key, flat in flats.items()}
            for i, p in enumerate(group.params):
                self.state[p] = {"step": self.step_count, **{key: views[i] for key, views in pieces.items()}}
        self.clip_coef = torch.ones((), dtype=torch.float32, device=device)
        self._stream_state = None  # staging buffers and copy streams, made at the first offloaded step
        on_host = [g for g in self.groups_flat if g.offloaded]
        if on_host:
            host_bytes = sum(t.numel() * t.element_size() for g in on_host for t in (g.low, g.exp_avg, g.exp_avg_sq))
            logger.info("optimizer state of %.2fB parameters in host memory (%.1f GB: moments and master weights' "
                        "lower halves)", sum(g.flat_param.numel() for g in on_host) / 1e9, host_bytes / 1e9)

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Take the master weights from the parameters (after they were loaded from elsewhere)."""
        for g in self.groups_flat:
            if g.offloaded:
                g.low.zero_()  # the bf16 parameter is the whole master weight
            elif g.master.data_ptr() != g.flat_param.data_ptr():
                g.master.copy_(g.flat_param)

    # ------------------------------------------------------------------ gradients
    def gradients(self) -> list[torch.Tensor]:
        """The flat gradient buffers, one per group (parameters without a gradient this step read as zeros)."""
        self._landing.settle()
        return [g.grad for g in self.groups_flat]

    def gradient(self, p: nn.Parameter) -> torch.Tensor:
        """``p``'s gradient: a view of its group's flat buffer."""
        self._landing.settle()
        return self._landing.views[id(p)]

    def grad_norm_squared(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.step_count.device)
        for grad in self.gradients():
            # fp32 accumulation is accurate on GPUs (tree reduction) but not in the CPU kernel: use fp64 there.
            dtype = torch.float32 if grad.is_cuda else torch.float64
            total += torch.linalg.vector_norm(grad, dtype=dtype).double() ** 2
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._landing.restart()  # the next gradients overwrite: nothing to clear

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        hp = self.param_groups[0]
        beta1, beta2 = hp["betas"]
        self.step_count += 1
        step = self.step_count
        lr = torch.tensor(hp["lr"], device=step.device)
        cuda = step.is_cuda
        self.gradients()
        for g in self.groups_flat:
            if g.offloaded:
                self._streamed_step(g, step, lr, beta1, beta2, hp["eps"])
            else:
                # An fp32 group's parameters are its master weights: nothing to round into (None, decided here:
                # a pointer comparison inside the compiled update would split it in two).
                param = None if g.flat_param is g.master else g.flat_param
                (_compiled(_update) if cuda else _update)(
                    g.master, g.exp_avg, g.exp_avg_sq, g.grad, param, self.clip_coef, step, lr, beta1, beta2,
                    hp["eps"], g.weight_decay)
        return None

    def _streamed_step(self, g: _Group, step, lr, beta1: float, beta2: float, eps: float) -> None:
        """Chunk by chunk: host state to the GPU (copy stream), fused update, state back (second copy stream).

        Two staging slots alternate, so chunk i+1 arrives and chunk i-1 leaves while chunk i is updated.
        """
        device = g.flat_param.device
        kernel = _compiled(_update_split) if device.type == "cuda" else _update_split
        host = (g.low, g.exp_avg, g.exp_avg_sq)
        if device.type != "cuda":  # nothing to overlap; the same chunked arithmetic, in place
            for start in range(0, g.flat_param.numel(), CHUNK):
                end = min(start + CHUNK, g.flat_param.numel())
                kernel(g.flat_param[start:end], *(t[start:end] for t in host), g.grad[start:end], self.clip_coef,
                       step, lr, beta1, beta2, eps, g.weight_decay)
            return
        slots, upload, download = self._streams(host, device)
        compute = torch.cuda.current_stream(device)
        upload.wait_stream(download)  # the previous group's (or step's) state has fully landed on the host
        slot_free: list[torch.cuda.Event | None] = [None, None]
        n = g.flat_param.numel()
        for i, start in enumerate(range(0, n, CHUNK)):
            end = min(start + CHUNK, n)
            stage = [buf[:end - start] for buf in slots[i % 2]]
            with torch.cuda.stream(upload):
                if slot_free[i % 2] is not None:
                    upload.wait_event(slot_free[i % 2])
                for dst, src in zip(stage, host):
                    dst.copy_(src[start:end], non_blocking=True)
            compute.wait_stream(upload)
            kernel(g.flat_param[start:end], *stage, g.grad[start:end], self.clip_coef, step, lr, beta1, beta2, eps,
                   g.weight_decay)
            download.wait_stream(compute)
            with torch.cuda.stream(download):
                for dst, src in zip(host, stage):
                    dst[start:end].copy_(src, non_blocking=True)
                slot_free[i % 2] = download.record_event()
        compute.wait_stream(download)

    def _streams(self, host, device):
        if self._stream_state is None:
            longest = max(g.flat_param.numel() for g in self.groups_flat if g.offloaded)
            size = min(CHUNK, longest)
            slots = [[torch.empty(size, dtype=t.dtype, device=device) for t in host] for _ in range(2)]
            self._stream_state = (slots, torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._stream_state

    def state_dict(self):
        if self.step_count.is_cuda and any(g.offloaded for g in self.groups_flat):
            torch.cuda.synchronize(self.step_count.device)  # the host state is read directly, not through a copy
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy loaded values into the flat buffers (the state tensors are views that must stay views)."""
        saved = state_dict["state"]
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if index in saved:
                    mine = self.state[p]
                    missing = [k for k in mine if k != "step" and k not in saved[index]]
                    if missing:
                        raise ValueError(f"optimizer state of {group['names'][group['params'].index(p)]} lacks "
                                         f"{missing}: the checkpoint was written with a different optimizer_offload "
                                         "setting; resume with the one it was written with")
                    for key in mine:
                        if key != "step":
                            mine[key].copy_(saved[index][key])
                    self.step_count.copy_(torch.as_tensor(saved[index]["step"], dtype=torch.float32))
                index += 1
        for mine, theirs in zip(self.param_groups, state_dict["param_groups"]):
            mine["lr"] = theirs.get("lr", mine["lr"])
        for g in self.groups_flat:  # parameters follow the restored master weights
            if not g.offloaded:
                g.flat_param.copy_(g.master)


def _offloaded_names(named_params, fraction: float, keep_fp32) -> set[str]:
    """The first parameters (in model order) covering ``fraction`` of the compute-dtype elements."""
    if not fraction:
        return set()
    candidates = [(name, p.numel()) for name, p in named_params if not keep_fp32(name)]
    budget = fraction * sum(n for _, n in candidates)
    chosen, taken = set(), 0
    for name, n in candidates:
        if taken >= budget:
            break
        chosen.add(name)
        taken += n
    return chosen


def _build_group(items, dtype, wd, accumulate_fp32: bool, moment_dtype, on_host: bool = False) -> _Group:
    """Move ``items`` into one flat buffer (the parameters become views of it) with their optimizer state: an
    fp32 master copy on the device, or (``on_host``) the master's lower halves and the moments in host memory."""
    device = items[0][1].device
    total = sum(p.numel() for _, p in items)
    flat_param = torch.empty(total, dtype=dtype, device=device)
    state = _host_zeros if on_host else (lambda n, dt, dev: torch.zeros(n, dtype=dt, device=dev))
    master = low = None
    if on_host:
        low = _host_zeros(total, torch.int16, device)
    else:
        master = torch.empty(total, dtype=torch.float32, device=device) if dtype != torch.float32 else flat_param
    offset = 0
    for _, p in items:
        n = p.numel()
        if on_host:
            hi, lo = split_fp32(p.detach().reshape(-1).float())
            flat_param[offset:offset + n].copy_(hi)
            low[offset:offset + n].copy_(lo)
        else:
            master[offset:offset + n].copy_(p.detach().reshape(-1))
            if master is not flat_param:
                flat_param[offset:offset + n].copy_(master[offset:offset + n])
        p.data = flat_param[offset:offset + n].view_as(p)  # frees the parameter's own storage
        offset += n
    return _Group(names=[n for n, _ in items], params=[p for _, p in items], weight_decay=wd,
                  flat_param=flat_param, master=master,
                  # in the parameters' dtype, or fp32 when micro-batches accumulate
                  grad=torch.empty(total, dtype=torch.float32 if accumulate_fp32 else dtype, device=device),
                  exp_avg=state(total, moment_dtype, device), exp_avg_sq=state(total, moment_dtype, device), low=low)


class _Landing:
    """Each parameter's post-accumulate hook: moves the gradient autograd just produced into the parameter's view
    of the flat buffer, written if it is the step's first (no zeroed buffer to read), added (in fp32 when
    accumulating) otherwise. Keyed by ``id``: a hook that referenced its parameter or the optimizer would make a
    cycle through autograd's C++ side, which the garbage collector cannot see, and keep both alive for good."""

    def __init__(self, views: dict[int, torch.Tensor]):
        self.views = views
        self.unwritten = set(views)  # no gradient yet this step: their views hold the last step's values

    def __call__(self, p: nn.Parameter) -> None:
        key = id(p)
        if key in self.unwritten:
            self.unwritten.discard(key)
            KERNELS.assign(self.views[key], p.grad)
        else:
            KERNELS.accumulate(self.views[key], p.grad)
        p.grad = None

    def settle(self) -> None:
        """Zero the views of parameters that got no gradient this step."""
        for key in self.unwritten:
            self.views[key].zero_()
        self.unwritten.clear()

    def restart(self) -> None:
        self.unwritten = set(self.views)


def _views(flat: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Consecutive pieces of ``flat`` shaped like ``params``."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def _check_host_memory(elements: int, bytes_per_element: int) -> None:
    need = elements * bytes_per_element
    available = _available_host_memory()
    if need and available is not None and need > 0.95 * available:
        raise MemoryError(f"offloaded optimizer state needs {need / 1e9:.1f} GB of host memory but "
                          f"{available / 1e9:.1f} GB are available: set optimizer_state_dtype: bf16 (2 bytes per "
                          "moment instead of 4) or lower optimizer_offload")


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros in host memory, page-locked when they feed a GPU (registered in place: the pinned allocator would
    round a 32 GB buffer up to 64 GB)."""
    t = torch.zeros(n, dtype=dtype)
    if device.type == "cuda" and n:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(err) != 0:
            logger.warning("could not page-lock %.1f GB of optimizer state (CUDA error %s); copies to the GPU "
                           "will be slower", t.numel() * t.element_size() / 1e9, err)
    return t


# ---------------------------------------------------------------------- fp32 as two 16-bit halves
def split_fp32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (bf16 rounded to nearest, int16 remainder) with ``join_fp32(*split_fp32(x)) == x`` bit for bit.

    On the bit pattern b: hi = floor((b + 2^15) / 2^16) is b rounded to its upper 16 bits (carries into the
    exponent are correct float rounding; ties round away from zero), and lo = b - hi * 2^16 lies in
    [-2^15, 2^15).
    """
    bits = x.view(torch.int32)
    hi = torch.bitwise_right_shift(bits + 32768, 16)
    lo = bits - hi * 65536
    return hi.to(torch.int16).view(torch.bfloat16), lo.to(torch.int16)


def join_fp32(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return (hi.view(torch.int16).to(torch.int32) * 65536 + lo.to(torch.int32)).view(torch.float32)


# ---------------------------------------------------------------------- fused updates
def _adam(master, exp_avg, exp_avg_sq, grad, clip_coef, step, lr, beta1, beta2, eps, weight_decay):
    g = grad.float() * clip_coef
    m = exp_avg.float() * beta1 + g * (1 - beta1)
    v = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    update = (m / bc1) / ((v / bc2).sqrt() + eps)
    return master * (1 - lr * weight_decay) - lr * update, m, v


def _update(master, exp_avg, exp_avg_sq, grad, param, clip_coef, step, lr, beta1: float, beta2: float,
            eps: float, weight_decay: float) -> None:
    new, m, v = _adam(master, exp_avg, exp_avg_sq, grad, clip_coef, step, lr, beta1, beta2, eps, weight_decay)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(new)
    if param is not None:
        param.copy_(new)  # round to nearest even (the offloaded form rounds ties away from zero)


def _update_split(param, low, exp_avg, exp_avg_sq, grad, clip_coef, step, lr, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """``_update`` with the fp32 master held as (bf16 parameter, int16 lower half)."""
    new, m, v = _adam(join_fp32(param, low), exp_avg, exp_avg_sq, grad, clip_coef, step, lr, beta1, beta2, eps,
                      weight_decay)
    hi, lo = split_fp32(new)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(hi)
    low.copy_(lo)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)

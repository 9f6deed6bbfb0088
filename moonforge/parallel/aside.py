"""Gradient accumulation on a CUDA stream of its own.

Adding a micro-batch's low-precision gradients into their fp32 sums reads and writes 10 bytes per parameter.
On the stream that runs the backward, the next layers' matrix products wait behind that pass; on a second
stream it runs beside them (they are bound by arithmetic, it by memory).

- ``aside(device)``: inside it, ``side()`` blocks run on the side stream, after everything queued on the
  current stream before ``aside`` was entered (so the gradients they read are complete). One wait per block of
  parameters, not one per parameter.
- ``accumulate(total, grad)`` and ``upcast(grad)`` are the two passes, queued aside. The sums are allocated on
  the current stream (freeing them never leaves memory cached for the side stream alone), and each gradient
  read aside is kept from reuse until the side stream is done with it.
- ``join()``: the current stream waits for everything queued aside. Call it before anything reads the sums (a
  step's last reduction, the gradient norm, the optimizer).

On the CPU, or with ``ENABLED`` false, the passes run in place and ``join`` does nothing.
"""

from __future__ import annotations

import contextlib

import torch

from moonforge.model import KERNELS

ENABLED = True
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_PENDING: set[torch.device] = set()
_ACTIVE: list[torch.cuda.Stream] = []  # the side stream while an ``aside`` block is open


@contextlib.contextmanager
def aside(device: torch.device):
    """Queue the ``side()`` blocks within on the side stream, after the current stream's work so far."""
    device = torch.device(device)
    if device.type != "cuda" or not ENABLED or _ACTIVE:
        yield
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    _PENDING.add(device)
    _ACTIVE.append(stream)
    try:
        yield
    finally:
        _ACTIVE.pop()


def side():
    """The side stream as the current one, inside ``aside``; elsewhere nothing changes."""
    return torch.cuda.stream(_ACTIVE[-1]) if _ACTIVE else contextlib.nullcontext()


def _release_after(t: torch.Tensor) -> None:
    if _ACTIVE and t.is_cuda:
        t.record_stream(_ACTIVE[-1])  # its memory is not reused until the side stream's work so far is done


def accumulate(total: torch.Tensor, grad: torch.Tensor) -> None:
    """``total += grad`` (fp32 += low precision), queued aside."""
    with aside(total.device), side():
        KERNELS.accumulate(total, grad)
        _release_after(grad)


def upcast(grad: torch.Tensor) -> torch.Tensor:
    """A new fp32 copy of ``grad``, filled aside."""
    total = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    with aside(grad.device), side():
        KERNELS.upcast_into(total, grad)
        _release_after(grad)
    return total


def join() -> None:
    """The current stream waits for all accumulation queued aside."""
    while _PENDING:
        device = _PENDING.pop()
        torch.cuda.current_stream(device).wait_stream(_STREAMS[device])

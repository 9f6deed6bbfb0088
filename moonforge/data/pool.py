"""An ordered parallel map over worker processes with a bounded number of chunks in flight.

Like Megatron's ``Pool.imap`` but built on ``ProcessPoolExecutor``: a worker that dies raises
``BrokenProcessPool`` here instead of hanging the run, and only ``in_flight`` chunks are queued, so memory stays
flat on inputs of any size. ``workers=0`` runs everything in this process (debugging, small inputs).
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, initializer: Callable | None = None,
                initargs: tuple = (), in_flight: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` in order; ``initializer(*initargs)`` runs once in each worker first."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            check_terminated()
            yield fn(item)
        return
    # fork shares the already imported modules; workers start in milliseconds instead of re-importing torch.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=initializer, initargs=initargs)
    try:
        it = iter(items)
        pending = deque(executor.submit(fn, item) for item in islice(it, in_flight or 4 * workers))
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool:
                raise RuntimeError("a worker process died (out of memory or killed); run again with fewer "
                                   "--workers or smaller inputs") from None
            for item in islice(it, 1):
                pending.append(executor.submit(fn, item))
            check_terminated()
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_terminated = threading.Event()


@contextmanager
def terminate_as_exit():
    """SIGTERM unwinds like Ctrl-C (``SystemExit(143)``), so temporary outputs are removed before the process
    ends. A handler's exception can be swallowed when the signal lands in interpreter internals (an at-fork
    hook, a finalizer), so the flag it sets is also checked between chunks."""
    def handler(signum, frame):
        _terminated.set()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _terminated.clear()


def check_terminated() -> None:
    if _terminated.is_set():
        raise SystemExit(128 + signal.SIGTERM)

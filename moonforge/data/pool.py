"""An ordered parallel map over worker processes with a bounded number of chunks in flight.

Like Megatron's ``Pool.imap`` but built on ``ProcessPoolExecutor``: a worker that dies raises
``BrokenProcessPool`` here instead of hanging the run, and only ``in_flight`` chunks are queued, so memory stays
flat on inputs of any size. ``workers=0`` runs everything in this process (debugging, small inputs).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
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
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

"""Learning-rate schedule with Megatron's semantics: linear warmup from 0, then cosine (or linear) decay to
min_lr over ``decay_iters``, then min_lr. Iteration ``i`` (1-based) trains with ``lr_at(i - 1)``."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"

    def lr_at(self, step: int) -> float:
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if step > self.decay_iters:
            return self.min_lr
        span = self.decay_iters - self.warmup_iters
        ratio = (step - self.warmup_iters) / span if span > 0 else 1.0
        coeff = 1.0 - ratio if self.style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

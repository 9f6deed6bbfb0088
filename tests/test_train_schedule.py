"""The learning-rate schedule against Megatron's own (megatron-core's OptimizerParamScheduler), with the seed's
iteration arithmetic: pretraining counts tokens and decays over all iterations, SFT counts iterations and decays
over train - warmup."""

from __future__ import annotations

import math

import pytest

from moonforge.train.config import TrainConfig
from moonforge.train.schedule import LRSchedule


class _Optimizer:
    """The part of an optimizer that OptimizerParamScheduler touches."""

    def __init__(self):
        self.param_groups = [{"params": []}]


def megatron_lrs(max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int, train_iters: int,
                 global_batch_size: int, style: str) -> list[float]:
    """The learning rate of iterations 1..train_iters as Megatron-LM's training loop sets it: the scheduler
    counts samples (steps of GBS) and is stepped after each iteration's optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = _Optimizer()
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=warmup_iters * global_batch_size,
        lr_decay_steps=decay_iters * global_batch_size, lr_decay_style=style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=train_iters * global_batch_size, wd_incr_style="constant")
    lrs = []
    for _ in range(train_iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=global_batch_size)
    return lrs


def seed_iterations(sft: bool, gbs: int, seq_len: int, train: int, warmup: int) -> tuple[int, int, int]:
    """run_mcore_moonlight.sh's bash arithmetic (integer division, left to right)."""
    if sft:
        return train, warmup, train - warmup
    return train // gbs // seq_len, warmup // gbs // seq_len, train // gbs // seq_len


def _config(sft: bool, gbs: int, seq_len: int, train: int, warmup: int, **kw) -> TrainConfig:
    counts = ({"train_iters": train, "warmup_iters": warmup} if sft
              else {"train_tokens": train, "warmup_tokens": warmup})
    return TrainConfig.from_dict({"sft": sft, "global_batch_size": gbs, "seq_len": seq_len, "data": {"train": ["x"]},
                                  **counts, **kw})


@pytest.mark.parametrize("sft, gbs, seq_len, train, warmup", [
    (False, 8, 1024, 1_000_000_000, 10_000),   # the seed's pretraining example: 122070 iterations, 1 warmup
    (True, 8, 1024, 10_000, 100),              # the seed's SFT example
    (False, 8, 1000, 10_000_001, 8_000 * 3 - 1),  # token counts that do not divide evenly
    (False, 3, 7, 10 * 21 + 20, 0),            # no warmup
])
def test_iterations_follow_the_seed(sft, gbs, seq_len, train, warmup):
    assert _config(sft, gbs, seq_len, train, warmup).iterations() == seed_iterations(sft, gbs, seq_len, train, warmup)


@pytest.mark.parametrize("sft, train, warmup, style", [
    (False, 40 * 8 * 64, 5 * 8 * 64 + 100, "cosine"),
    (True, 40, 6, "cosine"),
    (True, 40, 0, "linear"),
    (False, 30 * 8 * 64, 0, "linear"),
    (True, 25, 12, "cosine"),                  # the longest SFT warmup Megatron accepts: 12 < 25 - 12
    (False, 20 * 8 * 64, 3 * 8 * 64, "constant"),
])
def test_schedule_matches_megatron(sft, train, warmup, style):
    gbs, seq_len, max_lr, min_lr = 8, 64, 3e-4, 3e-5
    cfg = _config(sft, gbs, seq_len, train, warmup, lr=max_lr, min_lr=min_lr, lr_decay_style=style)
    train_iters, warmup_iters, decay_iters = cfg.iterations()
    schedule = LRSchedule(cfg.lr, cfg.min_lr, warmup_iters, decay_iters, cfg.lr_decay_style)
    ours = [schedule.lr_at(i) for i in range(train_iters)]
    want = megatron_lrs(max_lr, min_lr, warmup_iters, decay_iters, train_iters, gbs, style)
    for i, (a, b) in enumerate(zip(ours, want), 1):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-18), (i, a, b)
    if sft and style != "constant" and 0 < decay_iters < train_iters:
        # SFT decays over train - warmup iterations, so the last warmup iterations' worth run at min_lr.
        assert ours[decay_iters + 1:] == [min_lr] * (train_iters - decay_iters - 1)
    if warmup_iters:
        assert ours[0] == 0.0 and ours[warmup_iters] == max_lr


@pytest.mark.parametrize("sft, train, warmup", [(True, 100, 50), (True, 100, 60), (False, 8 * 64 * 10, 8 * 64 * 10)])
def test_warmup_must_end_before_the_decay_does(sft, train, warmup):
    """Megatron refuses lr_warmup_steps >= lr_decay_steps (with SFT's decay of train - warmup iterations, any
    warmup of half the iterations or more); the schedule would otherwise jump from max_lr to min_lr."""
    from moonforge.config import ConfigError

    with pytest.raises(ConfigError, match="warmup"):
        _config(sft, 8, 64, train, warmup)

"""Optimizer state in reduced or offloaded form survives a checkpoint: a run stopped at a checkpoint and started
again logs the same losses, bit for bit, as a run that never stopped.

- bf16 Adam moments (``optimizer_state_dtype: bf16``, any device): torch's loader casts state to the parameter's
  dtype, which silently turned them into fp32 after a resume.
- One GPU with the optimizer state in host memory (``optimizer_offload``): also follows the on-GPU optimizer.
  Needs CUDA; skipped elsewhere (test_flat_adamw.py covers the same optimizer on CPUs).

Tiny model, synthetic tokens, constant learning rate (so a shorter first run has the same schedule); each run is
a `moonforge train` subprocess.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_train_support import CONFIGS, failure, moonforge_train, read_metrics, train_records

STEPS = 6


def _run(out, iters: int, **overrides) -> dict[int, dict]:
    config = {"model": "tiny", "data.train": ["synthetic"], "train_iters": iters, "warmup_iters": 0,
              "lr_decay_style": "constant", "lr": 1e-3, "global_batch_size": 4, "micro_batch_size": 2, "seq_len": 64,
              "eval_interval": None, "tensorboard": False, "save_interval": None, "save_final": True,
              "output_dir": str(out), "parallel.ep": 1, **overrides}
    proc = moonforge_train(CONFIGS / "tiny_pretrain.yaml", config, "--nproc", "1", cwd=out.parent)
    assert proc.returncode == 0, failure(proc)
    return {r["iteration"]: r for r in train_records(read_metrics(out / "metrics.jsonl"))}


def _stopped_and_resumed(tmp_path, **overrides) -> tuple[dict, dict]:
    whole = _run(tmp_path / "whole", STEPS, **overrides)
    _run(tmp_path / "resumed", STEPS // 2, **overrides)           # saves at the end
    resumed = _run(tmp_path / "resumed", STEPS, **overrides)       # continues from that checkpoint
    assert sorted(whole) == sorted(resumed) == list(range(1, STEPS + 1))
    for it in range(1, STEPS + 1):
        assert (resumed[it]["loss"], resumed[it]["grad_norm"]) == (whole[it]["loss"], whole[it]["grad_norm"]), it
    return whole, resumed


def test_bf16_moments_resume_exactly(tmp_path):
    _stopped_and_resumed(tmp_path, precision="fp32", optimizer_state_dtype="bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_run_resumes_exactly_and_follows_the_on_gpu_optimizer(tmp_path):
    gpu = dict(precision="bf16", optimizer_state_dtype="bf16")
    whole, _ = _stopped_and_resumed(tmp_path, optimizer_offload=1.0, **gpu)
    on_gpu = _run(tmp_path / "on_gpu", STEPS, optimizer_offload=0.0, **gpu)
    for it in range(1, STEPS + 1):
        # The same fp32 master weights, up to how two compiled kernels contract multiply-adds.
        assert abs(on_gpu[it]["loss"] - whole[it]["loss"]) <= 1e-3 * abs(whole[it]["loss"]), it
    # (Synthetic tokens are uniform noise: the loss does not fall. That the updates are right is
    # test_flat_adamw.py's job, bit for bit against the on-GPU optimizer.)

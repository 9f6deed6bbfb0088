"""A run killed with SIGKILL at a random step and started again with the same command continues exactly: every
loss (and grad norm, learning rate, loss-token count, expert load) it logs, before and after the kill, is
bitwise identical to an uninterrupted run's. With 1 process, and with 2 processes that `moonforge train
--nproc 2` launches by itself (FSDP over 2 ranks with 2-way expert parallelism, gloo).

Tiny model, fp32, seq 64, the shared real text; each run is a `moonforge train` subprocess.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_train_support import COMPARED_KEYS, CONFIGS, build_tiny_data, failure, kill_tree, moonforge_train, \
    read_metrics, train_env, train_records, value_text

pytestmark = pytest.mark.slow  # subprocesses, 2-process runs

STEPS = 16
SAVE_INTERVAL = 3


def overrides(nproc: int, output_dir: Path, save_interval: int | None) -> dict:
    return {"train_iters": STEPS, "warmup_iters": 2, "global_batch_size": 4, "micro_batch_size": {1: 2, 2: 1}[nproc],
            "eval_interval": None, "tensorboard": False, "save_final": False, "log_interval": 1,
            "save_interval": save_interval, "output_dir": str(output_dir),
            **({"parallel.ep": 2} if nproc == 2 else {})}


def launch_args(nproc: int) -> list[str]:
    return ["--nproc", "2"] if nproc == 2 else []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    build_tiny_data(root, tokenizer_dir)
    return root


def uninterrupted(workdir: Path, nproc: int) -> tuple[dict[int, dict], subprocess.CompletedProcess]:
    """The reference run: never interrupted, never saving on the way."""
    out = workdir / f"reference_{nproc}"
    proc = moonforge_train(CONFIGS / "tiny_pretrain.yaml", overrides(nproc, out, None), *launch_args(nproc),
                           cwd=workdir)
    assert proc.returncode == 0, failure(proc)
    records = {r["iteration"]: r for r in train_records(read_metrics(out / "metrics.jsonl"))}
    assert sorted(records) == list(range(1, STEPS + 1))
    return records, proc


def kill_at_random_step(cmd: list[str], cwd: Path, output_dir: Path, log: Path) -> tuple[int, int]:
    """Start ``cmd``, SIGKILL its whole process tree once iteration ``k`` (random, after the first checkpoint)
    is logged; return (k, iterations logged when it died)."""
    kill_after = random.SystemRandom().randint(SAVE_INTERVAL + 1, STEPS - 4)
    metrics, latest = output_dir / "metrics.jsonl", output_dir / "checkpoint" / "latest"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=train_env(), stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    pytest.fail(f"the run ended (exit {proc.returncode}) before iteration {kill_after} could be "
                                f"killed:\n{log.read_text()[-4000:]}")
                logged = len(train_records(read_metrics(metrics))) if metrics.exists() else 0
                if logged >= kill_after and latest.exists():
                    kill_tree(proc.pid)
                    break
                time.sleep(0.005)
            else:
                pytest.fail(f"iteration {kill_after} was not reached in time:\n{log.read_text()[-4000:]}")
        finally:
            kill_tree(proc.pid)
            proc.wait()
    assert proc.returncode == -9
    return kill_after, len(train_records(read_metrics(metrics)))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bitwise_identical(workdir, nproc):
    reference, proc = uninterrupted(workdir, nproc)
    if nproc == 2:
        # `moonforge train --nproc 2` launched the 2 ranks itself, and the trainer sized data parallelism
        # from the world it found.
        assert "launching 2 process(es) per node on 1 node(s)" in proc.stderr, failure(proc)
        assert "layout DP=2 TP=1 PP=1 CP=1 EP=2 ETP=1" in proc.stderr, failure(proc)
        assert "GBS 4 (MBS 1 x DP 2 x 2 accumulation)" in proc.stderr, failure(proc)

    out = workdir / f"killed_{nproc}"
    cmd = ["moonforge", "train", str(CONFIGS / "tiny_pretrain.yaml"), *launch_args(nproc)]
    for key, value in overrides(nproc, out, SAVE_INTERVAL).items():
        cmd += ["--set", f"{key}={value_text(value)}"]
    kill_after, logged = kill_at_random_step(cmd, workdir, out, workdir / f"killed_{nproc}.log")
    assert kill_after <= logged < STEPS, (kill_after, logged)
    saved = int((out / "checkpoint" / "latest").read_text().strip().removeprefix("iter_"))

    resumed = subprocess.run(cmd, cwd=workdir, env=train_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, failure(resumed)
    assert f"at iteration {saved}" in resumed.stderr, failure(resumed)

    records = train_records(read_metrics(out / "metrics.jsonl"))
    order = [r["iteration"] for r in records]
    restart = next(i for i in range(1, len(order)) if order[i] <= order[i - 1])
    # The killed run logged 1..logged; the resumed one continues after its last checkpoint.
    assert order[:restart] == list(range(1, logged + 1)), order
    assert order[restart:] == list(range(saved + 1, STEPS + 1)), (saved, order)
    assert SAVE_INTERVAL <= saved <= logged and saved % SAVE_INTERVAL == 0
    for r in records:
        want = reference[r["iteration"]]
        for key in COMPARED_KEYS:
            assert r[key] == want[key], (f"killed after iteration {kill_after} ({logged} logged), resumed from "
                                         f"{saved}: iteration {r['iteration']} {key} {r[key]!r} != {want[key]!r}")
    print(f"{nproc} process(es): killed after iteration {kill_after}, resumed from {saved}, "
          f"{len(records)} records identical to the uninterrupted run")

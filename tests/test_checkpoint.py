"""Training checkpoints in one process: resume state, retention, atomicity under SIGKILL, corrupted and
malicious files."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moonforge.checkpoint.dcp import file_record, read_metadata
from moonforge.checkpoint.hf import CheckpointError
from moonforge.checkpoint.native import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    is_native_checkpoint,
    load_native_model,
    write_checkpoint_skeleton,
)
from moonforge.config import preset
from moonforge.model import build_model

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0):
    return build_model(preset("tiny"), seed=seed)


def train_step(model, optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    optimizer.zero_grad()


def full_state(model, optimizer) -> dict:
    return {**{f"m/{k}": v.clone() for k, v in model.state_dict().items()},
            **{f"o/{k}": v.clone() if isinstance(v, torch.Tensor) else v
               for k, v in OptimizerState(model, optimizer).state_dict().items()}}


def assert_equal_states(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_resume_state_roundtrip_and_retention(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    write_checkpoint_skeleton(tmp_path / "run", preset("tiny"), None)
    saved = {}
    for it in range(1, 5):
        train_step(model, optimizer, it)
        scheduler.step()
        state = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "scheduler": scheduler,
                 "dataloader": {"epoch": 0, "position": it * 8}, "rng": {"torch": torch.get_rng_state()}}
        manager.save(it, state, {"consumed_tokens": it * 1000, "consumed_samples": it * 8})
        saved[it] = full_state(model, optimizer)
    assert manager.iterations() == [3, 4] and manager.latest_iteration() == 4
    assert (tmp_path / "run" / "latest").read_text().strip() == "iter_0000004"

    fresh = tiny_model(seed=7)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, foreach=False)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0 / (1 + step))
    loader: dict = {}
    rng: dict = {}
    meta = manager.load({"model": ModelState(fresh), "optimizer": OptimizerState(fresh, fresh_opt),
                         "scheduler": fresh_sched, "dataloader": loader, "rng": rng}, iteration=3)
    assert_equal_states(full_state(fresh, fresh_opt), saved[3])
    assert meta["iteration"] == 3 and meta["consumed_tokens"] == 3000 and meta["consumed_samples"] == 24
    assert loader == {"epoch": 0, "position": 24}
    assert fresh_sched.last_epoch == 3 and fresh_opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    assert rng["torch"].dtype == torch.uint8 and rng["torch"].numel() > 0

    # The iteration directory also serves inference: the model alone, from the root (latest) or a given one.
    model4 = load_native_model(tmp_path / "run")
    assert torch.equal(model4.lm_head.weight, saved[4]["m/lm_head.weight"])
    model3 = load_native_model(tmp_path / "run" / "iter_0000003")
    assert torch.equal(model3.lm_head.weight, saved[3]["m/lm_head.weight"])
    assert is_native_checkpoint(tmp_path / "run") and is_native_checkpoint(tmp_path / "run" / "iter_0000003")
    with pytest.raises(CheckpointError, match=r"iter_0000001: no such iteration; available: \[3, 4\]"):
        manager.load({"model": fresh}, iteration=1)


def test_async_save_snapshots_state_at_call_time(tmp_path):
    model = tiny_model()
    manager = CheckpointManager(tmp_path, async_save=True)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    manager.save(1, {"model": model}, {})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training continues while the save is in flight
    manager.wait()
    manager.close()
    loaded = tiny_model(seed=3)
    CheckpointManager(tmp_path).load({"model": loaded})
    for k, v in want.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_strictness_and_shape_errors(tmp_path):
    model = tiny_model()
    CheckpointManager(tmp_path / "weights").save(0, {"model": model}, {})
    other = tiny_model(seed=1)
    optimizer = torch.optim.AdamW(other.parameters(), foreach=False)
    manager = CheckpointManager(tmp_path / "weights")
    with pytest.raises(CheckpointError, match=r"(?s)missing \(\d+, under optimizer\).*strict=False"):
        manager.load({"model": other, "optimizer": OptimizerState(other, optimizer)})
    manager.load({"model": other, "optimizer": OptimizerState(other, optimizer)}, strict=False)
    assert torch.equal(other.lm_head.weight, model.lm_head.weight)

    wider = build_model(preset("tiny").replace(hidden_size=96), seed=0)
    with pytest.raises(CheckpointError, match=r"mis-shaped .*model\.embed_tokens\.weight: checkpoint \(4096, 64\) "
                                              r"vs here \(4096, 96\)"):
        manager.load({"model": wider})


def _two_saves(tmp_path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path)
    for it in (1, 2):
        manager.save(it, {"w": {"t": torch.full((1000,), float(it))}}, {})
    return manager


def _data_file(iter_dir: Path) -> Path:
    return next(iter_dir.glob("*.distcp"))


def test_truncated_or_corrupted_files_are_named(tmp_path):
    manager = _two_saves(tmp_path)
    data = _data_file(tmp_path / "iter_0000002")
    raw = data.read_bytes()
    data.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=rf"{data.name}: {len(raw) - 100} bytes, meta.json records "
                                              rf"{len(raw)} \(truncated"):
        manager.load({"w": {}})
    data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=rf"{data.name}: CRC-32 .* \(corrupted\)"):
        manager.load({"w": {}})
    (tmp_path / "iter_0000002" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: missing"):
        manager.load({"w": {}})
    (tmp_path / "iter_0000001" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"iter_0000001/meta.json: invalid JSON"):
        manager.load({"w": {}}, iteration=1)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match=r"latest: names iter_0000009, which is missing or incomplete"):
        manager.load({"w": {}})


class _Evil:
    """Unpickling this would run ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_metadata_is_refused(tmp_path):
    manager = _two_saves(tmp_path)
    iter_dir = tmp_path / "iter_0000002"
    marker = tmp_path / "pwned"
    metadata = read_metadata(iter_dir)
    metadata.planner_data = {"w.t": _Evil(marker)}
    (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    meta = json.loads((iter_dir / "meta.json").read_text())
    meta["files"][".metadata"] = file_record(iter_dir / ".metadata")  # sizes and checksums pass: only content is bad
    (iter_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"\.metadata: refusing to load '(posix|os)\.system'"):
        manager.load({"w": {}})
    assert not marker.exists()


def test_non_tensor_values_load_without_arbitrary_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(1, {"extra": {"note": "plain values are fine", "evil": _Evil(marker)}}, {})
    with pytest.raises(CheckpointError, match=r"'extra\.evil' holds an object that is not plain data"):
        manager.load({"extra": {}})
    assert not marker.exists()


_KILLED_SAVER = textwrap.dedent("""
    import sys, time, torch
    import torch.distributed.checkpoint.filesystem as fs
    from moonforge.checkpoint import native
    root, point = sys.argv[1], sys.argv[2]
    manager = native.CheckpointManager(root)
    state = {"w": {"a": torch.full((1 << 20,), 1.0), "b": torch.full((1 << 20,), 1.0)}}
    manager.save(1, state, {"step": 1})
    print("saved 1", flush=True)
    if point == "data":  # stop after the first tensor of the data file is written
        original_write = fs._write_item
        def write_then_hang(*args, **kwargs):
            result = original_write(*args, **kwargs)
            args[1].flush()
            time.sleep(120)
            return result
        fs._write_item = write_then_hang
    else:  # stop after all data and .metadata are written, before meta.json and the rename
        def hang(path):
            time.sleep(120)
        native.file_record = hang
    for t in state["w"].values():
        t.fill_(2.0)
    manager.save(2, state, {"step": 2})
""")


@pytest.mark.slow
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILLED_SAVER)
    points = ("data", "manifest")
    procs = {p: subprocess.Popen([sys.executable, str(script), str(tmp_path / p), p], stdout=subprocess.PIPE,
                                 text=True, cwd=REPO) for p in points}
    for point, proc in procs.items():
        assert proc.stdout.readline().strip() == "saved 1"
        partial = tmp_path / point / "iter_0000002.partial"
        deadline = time.time() + 60
        while not any(partial.glob("*.distcp")) or (point == "manifest" and not (partial / ".metadata").exists()):
            assert time.time() < deadline, f"{partial} never appeared"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for point in points:
        root = tmp_path / point
        assert (root / "latest").read_text().strip() == "iter_0000001"
        assert not (root / "iter_0000002").exists() and (root / "iter_0000002.partial").exists()
        manager = CheckpointManager(root)
        restored: dict = {}
        meta = manager.load({"w": restored})
        assert meta["step"] == 1 and torch.equal(restored["a"], torch.full((1 << 20,), 1.0))
        manager.save(3, {"w": restored}, {"step": 3})  # the next save clears the stale partial directory
        assert not (root / "iter_0000002.partial").exists() and manager.iterations() == [1, 3]


def test_pipeline_parts_save_and_load_into_one_model(tmp_path):
    """Two pipeline stages (several model parts, one optimizer each) -> one whole model, and back."""
    import copy

    whole = tiny_model()
    first, second = copy.deepcopy(whole), copy.deepcopy(whole)
    for name in ("2", "3"):
        del first.model.layers[name]
    for name in ("0", "1"):
        del second.model.layers[name]
    first.model.norm = first.lm_head = None
    second.model.embed_tokens = None
    optimizers = [torch.optim.AdamW(p.parameters(), lr=1e-3, foreach=False) for p in (first, second)]
    for seed, (part, opt) in enumerate(zip((first, second), optimizers)):
        train_step(part, opt, seed)
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"model": ModelState([first, second]), "optimizer": OptimizerState([first, second], optimizers)},
                 {})
    want = {**OptimizerState(first, optimizers[0]).state_dict(), **OptimizerState(second, optimizers[1]).state_dict()}

    loaded = tiny_model(seed=9)
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-3, foreach=False)
    manager.load({"model": loaded, "optimizer": OptimizerState(loaded, optimizer)})
    got = OptimizerState(loaded, optimizer).state_dict()
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
    for name, tensor in {**first.state_dict(), **second.state_dict()}.items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # And back into fresh stages.
    stage = copy.deepcopy(second)
    stage_opt = torch.optim.AdamW(stage.parameters(), lr=1e-3, foreach=False)
    manager.load({"model": ModelState([stage]), "optimizer": OptimizerState([stage], [stage_opt])})
    for key, value in OptimizerState(second, optimizers[1]).state_dict().items():
        got_value = OptimizerState(stage, stage_opt).state_dict()[key]
        assert torch.equal(got_value, value) if isinstance(value, torch.Tensor) else got_value == value, key

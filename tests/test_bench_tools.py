"""benchmarks/train_bench.py on the CPU: a whole run of the tiny preset writes its JSON (both timings), and the
idle-gap attribution charges each stretch without kernels to the host code that launched the kernel ending it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_bench  # noqa: E402


def test_tiny_run_writes_both_timings(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--preset", "tiny", "--layers", "2",
                    "--mbs", "1", "--gbs", "2", "--seq", "64", "--steps", "2", "--warmup", "1", "--precision", "fp32",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())["moonforge"]
    assert len(result["step_times_s"]) == 2 and len(result["optimizer_step_times_s"]) == 2
    b2b = result["back_to_back"]
    assert b2b["step_time_s_mean"] > 0
    assert b2b["tokens_per_s_per_gpu"] == pytest.approx(2 * 64 / b2b["step_time_s_mean"])
    assert len(result["losses"]) == 2


def _op(i, name, parent=None):
    return SimpleNamespace(id=i, name=name, cpu_parent=parent, device_type=DeviceType.CPU,
                           time_range=SimpleNamespace(start=0.0, end=0.0))


def _kernel(name, start, end, launched_by):
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, linked_correlation_id=launched_by.id,
                           time_range=SimpleNamespace(start=start, end=end))


def test_idle_gaps_are_charged_to_the_launching_code():
    step = _op(1, "ProfilerStep#1")
    loss = _op(2, "mf.loss", step)
    mm = _op(3, "aten::mm", loss)
    optimizer = _op(4, "Optimizer.step#AdamW.step", _op(5, "mf.optimizer"))
    foreach = _op(6, "aten::_foreach_add_", optimizer)
    graph = _op(7, "## Call CompiledFxGraph abc ##", _op(8, "autograd::engine::evaluate_function: MmBackward0"))
    triton = _op(9, "triton_poi_fused_add_0", graph)
    events = [step, loss, mm, optimizer, foreach, graph, triton,
              _kernel("k0", 0, 10, mm),
              _kernel("k1", 50, 60, mm),            # 40 us after k0: charged to mf.loss / aten::mm
              _kernel("k2", 65, 70, foreach),       # 5 us: below the threshold
              _kernel("k3", 55, 90, foreach),       # overlaps k1 and k2: the covered time runs to 90
              _kernel("k4", 190, 200, foreach),     # 100 us: the optimizer
              _kernel("k5", 230, 240, triton),      # 30 us: backward, compiled graph
              _kernel("k6", 300, 310, mm),          # 60 us: mf.loss again
              SimpleNamespace(name="## Call CompiledFxGraph abc ##", device_type=DeviceType.CUDA,  # a GPU-side range,
                              linked_correlation_id=0, is_user_annotation=False,                 # not a kernel
                              time_range=SimpleNamespace(start=0, end=400))]
    from_events = SimpleNamespace(events=lambda: events)
    # The same kernels as the profiler's raw records (nanoseconds), which every torch version links to their op.
    raw = [SimpleNamespace(device_type=lambda e=e: e.device_type, name=lambda e=e: e.name,
                           is_user_annotation=lambda e=e: getattr(e, "is_user_annotation", False),
                           start_ns=lambda e=e: e.time_range.start * 1000, end_ns=lambda e=e: e.time_range.end * 1000,
                           linked_correlation_id=lambda e=e: e.linked_correlation_id)
           for e in events if e.device_type == DeviceType.CUDA]
    from_raw = SimpleNamespace(events=lambda: [e for e in events if e.device_type == DeviceType.CPU],
                               profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: raw)))
    for prof in (from_events, from_raw):
        _check(train_bench.idle_gaps(prof, min_us=20))


def _check(gaps):
    assert gaps["gaps"] == 4 and gaps["total_ms"] == pytest.approx(0.23, abs=0.001)
    sites = {name: (n, ms) for name, n, ms in gaps["sites"]}
    assert sites == {"mf.optimizer > Optimizer.step#AdamW.step / aten::_foreach_add_": (1, 0.1),
                     "mf.loss / aten::mm": (2, 0.1),
                     "backward MmBackward0 > compiled graph / triton_poi_fused_add_0": (1, 0.03)}
    assert gaps["sites"][0][2] >= gaps["sites"][-1][2]

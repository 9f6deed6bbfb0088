"""Every parallel layout reproduces the single-process run: first 3 steps' losses and grad norms within 1e-5.

Each layout runs in its own torchrun (gloo, CPU) from the same initial weights on the same global batches,
with packed documents and partly masked labels so that document masking and token-mean normalisation are
exercised too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moonforge.config import preset
from moonforge.model import build_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "tiny", "precision": "fp32", "seq_len": 32, "micro_batch_size": 1, "global_batch_size": 4,
        "train_iters": 10, "lr": 1e-3, "min_lr": 1e-4, "data": {"train": ["synthetic"]}, "tensorboard": False}


def run_layout(tmp: Path, nproc: int, overrides: dict, name: str, steps: int = 3) -> list[dict]:
    weights = tmp / "weights.pt"
    if not weights.exists():
        torch.save(build_model(preset("tiny"), seed=0).state_dict(), weights)
    cfg = dict(BASE, output_dir=str(tmp / name), **overrides)
    out = tmp / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "workers" / "parallel_harness.py"), "--config", json.dumps(cfg),
           "--weights", str(weights), "--out", str(out), "--steps", str(steps), "--packed", "--masked"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference(workdir):
    return run_layout(workdir, 1, {}, "single")


LAYOUTS = {
    "fsdp2": (2, {"parallel": {}}),
    "tp2_sp": (2, {"parallel": {"tp": 2, "sp": True}}),
    "pp2_uneven": (2, {"parallel": {"pp": 2, "pp0_layers": 1}}),
    "cp2": (2, {"parallel": {"cp": 2}}),
    "ep2": (2, {"parallel": {"ep": 2}}),
    "tp2_x_ep2": (4, {"parallel": {"tp": 2, "sp": True, "ep": 2}}),
    "pp2_x_dp2": (4, {"parallel": {"pp": 2, "pp0_layers": 1}}),
    "ep2_x_etp2": (4, {"parallel": {"ep": 2, "etp": 2}}),
    # Gradients reduced after every micro-batch (the default defers the reduction to the last one).
    "fsdp2_sync_each_micro_batch": (2, {"parallel": {"defer_grad_sync": False}}),
    "ep2_sync_each_micro_batch": (2, {"parallel": {"ep": 2, "defer_grad_sync": False}}),
    # Selective recomputation must find FSDP's weights as the forward left them, micro-batch after micro-batch.
    "ep2_selective_recompute": (2, {"activation_checkpointing": "sel", "parallel": {"ep": 2}}),
    "ep2_allgather": (2, {"parallel": {"ep": 2, "ep_dispatcher": "allgather"}}),
    "tp2_x_ep2_allgather": (4, {"parallel": {"tp": 2, "sp": True, "ep": 2, "ep_dispatcher": "allgather"}}),
    "ep2_x_etp2_allgather": (4, {"parallel": {"ep": 2, "etp": 2, "ep_dispatcher": "allgather"}}),
    # The static rows gathered again in the backward, with the weights cast again and the layer recomputed.
    "ep2_allgather_recompute_cast_per_use": (2, {"activation_checkpointing": "full", "parallel": {
        "ep": 2, "ep_dispatcher": "allgather", "cache_expert_casts": False}}),
}
MUON = {"optimizer": "muon", "muon": {"ns_dtype": "fp32"}}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(workdir, reference, name):
    nproc, overrides = LAYOUTS[name]
    got = run_layout(workdir, nproc, overrides, name)
    for step, (a, b) in enumerate(zip(reference, got), 1):
        for key in ("loss", "grad_norm"):
            rel = abs(a[key] - b[key]) / abs(a[key])
            print(f"{name} step {step} {key}: {b[key]:.8f} vs {a[key]:.8f} (rel {rel:.1e})")
            assert rel < 1e-5, (name, step, key, a[key], b[key])


@pytest.mark.parametrize("name", ["fsdp2", "ep2"])
def test_muon_layout_matches_single_process(workdir, name):
    """The trainer with Muon (fp32 Newton-Schulz): sharded layouts give the single-process steps."""
    reference = run_layout(workdir, 1, MUON, "muon_single")
    nproc, overrides = LAYOUTS[name]
    got = run_layout(workdir, nproc, {**overrides, **MUON}, f"muon_{name}")
    for step, (a, b) in enumerate(zip(reference, got), 1):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) / abs(a[key]) < 1e-5, (name, step, key, a[key], b[key])


@pytest.mark.parametrize("dispatcher,cache,blocks", [("alltoall", True, False), ("allgather", True, False),
                                                    ("alltoall", False, False), ("allgather", True, True)],
                         ids=["alltoall", "allgather", "alltoall_cast_per_use", "allgather_compiled_blocks"])
def test_bf16_expert_parallel_matches_single_process(workdir, dispatcher, cache, blocks):
    """In bf16 the expert-parallel weights are cast once per step (or per use) and their gradients added into
    fp32 .grad (the single process lets FSDP cast them instead): the same steps within bf16 rounding. With
    ``compile_blocks`` the blocks run compiled around the eager expert dispatch; the reference stays eager."""
    bf16 = {"precision": "bf16", "global_batch_size": 8}
    reference = run_layout(workdir, 1, bf16, "bf16_single")
    parallel = {"ep": 2, "ep_dispatcher": dispatcher, "cache_expert_casts": cache}
    got = run_layout(workdir, 2, {**bf16, "compile_blocks": blocks, "parallel": parallel},
                     f"bf16_ep2_{dispatcher}_{cache}_{blocks}")
    for step, (a, b) in enumerate(zip(reference, got), 1):
        for key in ("loss", "grad_norm"):
            rel = abs(a[key] - b[key]) / abs(a[key])
            print(f"bf16 ep2 {dispatcher} step {step} {key}: {b[key]:.6f} vs {a[key]:.6f} (rel {rel:.1e})")
            # Same weights at step 1; afterwards bf16 parameter rounding lets the runs drift apart slowly.
            assert rel < (1e-3 if step == 1 else 5e-3), (dispatcher, step, key, a[key], b[key])


@pytest.mark.parametrize("name,nproc,overrides", [
    ("fsdp2", 2, {"parallel": {}}),
    ("ep2", 2, {"parallel": {"ep": 2}}),
    ("ep2_cast_per_use", 2, {"parallel": {"ep": 2, "cache_expert_casts": False}}),
    ("ep2_allgather_compiled_blocks", 2, {"compile_blocks": True, "parallel": {"ep": 2, "ep_dispatcher": "allgather"}}),
    ("pp2", 2, {"parallel": {"pp": 2, "pp0_layers": 1}}),
])
def test_fp8_layouts_match_single_process(workdir, name, nproc, overrides):
    """precision fp8 (emulated on CPUs): every row scale is taken over a whole token or a whole weight row, which
    FSDP, EP and PP keep whole, so sharded layouts give the single process's steps up to bf16 rounding. Compiled
    blocks round differently from the eager reference before quantising, and FP8 turns some of those differences
    into whole quantisation steps: a looser bound there (measured 1.3e-4 to 1.4e-3 at step 1). After the first
    step the gradient norm gets a looser bound still: Adam's first update moves every weight by about ±lr
    whatever its gradient's size, so gradient elements near zero whose sign differs by rounding move their
    weights apart by twice that, and FP8 turns some of the moves into new quantisation steps (measured up to
    5.1e-3 at steps 2 and 3, where the losses still agree to 1e-4). The layouts keep each weight's FP8 copies for
    the step (``fp8_cache_weights``; EP quantises its local shards, keyed on the masters); the reference
    quantises per use."""
    fp8 = {"precision": "fp8", "global_batch_size": 8}
    reference = run_layout(workdir, 1, {**fp8, "fp8_cache_weights": False}, "fp8_single")
    got = run_layout(workdir, nproc, {**fp8, "fp8_cache_weights": True, **overrides}, f"fp8_{name}")
    for step, (a, b) in enumerate(zip(reference, got), 1):
        for key in ("loss", "grad_norm"):
            rel = abs(a[key] - b[key]) / abs(a[key])
            print(f"fp8 {name} step {step} {key}: {b[key]:.6f} vs {a[key]:.6f} (rel {rel:.1e})")
            bound = 5e-3 if overrides.get("compile_blocks") or step > 1 else 1e-3
            if key == "grad_norm" and step > 1:
                bound = 1e-2
            assert rel < bound, (name, step, key, a[key], b[key])


def test_micro_batching_does_not_change_the_update(workdir):
    """GBS 8 as 4 micro-batches of 2 gives the same steps as one micro-batch of 8."""
    a = run_layout(workdir, 1, {"micro_batch_size": 2, "global_batch_size": 8}, "mbs2")
    b = run_layout(workdir, 1, {"micro_batch_size": 8, "global_batch_size": 8}, "mbs8")
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) / x["loss"] < 1e-6
        assert abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] < 1e-6


def _fsdp_units_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moonforge.model import Router, Transformer
    from moonforge.parallel import ParallelDims, build_meshes, materialize, parallelize

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        config = preset("tiny")
        with torch.device("meta"):
            model = Transformer(config)
        meshes = build_meshes(ParallelDims.for_world(world), torch.device("cpu"))
        pm = parallelize(model, meshes, param_dtype=torch.bfloat16)
        materialize(pm, torch.device("cpu"), init_seed=0)
        routers = [m for m in model.modules() if isinstance(m, Router)]
        # One FSDP group per block and the root; the routers' weights stay whole fp32 tensors outside FSDP.
        assert len(pm.fsdp_modules) == config.num_hidden_layers + 1
        assert routers and all(type(r.weight) is torch.nn.Parameter and r.weight.dtype == torch.float32
                               for r in routers)
        assert [p for p in pm.replicated_params] == [r.weight for r in routers]
        assert all(isinstance(p, DTensor) for n, p in model.named_parameters() if "mlp.gate." not in n)
        ids = torch.randint(0, config.vocab_size, (1, 16))
        model(ids, labels=ids).backward()
        pm.reduce_gradients()
        assert all(r.weight.grad is not None and r.weight.grad.dtype == torch.float32 for r in routers)
    finally:
        dist.destroy_process_group()


def test_fsdp_groups_one_per_block_and_routers_stay_fp32_outside(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_units_worker, args=(1, str(tmp_path)), nprocs=1, join=True)

"""Muon under FSDP2, TP, EP and ETP (multi-process, gloo on CPU): the same parameters as one process.

Each layout trains the tiny model for 3 steps with Newton-Schulz in fp32, in both distributed modes, and is
compared with a single-process run of the same data. The FSDP2 run also saves a DCP checkpoint after step 2,
resumes from it, and the parent process loads that checkpoint unsharded and continues.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moonforge.config import preset
from moonforge.model import build_model, cross_entropy_sum
from moonforge.train.muon import DISTRIBUTED_MODES, Muon, muon_param_groups

pytestmark = pytest.mark.slow  # spawns 2 or 4 processes

STEPS, LR, WD = 3, 1e-3, 0.1
ROWS, SEQ = 4, 16
REL = 1e-5


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, preset("tiny").vocab_size, (ROWS, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def make_optimizer(groups, mode: str = "spread") -> Muon:
    return Muon(groups, lr=LR, weight_decay=WD, ns_dtype=torch.float32, distributed_mode=mode)


def train_step(model, opt, step: int, rows: slice = slice(None)) -> None:
    opt.zero_grad()
    x, y = batch(step)
    x, y = x[rows], y[rows]
    loss = cross_entropy_sum(model(x), y) / y.numel()
    loss.backward()
    opt.step()


def full_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def assert_params_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float = REL,
                        what: str = "") -> None:
    """Relative Frobenius error of every tensor. (Not elementwise: where a gradient element nearly cancels, the
    AdamW update of that element flips with summation order, as it does for torch.optim.AdamW.)"""
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        err = ((got[name] - r).norm() / r.norm()).item()
        assert err <= rel, f"{what} {name}: relative error {err:.3g} > {rel}"


@pytest.fixture(scope="module")
def reference() -> dict[int, dict[str, torch.Tensor]]:
    """Single-process parameters after each step."""
    model = build_model(preset("tiny"), seed=0)
    opt = make_optimizer(muon_param_groups(model, lr=LR, weight_decay=WD))
    out = {0: full_params(model)}
    for step in range(STEPS):
        train_step(model, opt, step)
        out[step + 1] = full_params(model)
    # Parameters move by far more than the tolerance, so an error in any update would show.
    for name, p in out[STEPS].items():
        assert (p - out[0][name]).norm() > 100 * REL * p.norm(), name
    return out


def spawn(world: int, fn, tmp_path, *args) -> dict:
    """Run ``fn(rank, world, out_dir, *args)`` on ``world`` gloo processes; returns what rank 0 saved."""
    mp.spawn(_worker, args=(world, str(tmp_path), fn, args), nprocs=world, join=True)
    return torch.load(tmp_path / "result.pt")


def _worker(rank: int, world: int, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        result = fn(rank, world, out_dir, *args)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """One 2-process run of every 2-rank layout (process start-up dominates the cost of these tests)."""
    out_dir = tmp_path_factory.mktemp("muon_two_ranks")
    result = spawn(2, two_rank_worker, out_dir)
    result["dir"] = out_dir
    return result


def two_rank_worker(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.tensor import Shard

    layouts = {
        "EP": ((2,), ("ep",), [Shard(0)], [Shard(0)]),  # whole experts per rank: no gather
        "ETP": ((2,), ("etp",), [Shard(2)], [Shard(2)]),  # the intermediate dim split: gather over etp
    }
    return {"FSDP": fsdp_worker(rank, world, out_dir), "TP": tp_worker(rank, world, out_dir),
            "experts": expert_worker(rank, world, out_dir, layouts), "uneven": uneven_worker(rank, world)}


# ---------------------------------------------------------------------------------------------------- FSDP2
def fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_model(preset("tiny"), seed=0)
    for layer in model.model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_worker(rank: int, world: int, out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    result = {}
    for mode in DISTRIBUTED_MODES:
        model = fsdp_model(mesh)
        opt = make_optimizer(muon_param_groups(model, lr=LR, weight_decay=WD), mode)
        for step in range(STEPS):
            if step == STEPS - 1 and mode == "spread":
                model_sd, optim_sd = get_state_dict(model, opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out_dir, "ckpt"))
            train_step(model, opt, step, rows)
        result[mode] = full_params(model)

    resumed = fsdp_model(mesh)
    opt = make_optimizer(muon_param_groups(resumed, lr=1.0, weight_decay=0.0))
    model_sd, optim_sd = get_state_dict(resumed, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "ckpt"))
    set_state_dict(resumed, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_step(resumed, opt, STEPS - 1, rows)
    result["resumed"] = full_params(resumed)
    shapes = {n: (tuple(p.to_local().shape), str(p.placements)) for n, p in resumed.named_parameters()}
    result["layout"] = shapes
    return result


def test_fsdp2_matches_one_process_and_resumes_from_dcp(two_ranks, reference):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    result, out_dir = two_ranks["FSDP"], two_ranks["dir"]
    # Really sharded: the stacked experts (8) split 4/4, the router's 8 rows too, q_proj's rows in half.
    assert result["layout"]["model.layers.1.mlp.experts.gate_up_proj"][0][0] == 4
    assert result["layout"]["model.layers.1.self_attn.q_proj.weight"][0][0] == 48
    for mode in DISTRIBUTED_MODES:
        assert_params_close(result[mode], reference[STEPS], what=f"FSDP2 {mode}")
    assert_params_close(result["spread"], result["replicated"], rel=1e-6, what="spread vs replicated")
    for name, p in result["resumed"].items():
        assert torch.equal(p, result["spread"][name]), f"resumed from DCP differs: {name}"

    # The sharded checkpoint loads into one process (resharding) and continues like the single-process run.
    model = build_model(preset("tiny"), seed=1)
    opt = make_optimizer(muon_param_groups(model, lr=1.0, weight_decay=0.0))
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=out_dir / "ckpt")
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert_params_close(full_params(model), reference[STEPS - 1], what="loaded checkpoint")
    train_step(model, opt, STEPS - 1)
    assert_params_close(full_params(model), reference[STEPS], what="continued after unsharded load")


# ---------------------------------------------------------------------------------------------------- TP
class SharedRopeKeyGradient(torch.autograd.Function):
    """Identity whose backward sums the RoPE key's gradient over the TP group.

    With heads split over TP, each rank's attention sees only its heads, so the gradient of the key part shared
    by all heads (k_pe, the last qk_rope_head_dim outputs of kv_a_proj_with_mqa) is a partial sum. The latent
    part is already complete: kv_b_proj's ColwiseParallel input reduces it.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, start: int, group) -> torch.Tensor:
        ctx.start, ctx.group = start, group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        rope = grad[..., ctx.start:].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        grad[..., ctx.start:] = rope
        return grad, None, None


def tensor_parallel(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    colwise, rowwise = ColwiseParallel(), RowwiseParallel()
    start, group = model.config.kv_lora_rank, mesh.get_group()
    for layer in model.model.layers.values():
        layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(
            lambda module, args, out: SharedRopeKeyGradient.apply(out, start, group))
        plan = {"self_attn.q_proj": colwise, "self_attn.kv_b_proj": colwise, "self_attn.o_proj": rowwise}
        mlp = "mlp" if hasattr(layer.mlp, "gate_proj") else "mlp.shared_experts"
        plan.update({f"{mlp}.gate_proj": colwise, f"{mlp}.up_proj": colwise, f"{mlp}.down_proj": rowwise})
        parallelize_module(layer, mesh, plan)
    return model


def tp_worker(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    result = {}
    for mode in DISTRIBUTED_MODES:
        model = tensor_parallel(build_model(preset("tiny"), seed=0), mesh)
        opt = make_optimizer(muon_param_groups(model, lr=LR, weight_decay=WD), mode)
        for step in range(STEPS):
            train_step(model, opt, step)
        result[mode] = full_params(model)
    result["placements"] = {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}
    return result


def test_tensor_parallel_matches_one_process(two_ranks, reference):
    result = two_ranks["TP"]
    assert result["placements"]["model.layers.1.self_attn.q_proj.weight"] == "(Shard(dim=0),)"
    assert result["placements"]["model.layers.0.mlp.down_proj.weight"] == "(Shard(dim=1),)"
    for mode in DISTRIBUTED_MODES:
        assert_params_close(result[mode], reference[STEPS], what=f"TP {mode}")


# ---------------------------------------------------------------------------------------------------- EP / ETP
def expert_worker(rank: int, world: int, out_dir: str, layouts: dict) -> dict:
    """Experts as DTensors over an expert mesh; the forward runs on a full replica and hands over gradients.

    ``layouts`` maps mesh shape -> placements for gate_up [E, 2, I, H] and down [E, H, I].
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    result = {}
    for label, (mesh_shape, names, gate_up_pl, down_pl) in layouts.items():
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        for mode in DISTRIBUTED_MODES:
            model = build_model(preset("tiny"), seed=0)
            groups = muon_param_groups(model, lr=LR, weight_decay=WD)
            shards = {}
            for g in groups:
                for i, (name, p) in enumerate(zip(g["param_names"], g["params"])):
                    if ".experts." in name:
                        placements = gate_up_pl if name.endswith("gate_up_proj") else down_pl
                        g["params"][i] = shards[name] = torch.nn.Parameter(
                            distribute_tensor(p.detach().clone(), mesh, placements))
            full = dict(model.named_parameters())
            opt = make_optimizer(groups, mode)
            for step in range(STEPS):
                opt.zero_grad()
                x, y = batch(step)
                model.zero_grad()
                (cross_entropy_sum(model(x), y) / y.numel()).backward()
                for name, shard in shards.items():
                    shard.grad = distribute_tensor(full[name].grad, mesh, shard.placements)
                opt.step()
                with torch.no_grad():
                    for name, shard in shards.items():
                        full[name].copy_(shard.full_tensor())
            result[f"{label} {mode}"] = full_params(model)
            result[f"{label} local"] = tuple(next(iter(shards.values())).to_local().shape)
    return result


def test_expert_parallel_and_expert_tensor_parallel_match_one_process(two_ranks, reference):
    result = two_ranks["experts"]
    assert result["EP local"] == (4, 2, 32, 64) and result["ETP local"] == (8, 2, 16, 64)
    for label in ("EP", "ETP"):
        for mode in DISTRIBUTED_MODES:
            assert_params_close(result[f"{label} {mode}"], reference[STEPS], what=f"{label} {mode}")


# ---------------------------------------------------------------------------------------------------- uneven
def uneven_tensors() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Odd-sized matrices (7 rows over 2 ranks), a stack of them, and gradients for each step."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"a": (7, 5), "b": (7, 5), "stack": (3, 7, 5), "wide": (5, 9)}
    params = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(STEPS)]
    return params, grads


def uneven_worker(rank: int, world: int) -> dict:
    """Uneven shards, a matrix dim of a stack split, and a Partial gradient (summed by the optimizer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = {"a": Shard(0), "b": Shard(0), "stack": Shard(1), "wide": Shard(1)}
    start, grads = uneven_tensors()
    result = {}
    for mode in DISTRIBUTED_MODES:
        params = {n: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [placements[n]])) for n, t in start.items()}
        opt = make_optimizer([{"params": list(params.values()), "param_names": list(params), "use_muon": True}], mode)
        for step_grads in grads:
            for n, p in params.items():
                if n == "wide":
                    p.grad = DTensor.from_local(step_grads[n] / world, mesh, [Partial()])
                else:
                    p.grad = distribute_tensor(step_grads[n], mesh, [placements[n]])
            opt.step()
        result[mode] = {n: p.full_tensor() for n, p in params.items()}
    return result


def test_uneven_shards_and_partial_gradients(two_ranks):
    start, grads = uneven_tensors()
    params = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    opt = make_optimizer([{"params": list(params.values()), "param_names": list(params), "use_muon": True}])
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n]
        opt.step()
    expected = {n: p.detach() for n, p in params.items()}
    for mode in DISTRIBUTED_MODES:
        assert_params_close(two_ranks["uneven"][mode], expected, what=f"uneven {mode}")


# ---------------------------------------------------------------------------------------------------- 2-D
def two_d_worker(rank: int, world: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    rows = slice(mesh.get_local_rank("dp") * ROWS // 2, (mesh.get_local_rank("dp") + 1) * ROWS // 2)
    result = {}
    for mode in DISTRIBUTED_MODES:
        model = tensor_parallel(build_model(preset("tiny"), seed=0), mesh["tp"])
        for layer in model.model.layers.values():
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        opt = make_optimizer(muon_param_groups(model, lr=LR, weight_decay=WD), mode)
        for step in range(STEPS):
            train_step(model, opt, step, rows)
        result[f"FSDP+TP {mode}"] = full_params(model)
    result["placements"] = str(model.model.layers["1"].self_attn.q_proj.weight.placements)
    result.update(expert_worker(rank, world, out_dir, {
        "EP+ETP": ((2, 2), ("ep", "etp"), [Shard(0), Shard(2)], [Shard(0), Shard(2)])}))
    return result


def test_two_dimensional_layouts_match_one_process(tmp_path, reference):
    result = spawn(4, two_d_worker, tmp_path)
    assert "_StridedShard" in result["placements"], result["placements"]
    assert result["EP+ETP local"] == (4, 2, 16, 64)
    for key in [k for k in result if k.endswith(DISTRIBUTED_MODES)]:
        assert_params_close(result[key], reference[STEPS], what=key)

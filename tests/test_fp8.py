"""FP8 products (precision fp8): quantisation, the scaled products against their dequantised definition, the
linear and expert autograd against bf16, and training through the trainer."""

import pytest
import torch

from moonforge import fp8
from moonforge.config import ConfigError, preset
from moonforge.model import GroupedExperts, Linear, Transformer, enable_fp8, expert_ffn
from moonforge.train.config import TrainConfig
from tests.test_train_support import CONFIGS, build_tiny_data, failure, moonforge_train, read_metrics, train_records

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _uneven(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of very different magnitudes: a scale applied along the wrong dimension cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-3, 2, rows)[torch.randperm(rows, generator=g)]
    return torch.randn(rows, cols, generator=g) * magnitudes[:, None]


def test_quantize_rows_maps_each_row_maximum_to_the_largest_e4m3_value():
    x = _uneven(32, 64, 0)
    x[5] = 0.0
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and scale.shape == (32, 1)
    back = fp8.dequantize_rows(q, scale)
    assert torch.equal(back[5], torch.zeros(64))
    live = [i for i in range(32) if i != 5]
    assert torch.allclose(q.float()[live].abs().amax(dim=1), torch.full((31,), 448.0))
    # e4m3 keeps 3 mantissa bits: every element within half a step (1/16 relative) of its row's value scale.
    err = (back - x).abs() / (x.abs() + scale * 2.0 ** -9)
    assert err.max() <= 2.0 ** -4 + 1e-6


@pytest.mark.skipif(not CUDA, reason="needs a GPU with FP8 tensor cores")
@pytest.mark.parametrize("fast_accum", [False, True])
def test_cuda_scaled_mm_is_the_product_of_the_dequantised_operands(fast_accum):
    a, b = _uneven(200, 512, 1), _uneven(96, 512, 2)
    (qa, sa), (qb, sb) = fp8.quantize_rows(a), fp8.quantize_rows(b)
    ref = fp8.dequantize_rows(qa, sa) @ fp8.dequantize_rows(qb, sb).t()
    out = fp8.scaled_mm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), torch.bfloat16, fast_accum=fast_accum)
    assert _rel(out.cpu(), ref) < 4e-3  # bf16 output rounding


def test_scaled_grouped_mm_multiplies_each_group_by_its_own_weights_and_scales():
    a = _uneven(40, 32, 3)
    b = torch.stack([_uneven(48, 32, 10 + g) for g in range(4)])
    offs = torch.tensor([9, 9, 30, 40], dtype=torch.int32)  # group 1 is empty
    (qa, sa), (qb, sb) = fp8.quantize_rows(a), fp8.quantize_rows(b)
    out = fp8.scaled_grouped_mm(qa, sa, qb, sb, offs, torch.float32)
    da, db = fp8.dequantize_rows(qa, sa), fp8.dequantize_rows(qb, sb)
    ref = torch.cat([da[0:9] @ db[0].t(), da[9:30] @ db[2].t(), da[30:40] @ db[3].t()])
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.skipif(not CUDA, reason="needs a GPU with FP8 tensor cores")
def test_cuda_scaled_grouped_mm_matches_the_cpu_definition():
    a, offs = _uneven(1000, 256, 4), torch.tensor([100, 100, 613, 1000], dtype=torch.int32)
    b = torch.stack([_uneven(384, 256, 20 + g) for g in range(4)])
    (qa, sa), (qb, sb) = fp8.quantize_rows(a), fp8.quantize_rows(b)
    ref = fp8.scaled_grouped_mm(qa, sa, qb, sb, offs, torch.float32)
    out = fp8.scaled_grouped_mm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), offs.cuda(), torch.bfloat16)
    assert _rel(out.cpu(), ref) < 4e-3  # bf16 output rounding


def test_fp8_linear_forward_and_input_gradient_are_fp8_accurate_and_the_weight_gradient_is_exact_bf16():
    x = (torch.randn(3, 20, 64) * 4).bfloat16().requires_grad_()
    w = (torch.randn(96, 64) * 0.1).bfloat16().requires_grad_()
    grad = torch.randn(3, 20, 96).bfloat16()
    out = fp8.linear(x, w)
    out.backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, w_ref)
    ref.backward(grad)
    # Two e4m3 roundings per product term: about 4% relative noise, far below a layout or scale error.
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert _rel(out, ref) < 0.06
    assert _rel(x.grad, x_ref.grad) < 0.06
    assert torch.equal(w.grad, w_ref.grad)
    # The forward is exactly the product of the quantised operands.
    (qx, sx), (qw, sw) = fp8.quantize_rows(x.detach().reshape(-1, 64)), fp8.quantize_rows(w.detach())
    exact = (fp8.dequantize_rows(qx, sx) @ fp8.dequantize_rows(qw, sw).t()).bfloat16()
    assert _rel(out.reshape(-1, 96), exact) < 4e-3


def test_fp8_linear_module_keeps_its_bias():
    torch.manual_seed(0)
    layer = Linear(64, 32, bias=True).bfloat16()
    torch.nn.init.normal_(layer.bias, std=1.0)
    x = torch.randn(5, 64).bfloat16()
    ref = layer(x)
    layer.fp8 = True
    out = layer(x)
    assert _rel(out, ref) < 0.06
    out.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((32,), 5.0, dtype=torch.bfloat16))


def test_fp8_expert_ffn_tracks_bf16_and_leaves_empty_experts_without_gradient():
    torch.manual_seed(0)
    n_experts, hidden, inter = 4, 64, 32
    gate_up = (torch.randn(n_experts, 2, inter, hidden) * 0.05).bfloat16().requires_grad_()
    down = (torch.randn(n_experts, hidden, inter) * 0.05).bfloat16().requires_grad_()
    counts = torch.tensor([10, 0, 7, 15])
    x = torch.randn(32, hidden).bfloat16().requires_grad_()
    grad = torch.randn(32, hidden).bfloat16()
    results = {}
    for use_fp8 in (False, True):
        for t in (x, gate_up, down):
            t.grad = None
        out = expert_ffn(x, gate_up, down, counts, fp8=use_fp8)
        out.backward(grad)
        results[use_fp8] = (out.detach(), x.grad, gate_up.grad, down.grad)
    for ref, got in zip(results[False], results[True]):
        assert _rel(got, ref) < 0.12  # two FP8 products in a row
    assert not results[True][2][1].any() and not results[True][3][1].any()


def test_enable_fp8_switches_projections_and_experts_but_not_the_head_router_or_odd_shapes():
    cfg = preset("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    switched = set(enable_fp8(model))
    linears = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    odd = {n for n in linears if not fp8.supported_shape(*model.get_submodule(n).weight.shape)}
    assert odd and switched >= linears - odd and not switched & odd
    assert {n for n, m in model.named_modules() if isinstance(m, GroupedExperts)} <= switched
    assert not any(n.endswith(("lm_head", "gate", "embed_tokens")) for n in switched)


def test_fp8_refuses_tensor_parallelism_with_the_key_and_the_fix():
    base = {"model": "m", "train_iters": 10, "data": {"train": ["synthetic"]}}
    assert TrainConfig.from_dict({**base, "precision": "fp8", "parallel": {"ep": 2}}).precision == "fp8"
    with pytest.raises(ConfigError, match=r"'precision'.*parallel.tp 2.*precision: bf16"):
        TrainConfig.from_dict({**base, "precision": "fp8", "parallel": {"tp": 2}})


@pytest.mark.slow
def test_fp8_training_follows_bf16_on_real_text(tmp_path, tokenizer_dir):
    """The tiny model (its kv_a projection is not FP8-shaped and stays bf16; everything else that can is FP8)
    trained on the shared text with precision fp8 and bf16 from the same seed and data."""
    build_tiny_data(tmp_path, tokenizer_dir)
    losses = {}
    for precision in ("bf16", "fp8"):
        out = tmp_path / precision
        proc = moonforge_train(CONFIGS / "tiny_pretrain.yaml", {
            "precision": precision, "train_iters": 30, "warmup_iters": 3, "eval_interval": None, "save_interval": None,
            "save_final": False, "tensorboard": False, "log_interval": 1, "output_dir": str(out)}, cwd=tmp_path)
        assert proc.returncode == 0, failure(proc)
        losses[precision] = [r["loss"] for r in train_records(read_metrics(out / "metrics.jsonl"))]
        if precision == "fp8":
            assert "fp8:" in proc.stderr + proc.stdout
    bf16, f8 = losses["bf16"], losses["fp8"]
    assert len(bf16) == len(f8) == 30
    assert f8[-1] < f8[0] - 0.5, f8  # it learns
    # Measured: within 0.15% at every step (the FP8 noise is far below the bf16 run's step-to-step noise).
    assert max(abs(a - b) / a for a, b in zip(bf16, f8)) < 0.005, (bf16, f8)
    assert bf16 != f8  # FP8 really computed something


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU with FP8 tensor cores"))])
def test_compiled_fp8_blocks_are_as_close_to_fp32_as_eager_fp8(device):
    from moonforge.model import build_model, compile_blocks

    # Every token to every expert: near-tied routing choices cannot flip between eager and compiled code.
    config = preset("tiny").replace(num_hidden_layers=3, n_routed_experts=4, num_experts_per_tok=4)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 61), device=device)  # 122 rows per expert: not 16-aligned
    results = {}
    runs = (("fp32", torch.float32, False, False), ("eager", torch.bfloat16, True, False),
            ("compiled", torch.bfloat16, True, True))
    for name, dtype, use_fp8, compiled in runs:
        model = build_model(config, device=device, dtype=dtype, seed=3)
        if use_fp8:
            assert enable_fp8(model)
        if compiled:
            compile_blocks(model)
        loss = model(ids, labels=ids)
        loss = loss if loss.ndim == 0 else loss.float().mean()
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    (loss_r, grads_r), (loss_e, grads_e), (loss_c, grads_c) = results["fp32"], results["eager"], results["compiled"]
    assert abs(loss_c - loss_r) <= 2 * abs(loss_e - loss_r) + 2e-3 * abs(loss_r)
    for name in grads_r:
        err_e, err_c = _rel(grads_e[name], grads_r[name]), _rel(grads_c[name], grads_r[name])
        assert err_c <= 1.5 * err_e + 1e-2, (name, err_c, err_e)


def _fp8_model(config, cache: bool, seed: int = 3, compiled: bool = False):
    from moonforge.model import build_model, compile_blocks

    model = build_model(config, dtype=torch.bfloat16, seed=seed)
    assert enable_fp8(model, cache_weights=cache)
    if compiled:
        compile_blocks(model)
    return model


def _two_micro_batches(model, ids):
    for part in ids:
        loss = model(part[None], labels=part[None])
        (loss if loss.ndim == 0 else loss.float().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_weights_cached_per_step_give_exactly_the_per_use_products_and_are_made_once(monkeypatch):
    config = preset("tiny").replace(num_hidden_layers=2)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    calls = []
    quantize_weight = fp8.quantize_weight
    monkeypatch.setattr(fp8, "quantize_weight", lambda w: calls.append(w.shape) or quantize_weight(w))
    per_use = _two_micro_batches(_fp8_model(config, cache=False), ids)
    assert not calls
    model = _fp8_model(config, cache=True)
    cached = _two_micro_batches(model, ids)
    switched = [m for m in model.modules() if getattr(m, "fp8", False)]
    # One quantisation of every FP8 weight (experts: two) for two micro-batches, forward and backward.
    assert len(calls) == sum(2 if isinstance(m, GroupedExperts) else 1 for m in switched)
    assert cached.keys() == per_use.keys()
    for name in cached:
        assert torch.equal(cached[name], per_use[name]), name
    # An in-place update (the optimizer's) makes them again; release_cached drops them all.
    calls.clear()
    with torch.no_grad():
        model.model.layers["0"].self_attn.o_proj.weight.mul_(2)
    _two_micro_batches(model, ids[:1])
    assert len(calls) == 1
    fp8.release_cached(model.modules())
    assert not any("_fp8_weights" in m.__dict__ for m in model.modules())
    with torch.no_grad():  # inference quantises per use and caches nothing
        model(ids[:1])
    assert not any("_fp8_weights" in m.__dict__ for m in model.modules())


def test_compiled_blocks_read_the_cached_weights_of_the_current_step():
    """The compiled graph takes the copies as inputs: after the weights change and the cache is released, it
    computes with the new ones (no stale constants) and compiles nothing new. Reference: eager, quantising per
    use."""
    from torch._dynamo.utils import counters

    config = preset("tiny").replace(num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=4)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    eager, compiled = _fp8_model(config, cache=False), _fp8_model(config, cache=True, compiled=True)
    results = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        steps = []
        for _ in range(2):
            steps.append(_two_micro_batches(model, ids))
            fp8.release_cached(model.modules())
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)  # a stale FP8 copy would be twice too large: far beyond the noise below
            model.zero_grad(set_to_none=True)
            if name == "compiled" and not steps[1:]:
                frames = counters["stats"]["unique_graphs"]
        results[name] = steps
    assert counters["stats"]["unique_graphs"] == frames  # the second step compiled nothing
    for step in range(2):  # all gradients as one vector: single small ones carry more bf16/FP8 noise
        ref = torch.cat([g.float().flatten() for g in results["eager"][step].values()])
        got = torch.cat([g.float().flatten() for g in results["compiled"][step].values()])
        assert _rel(got, ref) < 5e-2, step  # measured 0.022; stale copies: 0.42
    first, second = results["compiled"]
    assert not torch.equal(first["model.layers.0.self_attn.o_proj.weight"],
                           second["model.layers.0.self_attn.o_proj.weight"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU with FP8 tensor cores"))])
def test_fused_weight_quantisation_matches_the_eager_definition(device):
    # On a GPU the cached copies come from quantize_weight_fast; the CPU checks the same compiled function (the
    # trainer quantises eagerly there).
    fused = fp8.quantize_weight_fast if device == "cuda" else torch.compile(fp8.quantize_weight)
    for shape in ((384, 256), (4, 96, 64), (64, 48)):  # linears and a stack of experts: the sizes turn symbolic
        w = (torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 0.02).bfloat16().to(device)
        fast, ref = fused(w), fp8.quantize_weight(w)
        for got, want in zip(fast, ref):
            assert got.shape == want.shape and got.is_contiguous()
            # At most a rare rounding difference from a fused division (measured on the CPU: none).
            assert (got.float() != want.float()).float().mean() < 1e-3, shape
        assert torch.equal(fast.scale, ref.scale) and torch.equal(fast.scale_t, ref.scale_t)

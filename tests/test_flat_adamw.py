"""The single-device fused optimizer equals torch.optim.AdamW (with clipping), in place on flat buffers."""

import pytest
import torch

from moonforge.config import preset
from moonforge.model import build_model
from moonforge.train.flat_adamw import FlatAdamW
from moonforge.train.optim import is_no_decay


def _step(model, ids):
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    return loss.detach()


def _flat(model, accumulate=False, dtype=torch.float32):
    return FlatAdamW(list(model.named_parameters()), lr=1e-3, weight_decay=0.1, no_decay=is_no_decay,
                     compute_dtype=dtype, keep_fp32=lambda n: n.endswith("mlp.gate.weight"),
                     accumulate_fp32=accumulate)


def _reference(model):
    decay = [p for n, p in model.named_parameters() if not is_no_decay(n, p)]
    no_decay = [p for n, p in model.named_parameters() if is_no_decay(n, p)]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3,
                             betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)


def test_flat_adamw_matches_torch_adamw_with_clipping():
    config = preset("tiny")
    a, b = build_model(config, seed=0), build_model(config, seed=0)
    flat, ref = _flat(a), _reference(b)
    torch.manual_seed(0)
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 17))
        _step(a, ids)
        _step(b, ids)
        norm = flat.grad_norm_squared().sqrt()
        ref_norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        assert torch.allclose(norm.float(), ref_norm, rtol=1e-5)
        flat.clip_coef.copy_((0.5 / (norm + 1e-6)).clamp(max=1.0))
        flat.step()
        ref.step()
        flat.zero_grad()
        ref.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        # Per tensor: an element whose gradient nearly cancels may take Adam's other sign under another
        # summation order, so compare whole tensors, not elements.
        assert (p.float() - q).norm() <= 1e-5 * q.norm(), name
    assert a.model.layers["1"].mlp.gate.weight.dtype == torch.float32


def test_accumulating_micro_batches_in_fp32_and_bf16_parameters():
    config = preset("tiny")
    model = build_model(config, seed=0)
    flat = _flat(model, accumulate=True, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers["1"].mlp.gate.weight.dtype == torch.float32
    ids = torch.randint(0, config.vocab_size, (2, 17))
    _step(model, ids)
    _step(model, ids)
    grads = flat.gradients()
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    before = model.model.embed_tokens.weight.float().clone()
    flat.step()
    assert not torch.equal(before, model.model.embed_tokens.weight.float())
    # The bf16 parameters are the rounded fp32 master weights.
    master = flat.state[model.model.embed_tokens.weight]["master"]
    assert torch.equal(master.to(torch.bfloat16), model.model.embed_tokens.weight)


def test_micro_batch_gradients_summed_in_fp32_bit_for_bit(kernels):
    """Each micro-batch's bf16 gradients are upcast and added into the flat fp32 buffer, through the element-wise
    kernels as written and compiled: the same bits as summing a twin model's gradients by hand."""
    config = preset("tiny")
    model, twin = build_model(config, seed=0), build_model(config, seed=0)
    flat = _flat(model, accumulate=True, dtype=torch.bfloat16)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.data = p.detach().clone()  # the same dtypes: bf16, the router fp32
    totals = [torch.zeros(q.shape) for q in twin.parameters()]
    torch.manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 17))
        _step(model, ids)
        twin.zero_grad()
        _step(twin, ids)
        for total, q in zip(totals, twin.parameters()):
            total += q.grad.float()
    for (name, p), total in zip(model.named_parameters(), totals):
        assert torch.equal(flat.gradient(p), total), name


@pytest.mark.parametrize("accumulate", [False, True], ids=["bf16 gradients", "fp32 sums"])
def test_each_step_starts_from_fresh_gradients_without_zeroing_the_buffer(accumulate):
    """The step's first gradient is written over last step's values, later ones are added, and a parameter that
    got no gradient this step reads zero: the gradients equal a twin model's, step after step."""
    config = preset("tiny")
    model, twin = build_model(config, seed=0), build_model(config, seed=0)
    flat = _flat(model, accumulate=accumulate, dtype=torch.bfloat16)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.data = p.detach().clone()
    buffers = [g.grad for g in flat.groups_flat]
    torch.manual_seed(2)
    for step in range(3):
        totals = [torch.zeros(q.shape) for q in twin.parameters()]
        for _ in range(2 if accumulate else 1):
            ids = torch.randint(0, config.vocab_size, (2, 17))
            twin.zero_grad()
            for m in (model, twin):
                if step == 1:  # only the lm head gets a gradient: every other view still holds step 0's
                    (m.lm_head.weight.float() * ids[0, 0]).sum().backward()
                else:
                    _step(m, ids)
            for total, q in zip(totals, twin.parameters()):
                if q.grad is not None:
                    total += q.grad.float()
        assert all(p.grad is None for p in model.parameters())  # all of it landed in the flat buffers
        for (name, p), q, total in zip(model.named_parameters(), twin.parameters(), totals):
            got = flat.gradient(p)
            assert got.dtype == (torch.float32 if accumulate else p.dtype), name
            assert torch.equal(got.float(), total), (step, name)
        assert flat.gradient(model.model.embed_tokens.weight).abs().sum() == 0 or step != 1
        flat.zero_grad()
        assert all(a is g.grad for a, g in zip(buffers, flat.groups_flat))
        assert sum(b.abs().sum() for b in buffers) > 0  # last step's values stay until overwritten


def test_optimizer_and_model_are_freed_when_dropped():
    """The gradient hooks must not keep the optimizer (and with it every buffer) alive: a benchmark that runs
    transformers' model after moonforge's in one process ran out of GPU memory when they did."""
    import gc
    import weakref

    config = preset("tiny")
    model = build_model(config, seed=0)
    flat = _flat(model, accumulate=True, dtype=torch.bfloat16)
    _step(model, torch.randint(0, config.vocab_size, (2, 17)))
    flat.step()
    alive = [weakref.ref(flat), weakref.ref(flat.groups_flat[0].grad), weakref.ref(model)]
    del model, flat
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_state_dict_round_trip_keeps_flat_views():
    config = preset("tiny")
    model = build_model(config, seed=0)
    flat = _flat(model)
    ids = torch.randint(0, config.vocab_size, (2, 17))
    _step(model, ids)
    flat.step()
    saved = {k: v for k, v in flat.state_dict().items()}
    saved = {"state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                       for i, s in saved["state"].items()}, "param_groups": saved["param_groups"]}
    other = build_model(config, seed=1)
    flat2 = _flat(other)
    flat2.load_state_dict(saved)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    p0 = next(other.parameters())
    assert flat2.state[p0]["exp_avg"].data_ptr() >= flat2.groups_flat[0].exp_avg.data_ptr()


def test_sharded_adamw_matches_torch_adamw():
    from moonforge.train.adamw import AdamW

    config = preset("tiny")
    a, b = build_model(config, seed=0), build_model(config, seed=0)
    mine = AdamW(a.parameters(), lr=1e-3, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 17))
        _step(a, ids)
        _step(b, ids)
        mine.clip_coef.fill_(0.5)
        for p in b.parameters():
            p.grad.mul_(0.5)
        mine.step()
        ref.step()
        mine.zero_grad()
        ref.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        # Per tensor: an element whose gradient nearly cancels may take Adam's other sign under another
        # summation order, so compare whole tensors, not elements.
        assert (p.float() - q).norm() <= 1e-5 * q.norm(), name


# ---------------------------------------------------------------------- host-offloaded state
def test_fp32_split_into_bf16_and_int16_is_exact():
    from moonforge.train.flat_adamw import join_fp32, split_fp32

    x = torch.randn(100_000) * torch.logspace(-38, 38, 100_000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3e38, -3e38, 1.00390625, -1.00390625])])
    hi, lo = split_fp32(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16
    assert torch.equal(join_fp32(hi, lo).view(torch.int32), x.view(torch.int32))
    # The upper half is the nearest bf16 (no worse than torch's round-to-nearest-even, which differs at ties only).
    assert ((hi.float() - x).abs() <= (x.to(torch.bfloat16).float() - x).abs()).all()


def _same_gradients(source, target, source_opt, target_opt) -> None:
    """Give ``target``'s parameters the gradients of ``source``'s (views of the flat gradient buffers)."""
    for p, q in zip(source.parameters(), target.parameters()):
        target_opt.gradient(q).copy_(source_opt.gradient(p))


def _compare_masters(plain, offloaded, a, b) -> int:
    """Offloaded master weights (bf16 parameter + int16 lower half) against the plain optimizer's fp32 ones, bit
    for bit; returns how many tensors were offloaded."""
    from moonforge.train.flat_adamw import join_fp32, split_fp32

    on_host = 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        mine, theirs = plain.state[p], offloaded.state[q]
        if "master_low" in theirs:
            on_host += 1
            low = theirs["master_low"].to(q.device)
            assert torch.equal(join_fp32(q.detach(), low), mine["master"]), name
            assert torch.equal(q.detach(), split_fp32(mine["master"])[0]), name  # rounded to nearest
        else:
            assert torch.equal(theirs["master"], mine["master"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(theirs[key].to(p.device), mine[key]), (name, key)
    return on_host


def test_offloaded_state_gives_the_same_master_weights(monkeypatch):
    import moonforge.train.flat_adamw as fa

    monkeypatch.setattr(fa, "CHUNK", 1000)  # several streamed chunks per group
    config = preset("tiny")
    a, b = build_model(config, seed=0), build_model(config, seed=0)
    kw = dict(lr=1e-3, weight_decay=0.1, no_decay=is_no_decay, compute_dtype=torch.bfloat16,
              keep_fp32=lambda n: n.endswith("mlp.gate.weight"), moment_dtype=torch.bfloat16)
    plain = FlatAdamW(list(a.named_parameters()), **kw)
    offloaded = FlatAdamW(list(b.named_parameters()), offload=0.6, **kw)
    assert any(g.offloaded for g in offloaded.groups_flat) and not all(g.offloaded for g in offloaded.groups_flat)
    torch.manual_seed(0)
    for _ in range(4):
        _step(a, torch.randint(0, config.vocab_size, (2, 17)))
        _same_gradients(a, b, plain, offloaded)
        for opt in (plain, offloaded):
            opt.clip_coef.copy_((0.5 / (opt.grad_norm_squared().sqrt() + 1e-6)).clamp(max=1.0))
            opt.step()
            opt.zero_grad()
    assert _compare_masters(plain, offloaded, a, b) > 0


def test_offloaded_state_round_trips_and_refuses_the_other_layout():
    config = preset("tiny")
    kw = dict(lr=1e-3, compute_dtype=torch.bfloat16, accumulate_fp32=False)
    model = build_model(config, seed=0)
    opt = FlatAdamW(list(model.named_parameters()), offload=1.0, **kw)
    _step(model, torch.randint(0, config.vocab_size, (2, 17)))
    opt.step()
    saved = opt.state_dict()
    saved = {"state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                       for i, s in saved["state"].items()}, "param_groups": saved["param_groups"]}
    other = build_model(config, seed=1)
    with torch.no_grad():  # the model's own state (bf16 parameters) is restored by the model checkpoint
        for p, q in zip(model.parameters(), other.parameters()):
            q.copy_(p)
    opt2 = FlatAdamW(list(other.named_parameters()), offload=1.0, **kw)
    opt2.load_state_dict(saved)
    for p, q in zip(model.parameters(), other.parameters()):
        for key in opt.state[p]:
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(opt2.state[q][key])), key
    opt3 = FlatAdamW(list(build_model(config, seed=2).named_parameters()), **kw)
    try:
        opt3.load_state_dict(saved)
    except ValueError as e:
        assert "optimizer_offload" in str(e) and "master" in str(e)
    else:
        raise AssertionError("a checkpoint without fp32 master weights was accepted")


def test_offload_refuses_state_larger_than_host_memory(monkeypatch):
    import moonforge.train.flat_adamw as fa

    monkeypatch.setattr(fa, "_available_host_memory", lambda: 1000)
    model = build_model(preset("tiny"), seed=0)
    try:
        FlatAdamW(list(model.named_parameters()), lr=1e-3, compute_dtype=torch.bfloat16, offload=1.0)
    except MemoryError as e:
        assert "optimizer_state_dtype: bf16" in str(e)
    else:
        raise AssertionError("expected MemoryError")


def test_streamed_offload_on_a_gpu_matches_the_plain_optimizer():
    """Copy streams, staging slots and compiled kernels: the CUDA path of the host offload (skipped on CPUs)."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import moonforge.train.flat_adamw as fa
    from moonforge.train.flat_adamw import join_fp32

    saved_chunk, fa.CHUNK = fa.CHUNK, 4096  # many chunks, both slots reused
    try:
        config = preset("tiny")
        a, b = build_model(config, seed=0, device="cuda"), build_model(config, seed=0, device="cuda")
        kw = dict(lr=1e-3, weight_decay=0.1, compute_dtype=torch.bfloat16,
                  keep_fp32=lambda n: n.endswith("mlp.gate.weight"), moment_dtype=torch.bfloat16)
        plain = FlatAdamW(list(a.named_parameters()), **kw)
        offloaded = FlatAdamW(list(b.named_parameters()), offload=1.0, **kw)
        assert all(g.exp_avg.device.type == "cpu" for g in offloaded.groups_flat if g.offloaded)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(3):
            _step(a, torch.randint(0, config.vocab_size, (2, 33), device="cuda", generator=gen))
            _same_gradients(a, b, plain, offloaded)
            for opt in (plain, offloaded):
                opt.step()
                opt.zero_grad()
        torch.cuda.synchronize()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            theirs = offloaded.state[q]
            master = join_fp32(q.detach(), theirs["master_low"].cuda()) if "master_low" in theirs \
                else theirs["master"]
            ref = plain.state[p]["master"]
            # Two compiled kernels may contract multiply-adds differently: the last bit, not more.
            assert (master - ref).norm() <= 1e-6 * ref.norm(), name
    finally:
        fa.CHUNK = saved_chunk

"""The single-device fused optimizer equals torch.optim.AdamW (with clipping), in place on flat buffers."""

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
    grads = [g.grad for g in flat.groups_flat]
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    before = model.model.embed_tokens.weight.float().clone()
    flat.step()
    assert not torch.equal(before, model.model.embed_tokens.weight.float())
    # The bf16 parameters are the rounded fp32 master weights.
    master = flat.state[model.model.embed_tokens.weight]["master"]
    assert torch.equal(master.to(torch.bfloat16), model.model.embed_tokens.weight)


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

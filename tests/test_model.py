"""Model unit tests: gradients, routing details, load balancing and the sequence-wise auxiliary loss."""

import math

import pytest

import torch

from moonforge.config import preset
from moonforge.model import (IGNORE_INDEX, MoE, Router, build_model, cross_entropy_sum, positions_from_documents,
                             seq_aux_loss)
from moonforge.train.balance import apply_expert_bias, collect_expert_counts

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def test_every_parameter_gets_a_gradient():
    config = preset("tiny")
    model = build_model(config, seed=0)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.aux_loss_coeff = 0.01
    ids = torch.randint(0, config.vocab_size, (2, 32))
    loss = cross_entropy_sum(model(ids)[:, :-1], ids[:, 1:])
    loss.backward()
    names = [n for n, p in model.named_parameters()]
    assert "model.layers.1.mlp.gate.weight" in names
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_router_bias_selects_but_does_not_weight():
    config = preset("tiny")
    router = Router(config)
    torch.manual_seed(0)
    router.reset_parameters(0.02)
    x = torch.randn(5, config.hidden_size)
    w0, i0, scores = router(x)
    # A huge bias on expert 7 forces it into every token's top-k, but its weight is from the unbiased score.
    router.e_score_correction_bias[7] = 100.0
    w1, i1, _ = router(x)
    assert (i1 == 7).any(dim=1).all()
    pos = (i1 == 7).nonzero()
    for t, k in pos.tolist():
        chosen = scores[t, i1[t]]
        assert math.isclose(w1[t, k].item(), (scores[t, 7] / chosen.sum() * config.routed_scaling_factor).item(),
                            rel_tol=1e-6)


def test_tokens_per_expert_counts_every_routed_slot():
    config = preset("tiny")
    model = build_model(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (3, 10))
    model(ids)
    for router in model.routers().values():
        assert router.tokens_per_expert.sum().item() == 3 * 10 * config.num_experts_per_tok


def test_bias_update_matches_hand_computation():
    config = preset("tiny").replace(n_routed_experts=4, num_experts_per_tok=2)
    router = Router(config)
    router.reset_parameters(0.02)
    router.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))
    # mean load 5: e = [-5, 3, 1, 1], sign = [-1, 1, 1, 1], mean sign 0.5 -> delta = u * [-1.5, .5, .5, .5]
    counts = collect_expert_counts({1: router})
    apply_expert_bias({1: router}, counts, rate=0.001)
    assert torch.equal(counts[0], torch.tensor([10.0, 2.0, 4.0, 4.0]))
    assert torch.allclose(router.e_score_correction_bias, torch.tensor([-0.0015, 0.0005, 0.0005, 0.0005]))
    assert router.tokens_per_expert.sum() == 0
    # Rate 0 freezes the bias.
    router.tokens_per_expert.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    apply_expert_bias({1: router}, collect_expert_counts({1: router}), rate=0.0)
    assert torch.allclose(router.e_score_correction_bias, torch.tensor([-0.0015, 0.0005, 0.0005, 0.0005]))


def test_seq_aux_loss_matches_hand_computation():
    # One sequence of 2 tokens, 4 experts, top-2.
    scores = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]])
    indices = torch.tensor([[[0, 1], [3, 2]]])
    # Both tokens' scores already sum to 1, so the normalised scores are the scores.
    p = torch.tensor([(0.5 + 0.1) / 2, (0.5 + 0.2) / 2, (0.0 + 0.3) / 2, (0.0 + 0.4) / 2])
    f = torch.tensor([1.0, 1.0, 1.0, 1.0]) * 4 / (2 * 2)
    assert torch.allclose(seq_aux_loss(scores, indices, 4, 2), (f * p).sum())
    # Sequences are summed, not averaged: two copies give twice the loss.
    assert torch.allclose(seq_aux_loss(scores.repeat(2, 1, 1), indices.repeat(2, 1, 1), 4, 2), 2 * (f * p).sum())


def test_aux_loss_gradient_reaches_router():
    config = preset("tiny")
    model = build_model(config, seed=0)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.aux_loss_coeff = 1.0
    ids = torch.randint(0, config.vocab_size, (2, 16))
    (model(ids).sum() * 0).backward()  # only the auxiliary loss drives gradients
    router = model.routers()[1]
    assert router.weight.grad.abs().sum() > 0


def test_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_documents(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_cross_entropy_ignores_masked_tokens():
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[1, IGNORE_INDEX, 3, IGNORE_INDEX]])
    want = torch.nn.functional.cross_entropy(logits[0, [0, 2]], labels[0, [0, 2]], reduction="sum")
    assert torch.allclose(cross_entropy_sum(logits, labels, chunk_tokens=3), want)


def test_fused_linear_cross_entropy_matches_autograd():
    from moonforge.model import linear_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = IGNORE_INDEX
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    fused = linear_cross_entropy_sum(h, w, labels, chunk_tokens=8)
    want = cross_entropy_sum(h2 @ w2.t(), labels)
    (fused * 3.0).backward()
    (want * 3.0).backward()
    assert torch.allclose(fused, want, rtol=1e-6)
    assert torch.allclose(h.grad, h2.grad, atol=1e-6)
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_head_weight_gradient_sums_products_in_fp32(device):
    """The lm head's weight gradient, summed over chunks of tokens in fp32. On a GPU each bf16 product is added
    in the GEMM's epilogue without being rounded to bf16 first: within fp32 rounding of the exact sum, far
    closer than the bf16 rounding (~4e-3) of the fallback path."""
    from moonforge.model import _add_product_fp32

    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(96, 64, generator=g).bfloat16().to(device),
              torch.randn(64, 80, generator=g).bfloat16().to(device)) for _ in range(3)]
    total = None
    for a, b in pairs:
        total = _add_product_fp32(total, a, b)
    exact = sum(a.double() @ b.double() for a, b in pairs)
    assert total.dtype == torch.float32
    error = ((total.double() - exact).norm() / exact.norm()).item()
    assert error < (1e-6 if device == "cuda" else 1e-2), error


@pytest.mark.parametrize("chunk", [16, 128])  # several chunks (summed in fp32), one chunk
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fused_linear_cross_entropy_in_bf16_matches_fp32_autograd(device, chunk):
    """bf16 hidden states and head (on a GPU: several chunks' products added in fp32 in the GEMM): loss and both
    gradients, in the inputs' dtypes, within bf16 rounding of fp32 autograd. The incoming gradient scales them
    in fp32: exactly the unscaled gradients times the factor, rounded once."""
    from moonforge.model import linear_cross_entropy_sum

    g = torch.Generator().manual_seed(2)
    h0 = torch.randn(70, 32, generator=g).bfloat16().to(device)
    w0 = (torch.randn(300, 32, generator=g) / 4).bfloat16().to(device)
    labels = torch.randint(0, 300, (70,), generator=g).to(device)
    labels[::7] = IGNORE_INDEX

    def grads(factor):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy_sum(h, w, labels, chunk_tokens=chunk)
        (loss * factor).backward()
        return loss, h.grad, w.grad

    fused, h_grad, w_grad = grads(0.5)
    h32, w32 = h0.float().requires_grad_(), w0.float().requires_grad_()
    want = cross_entropy_sum(h32 @ w32.t(), labels)
    (want * 0.5).backward()
    assert h_grad.dtype == w_grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused, want, rtol=2e-2, atol=0)
    for ours, ref in ((h_grad, h32.grad), (w_grad, w32.grad)):
        assert ((ours.float() - ref).norm() / ref.norm()).item() < 2e-2

    factor = 1 / 3000.7  # not a bf16 number
    _, h_unit, w_unit = grads(1.0)
    _, h_scaled, w_scaled = grads(factor)
    if chunk == 128:  # one chunk: the unit gradients are the rounded products themselves
        assert torch.equal(h_scaled, (h_unit.float() * factor).bfloat16())
        assert torch.equal(w_scaled, (w_unit.float() * factor).bfloat16())
    else:  # the fp32 sum is rounded only after scaling
        assert torch.equal(h_scaled, (h_unit.float() * factor).bfloat16())
        assert ((w_scaled.float() - w_unit.float() * factor).norm() / (w_unit.float() * factor).norm()) < 1e-2


def test_model_loss_from_labels_equals_loss_of_logits():
    config = preset("tiny")
    model = build_model(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    with torch.no_grad():
        assert torch.allclose(model(ids, labels=labels), cross_entropy_sum(model(ids), labels), rtol=1e-6)


def test_attention_mask_is_built_once_per_forward_even_when_fsdp_recreates_it():
    # FSDP hands every block a re-created copy of its arguments (dataclasses.replace for dataclasses): the
    # derived mask must still be built once per forward, not once per block.
    import moonforge.model as m
    from torch.distributed.utils import _apply_to_tensors

    config = preset("tiny").replace(num_hidden_layers=3)
    model = build_model(config)
    for block in model.model.layers.values():
        block.register_forward_pre_hook(lambda mod, args: _apply_to_tensors(lambda t: t, args))
    seen = []
    real = m.attention

    def spy(q, k, v, mask, scale):
        seen.append(id(mask.dense(q.shape[1], k.shape[1], q.device)))
        return real(q, k, v, mask, scale)

    m.attention = spy
    try:
        ids = torch.randint(0, config.vocab_size, (2, 16))
        docs = torch.tensor([[0] * 9 + [1] * 7, [0] * 4 + [1] * 12])
        model(ids, document_ids=docs)
    finally:
        m.attention = real
    assert len(seen) == 3 and len(set(seen)) == 1


def test_recomputation_does_not_count_routing_twice():
    from moonforge.parallel.checkpointing import apply_activation_checkpointing

    config = preset("tiny")
    ids = torch.randint(0, config.vocab_size, (2, 12))
    counts = {}
    for mode in ("none", "full", "sel", "offload"):
        model = build_model(config, seed=5)
        apply_activation_checkpointing(model, mode)
        model(ids, labels=ids).backward()
        counts[mode] = torch.stack([m.tokens_per_expert for m in model.modules() if isinstance(m, Router)])
    assert counts["none"].sum() == 2 * 12 * config.num_experts_per_tok * len(counts["none"])
    for mode in ("full", "sel", "offload"):
        assert torch.equal(counts[mode], counts["none"]), mode


def _values_and_grads(fns, inputs, probe) -> list[list[torch.Tensor]]:
    """For each function: its output on fresh leaf copies of ``inputs``, then their gradients of
    ``(output * probe).sum()``."""
    results = []
    for fn in fns:
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        (out.float() * probe).sum().backward()
        results.append([out] + [t.grad for t in leaves])
    return results


@pytest.mark.parametrize("compiled", [False, True])
def test_expert_rows_and_combine_match_the_scattering_formulation(compiled):
    """The gathering permute and combine (with their own backward) give the indexing formulation's values and
    gradients: rows ``x[order // k]``, and the weighted sum of the rows scattered back into token order."""
    from moonforge.model import combine, expert_rows, sort_by_expert

    g = torch.Generator().manual_seed(3)
    n_tokens, top_k, hidden, n_experts = 37, 3, 16, 5
    x = torch.randn(n_tokens, hidden, generator=g).bfloat16()
    indices = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, top_k, generator=g)
    order, _ = sort_by_expert(indices, n_experts)
    probe = torch.randn(n_tokens, hidden, generator=g)

    def ours(x, w):
        rows = expert_rows(x, order, top_k)
        return combine(rows, order, w)

    def reference(x, w):
        rows = x[order // top_k]
        unsorted = torch.empty_like(rows).index_copy_(0, order, rows)
        return (unsorted.view(n_tokens, top_k, -1).float() * w[..., None]).sum(dim=1).to(rows.dtype)

    (out, dx, dw), (ref_out, ref_dx, ref_dw) = _values_and_grads(
        (torch.compile(ours) if compiled else ours, reference), (x, weights), probe)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(dx.float(), ref_dx.float(), rtol=1e-2, atol=1e-2)  # k bf16 terms: summed in fp32
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_rows_after_routed_count_as_zeros_whatever_they_hold(compiled):
    """The all-gather dispatcher's static shapes: slots sorted after ``routed`` (experts on other ranks) are left
    unwritten by the grouped GEMM. Filled with NaN here, they still contribute nothing to the output, their
    weights get zero gradient, and their rows' gradients (NaN too) do not reach x: the same as computing only the
    routed rows and padding with zeros."""
    from moonforge.model import combine, expert_rows, sort_by_expert

    g = torch.Generator().manual_seed(4)
    n_tokens, top_k, hidden, local = 29, 3, 16, 2
    x = torch.randn(n_tokens, hidden, generator=g).bfloat16()
    key = torch.stack([torch.randperm(5, generator=g)[:top_k] for _ in range(n_tokens)]).clamp(max=local)
    weights = torch.rand(n_tokens, top_k, generator=g)
    order, counts = sort_by_expert(key, local + 1)
    routed = key.numel() - counts[-1]
    n = int(routed)
    scale = torch.randn(hidden, generator=g).bfloat16()
    probe = torch.randn(n_tokens, hidden, generator=g)

    class Poisoned(torch.autograd.Function):  # an expert computation that leaves the unrouted rows as NaN
        @staticmethod
        def forward(ctx, rows):
            out = rows * scale
            out[n:] = float("nan")
            return out

        @staticmethod
        def backward(ctx, grad):
            d = grad * scale
            d[n:] = float("nan")
            return d

    def ours(x, w):
        return combine(Poisoned.apply(expert_rows(x, order, top_k, routed)), order, w, routed)

    def reference(x, w):
        h = x[order[:n] // top_k] * scale
        h = torch.cat([h, h.new_zeros(key.numel() - n, hidden)])
        return combine(h, order, w)

    (out, dx, dw), (ref_out, ref_dx, ref_dw) = _values_and_grads(
        (torch.compile(ours) if compiled else ours, reference), (x, weights), probe)
    assert 0 < n < key.numel() and not out.isnan().any()
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(dx.float(), ref_dx.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)
    elsewhere = (key == local)
    assert (dw[elsewhere] == 0).all() and (dw[~elsewhere] != 0).all()


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a GPU with FP8 tensor cores"))])
def test_static_rows_match_computing_the_routed_rows_alone(device, use_fp8):
    """The all-gather dispatcher's experts, end to end: every slot carried through the grouped GEMMs, which stop
    at the local experts' last row (the rows after it are left unwritten by the library kernel, on CPU and
    GPU alike), against computing the routed rows alone and padding with zeros. Values and all gradients."""
    from moonforge.model import combine, expert_ffn, expert_rows, sort_by_expert

    g = torch.Generator().manual_seed(6)
    n_tokens, top_k, hidden, inter, local = 96, 3, 64, 32, 3
    x = torch.randn(n_tokens, hidden, generator=g).bfloat16().to(device)
    key = torch.stack([torch.randperm(2 * local, generator=g)[:top_k] for _ in range(n_tokens)])
    key = key.clamp(max=local).to(device)  # experts 0..local-1 here; ``local`` = on another rank
    weights = torch.rand(n_tokens, top_k, generator=g).to(device)
    gate_up = (torch.randn(local, 2, inter, hidden, generator=g) * hidden ** -0.5).to(device)
    down = (torch.randn(local, hidden, inter, generator=g) * inter ** -0.5).to(device)
    probe = torch.randn(n_tokens, hidden, generator=g).to(device)
    order, counts = sort_by_expert(key, local + 1)
    routed = key.numel() - counts[-1]
    n = int(routed)

    def static(x, w, gu, d):
        rows = expert_rows(x, order, top_k, routed)
        h = expert_ffn(rows, gu, d, counts[:-1], fp8=use_fp8, rows_again=lambda: x.detach()[order // top_k])
        return combine(h, order, w, routed)

    def compact(x, w, gu, d):
        h = expert_ffn(x[order[:n] // top_k], gu, d, counts[:-1], fp8=use_fp8)
        return combine(torch.cat([h, h.new_zeros(key.numel() - n, hidden)]), order, w)

    results = _values_and_grads((static, compact), (x, weights, gate_up, down), probe)
    assert 0 < n < key.numel()
    for ours, ref, name in zip(*results, ("out", "x", "weights", "gate_up", "down")):
        assert torch.isfinite(ours).all(), name
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=name)


# ---------------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("room", [None, 4, 2], ids=["growing", "preallocated", "outgrown"])
def test_kv_cache_gives_the_logits_of_whole_sequences(room):
    """Left-padded prompts of different lengths fill a cache; tokens fed one at a time (a row dropped on the way)
    get the logits a forward over each whole unpadded sequence gives. The cache grows by concatenation, fills
    buffers allocated for prompt + new tokens, or outgrows them."""
    from moonforge.model import KVCache, left_padded

    config = preset("tiny")
    model = build_model(config, seed=4).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (6, 11, 3)]
    tokens, documents = left_padded(rows, pad_id=7)
    width = tokens.shape[1]
    assert tokens[2, :width - 3].eq(7).all() and documents.sum(1).tolist() == [6, 11, 3]

    def check(logits, active):
        for got, i in zip(logits, active):
            want = model(torch.tensor([rows[i]]))[0, -1]
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (i, (got - want).abs().max())

    with torch.no_grad():
        cache = KVCache(capacity=None if room is None else width + room)
        logits = model(tokens, document_ids=documents, cache=cache)[:, -1]
        active = [0, 1, 2]
        check(logits, active)
        for step in range(4):
            if step == 2:
                cache.keep([0, 2])  # row 1 finished
                active = [0, 2]
            new = torch.randint(0, config.vocab_size, (len(active), 1), generator=gen)
            for i, t in zip(active, new[:, 0].tolist()):
                rows[i].append(t)
            positions = torch.tensor([[len(rows[i]) - 1] for i in active])
            logits = model(new, position_ids=positions, document_ids=torch.ones_like(new), cache=cache)[:, -1]
            check(logits, active)
        layer = cache.layers["0"]
        assert cache.length == layer.length == width + 4 and layer.k.shape[0] == 2
        assert layer.k.shape[1] == (width + 4 if room in (None, 2) else width + room)
    with pytest.raises(ValueError, match="torch.no_grad"):
        model(tokens, cache=KVCache())

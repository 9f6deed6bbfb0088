"""Muon, single process: the update against a direct transcription of the paper, parameter grouping, validation."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from moonforge.config import ConfigError, preset
from moonforge.model import Transformer, build_model, cross_entropy_sum
from moonforge.train.muon import Muon, muon_param_groups, newton_schulz, update_scale

LR, WD, MU = 0.02, 0.1, 0.95
BETA1, BETA2, EPS = 0.9, 0.95, 1e-8


# ---------------------------------------------------------------------------------------------------- transcription
def paper_zeropower(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Moonlight's Newton-Schulz (paper, toy_train.py) for ONE matrix, in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    if g.size(0) > g.size(1):
        x = x.T
    return x


def paper_matrices(name: str, t: torch.Tensor) -> list[torch.Tensor]:
    """The separate weight matrices inside a parameter: one per expert projection (gate, up, down apart)."""
    if name.endswith("experts.gate_up_proj"):
        return [t[e, j] for e in range(t.shape[0]) for j in range(2)]
    if name.endswith("experts.down_proj"):
        return [t[e] for e in range(t.shape[0])]
    return [t]


class PaperReference:
    """Moonlight's rule written out parameter by parameter and matrix by matrix (no batching, no buckets).

    Muon for every >= 2-D parameter except embeddings and lm_head; AdamW (torch's bias correction) otherwise;
    both with the same lr and decoupled weight decay.
    """

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = {n: p.detach().clone() for n, p in params.items()}
        self.state = {n: {} for n in params}

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            g, st = grads[name], self.state[name]
            if p.ndim >= 2 and "embed_tokens" not in name and not name.startswith("lm_head"):
                m = st["m"] = MU * st.get("m", torch.zeros_like(p)) + g
                u = g + MU * m
                for w, mat in zip(paper_matrices(name, p), paper_matrices(name, u)):
                    o = paper_zeropower(mat)
                    rows, cols = w.shape
                    w.mul_(1 - LR * WD)
                    w.sub_(LR * 0.2 * math.sqrt(max(rows, cols)) * o)
            else:
                t = st["t"] = st.get("t", 0) + 1
                m = st["m"] = BETA1 * st.get("m", torch.zeros_like(p)) + (1 - BETA1) * g
                v = st["v"] = BETA2 * st.get("v", torch.zeros_like(p)) + (1 - BETA2) * g * g
                m_hat, v_hat = m / (1 - BETA1 ** t), v / (1 - BETA2 ** t)
                p.mul_(1 - LR * WD)
                p.sub_(LR * m_hat / (v_hat.sqrt() + EPS))


def random_grads(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(p.shape, generator=gen) * (0.5 + step) for n, p in model.named_parameters()}


def assert_params_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float) -> None:
    for name, r in ref.items():
        err = (got[name].float() - r.float()).abs().max().item()
        assert err <= rel * r.abs().max().item(), f"{name}: max error {err:.3g} vs scale {r.abs().max().item():.3g}"


def test_updates_equal_the_papers_rule_in_fp32():
    model = build_model(preset("tiny"), seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = PaperReference(start)
    opt = Muon(muon_param_groups(model, lr=LR, weight_decay=WD), lr=LR, ns_dtype=torch.float32)
    for step in range(3):
        grads = random_grads(model, step)
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        reference.step(grads)
        got = {n: p.detach() for n, p in model.named_parameters()}
        assert_params_close(got, reference.params, rel=1e-5)
    moved = max((got[n] - start[n]).abs().max().item() / start[n].abs().max().item() for n in start)
    assert moved > 0.1  # the comparison is far from trivial: parameters moved by 10% of their scale or more


def test_bf16_newton_schulz_is_close_to_fp32_and_nearly_orthogonal():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 48, 80, generator=gen)
    exact = newton_schulz(m, dtype=torch.float32)
    fast = newton_schulz(m)
    assert fast.dtype == torch.bfloat16
    rel = (fast.float() - exact).norm() / exact.norm()
    assert rel < 0.02, rel
    sv = torch.linalg.svdvals(fast.float())
    # Muon's coefficients trade exactness for speed: singular values end up around 0.7 to 1.2, not at 1.
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
    tall = newton_schulz(m.mT, dtype=torch.float32)
    torch.testing.assert_close(tall, exact.mT, rtol=1e-5, atol=1e-6)


def test_scale_factors_match_the_paper_for_moonlight_shapes():
    with torch.device("meta"):
        model = Transformer(preset("moonlight-16b-a3b"))
    groups = muon_param_groups(model, lr=1e-3, weight_decay=0.1)
    scales = {n.split(".", 3)[-1]: round(update_scale(p.shape), 2)
              for g in groups if g["use_muon"] for n, p in zip(g["param_names"], g["params"])}
    # Paper table (moonlight.md §4.2): experts count per expert matrix and gate/up apart, 9.05 not 10.61.
    assert scales["self_attn.q_proj.weight"] == 11.09
    assert scales["self_attn.kv_a_proj_with_mqa.weight"] == 9.05
    assert scales["self_attn.kv_b_proj.weight"] == 12.8
    assert scales["self_attn.o_proj.weight"] == 9.05
    assert scales["mlp.gate_proj.weight"] == 21.23
    assert scales["mlp.experts.gate_up_proj"] == 9.05
    assert scales["mlp.experts.down_proj"] == 9.05
    assert scales["mlp.shared_experts.up_proj.weight"] == 10.61
    assert scales["mlp.gate.weight"] == 9.05


def _names(groups, use_muon: bool, wd: float | None = None) -> set[str]:
    return {n for g in groups if g["use_muon"] == use_muon and (wd is None or g["weight_decay"] == wd)
            for n in g["param_names"]}


def test_param_groups_follow_the_recipe():
    model = build_model(preset("tiny"), seed=0)
    all_names = {n for n, _ in model.named_parameters()}
    groups = muon_param_groups(model, lr=LR, weight_decay=WD)
    muon, adamw = _names(groups, True), _names(groups, False)
    assert muon | adamw == all_names and not muon & adamw
    assert adamw == {n for n, p in model.named_parameters() if p.ndim == 1} | {"model.embed_tokens.weight",
                                                                             "lm_head.weight"}
    assert "model.layers.1.mlp.gate.weight" in muon and "model.layers.1.mlp.experts.gate_up_proj" in muon
    assert all(g["weight_decay"] == WD and g["lr"] == LR for g in groups)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in groups if not g["use_muon"])

    routers = {n for n in all_names if n.endswith("mlp.gate.weight")}
    groups = muon_param_groups(model, lr=LR, weight_decay=WD, router_optimizer="adamw", norm_weight_decay=False)
    assert routers and routers <= _names(groups, False, wd=WD) and not routers & _names(groups, True)
    assert _names(groups, False, wd=0.0) == {n for n in all_names if n.endswith("norm.weight")}

    with pytest.raises(ConfigError, match="router_optimizer"):
        muon_param_groups(model, lr=LR, weight_decay=WD, router_optimizer="sgd")


class PrefixedParams(torch.nn.Module):
    """Parameters of several model parts under wrapper prefixes, as a trainer may hand them over."""

    def __init__(self, named):
        super().__init__()
        self.named = named

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        yield from self.named


def test_param_groups_work_from_names_alone():
    model = build_model(preset("tiny"), seed=0)
    wrapped = PrefixedParams([(n.replace("layers.1.", "layers.1._checkpoint_wrapped_module."), p)
                              for n, p in model.named_parameters()])
    direct = muon_param_groups(model, lr=LR, weight_decay=WD, router_optimizer="adamw")
    by_name = muon_param_groups(wrapped, lr=LR, weight_decay=WD, router_optimizer="adamw")
    assert [[id(p) for p in g["params"]] for g in direct] == [[id(p) for p in g["params"]] for g in by_name]
    assert "model.layers.1._checkpoint_wrapped_module.mlp.gate.weight" in _names(by_name, False)


def test_param_groups_with_biases_and_tied_embeddings():
    config = dataclasses.replace(preset("tiny"), attention_bias=True, tie_word_embeddings=True, q_lora_rank=16)
    model = build_model(config, seed=0)
    groups = muon_param_groups(model, lr=LR, weight_decay=WD, norm_weight_decay=False)
    no_decay = _names(groups, False, wd=0.0)
    assert "model.layers.0.self_attn.o_proj.bias" in no_decay and "model.layers.0.self_attn.q_a_layernorm.weight" \
        in no_decay
    assert "model.layers.0.self_attn.q_a_proj.weight" in _names(groups, True)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # the tied weight once


def test_invalid_groups_are_rejected_with_the_parameter_named():
    model = build_model(preset("tiny"), seed=0)
    with pytest.raises(ConfigError, match="use_muon"):
        Muon(model.parameters(), lr=LR)
    norm = model.model.norm.weight
    with pytest.raises(ConfigError, match="model.norm.weight"):
        Muon([{"params": [norm], "param_names": ["model.norm.weight"], "use_muon": True}], lr=LR)
    with pytest.raises(ConfigError, match="distributed_mode"):
        Muon(muon_param_groups(model, lr=LR, weight_decay=WD), lr=LR, distributed_mode="zero")


def _train(model, opt, steps, start=0):
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, model.config.vocab_size, (8, 2, 17), generator=gen)
    for step in range(start, start + steps):
        opt.zero_grad()
        tokens = data[step]
        loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        opt.step()
    return loss.item()


def test_state_dict_round_trip_continues_identically():
    model = build_model(preset("tiny"), seed=0)
    opt = Muon(muon_param_groups(model, lr=LR, weight_decay=WD), lr=LR)
    _train(model, opt, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    kinds = {k for s in saved_opt["state"].values() for k in s}
    assert kinds == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    _train(model, opt, 2, start=2)

    resumed = build_model(preset("tiny"), seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = Muon(muon_param_groups(resumed, lr=1.0, weight_decay=0.0), lr=1.0)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == LR
    _train(resumed, opt2, 2, start=2)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_zero_gradient_step_at_zero_lr_changes_nothing():
    # torch.distributed.checkpoint initialises optimizer state this way before loading into it.
    model = build_model(preset("tiny"), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Muon(muon_param_groups(model, lr=0.0, weight_decay=WD), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_loss_goes_down():
    torch.manual_seed(0)
    model = build_model(preset("tiny"), seed=0)
    opt = Muon(muon_param_groups(model, lr=3e-3, weight_decay=0.1), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

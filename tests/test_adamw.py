"""moonforge's sharding-aware AdamW (moonforge.train.adamw) equals torch.optim.AdamW, with the learning rate
changing from step to step and clipping folded into the update."""

from __future__ import annotations

import pytest
import torch

from moonforge.train.adamw import AdamW

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,compile,state_dtype", [(d, None, torch.float32) for d in DEVICES]
                         + [("cpu", True, torch.float32), ("cpu", True, torch.bfloat16)])
def test_adamw_matches_torch(device, compile, state_dtype):
    """Eager on the CPU, compiled (one call per group) on GPUs or when asked; bf16 moments within their rounding."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    ours = [torch.nn.Parameter(t.clone().to(device)) for t in start]
    ref = [torch.nn.Parameter(t.clone().double()) for t in start]
    kw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW([{"params": ours[:2]}, {"params": ours[2:], "weight_decay": 0.0}], lr=1e-3, compile=compile,
                state_dtype=state_dtype, **kw)
    torch_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "weight_decay": 0.0}], lr=1e-3,
                                  foreach=False, **kw)
    for step, (lr, coef) in enumerate([(1e-3, 1.0), (5e-4, 0.5), (2e-3, 1.0)]):
        for p, r, gr in zip(ours, ref, grads[step]):
            p.grad = gr.to(device)
            r.grad = gr.double() * coef  # torch clips the gradient; ours folds the coefficient into the update
        if step == 1:  # arguments assembled ahead (as the trainer does): the rate and coefficient set later count
            opt.prepare()
        for group in opt.param_groups + torch_opt.param_groups:
            group["lr"] = lr
        opt.clip_coef.fill_(coef)
        opt.step()
        torch_opt.step()
        tol = dict(rtol=1e-6, atol=1e-7) if state_dtype == torch.float32 else dict(rtol=1e-4, atol=2e-5)
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p.detach().cpu().double(), r.detach(), **tol)
        assert all(float(opt.state[p]["step"]) == step + 1 for p in ours)


def test_prepared_arguments_dropped_with_the_gradients():
    """A step prepared and then abandoned (a skipped step) leaves nothing behind: after zero_grad, the next step
    uses the new gradients, not views of the old ones."""
    start = torch.randn(4, 3)
    ours = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    opt, ref_opt = (AdamW([q], lr=1e-2, compile=False) for q in (ours, ref))
    ours.grad = torch.full((4, 3), float("nan"))
    opt.prepare()
    opt.zero_grad()
    assert opt._prepared is None and ours.grad is None
    grad = torch.randn(4, 3)
    ours.grad, ref.grad = grad.clone(), grad.clone()
    opt.step()
    ref_opt.step()
    assert torch.equal(ours.detach(), ref.detach()) and torch.isfinite(ours).all()


def test_compiled_chunks_cover_every_parameter():
    """More parameters than one compiled call takes, of mixed ranks and sizes: each is updated exactly as the
    eager update does, the last partial chunk included, and the chunks share graphs."""
    import torch._dynamo.utils

    from moonforge.train import adamw

    g = torch.Generator().manual_seed(1)
    shapes = [(6, 4), (5,), (3, 2, 2), (7, 3), (1, 9)] * ((2 * adamw.CHUNK + 7) // 5 + 1)
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    runs = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compile in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdamW([{"params": params}], lr=1e-2, compile=compile, state_dtype=torch.bfloat16)
        for _ in range(2):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
        runs.append(params)
    for eager, compiled, before in zip(*runs, start):
        assert not torch.equal(compiled.detach(), before)
        torch.testing.assert_close(compiled.detach(), eager.detach(), rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # full chunks and the remainder

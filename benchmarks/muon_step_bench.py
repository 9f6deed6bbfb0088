"""Optimizer-step time of Muon against AdamW on Moonlight-shaped parameters, on one device; writes JSON.

The device holds what one rank of an expert-parallel run holds: every layer of the model, with 64 / EP routed
experts per MoE layer (EP 8 by default, so 8 experts, 3.4B parameters). Gradients come from a real forward
and backward pass at ``--seq`` tokens in bf16 (fp32 on CPU), which is also timed, so the JSON states what Muon
adds to a whole training step; the optimizers then step fp32 master parameters with fp32 gradients. Timed,
each over the same gradients:

    adamw_fused / adamw_foreach   torch.optim.AdamW on every parameter (fused: CUDA only)
    muon                          moonforge's Muon (bf16 Newton-Schulz) with Moonlight's grouping
    muon_matrices / muon_adamw    its two halves: Newton-Schulz matrices alone, the AdamW part alone

``--check-offload`` (CUDA) also runs one Muon step with parameters, gradients and state on the CPU and
Newton-Schulz on the GPU (optimizer CPU offload), and checks it against the same step on the GPU.

    python benchmarks/muon_step_bench.py --out benchmarks/results/muon_step_h200.json --check-offload
    python benchmarks/muon_step_bench.py --preset tiny --device cpu --seq 64 --out /tmp/muon_step_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import time

import torch
from tqdm import tqdm

from moonforge.config import preset
from moonforge.model import build_model, cast_model, cross_entropy_sum
from moonforge.train.muon import Muon, muon_param_groups
from moonforge.utils import atomic_write_text, setup_logging

logger = logging.getLogger("muon_step_bench")
LR, WD = 4.2e-4, 0.1  # Moonlight's peak learning rate and weight decay
TARGET_PCT = 5.0  # what Muon may add to a training step


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="moonlight-16b-a3b", help="model preset (moonlight-16b-a3b | tiny)")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    ap.add_argument("--ep", type=int, default=8, help="expert-parallel size: this device holds experts / EP")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence of the timed forward/backward")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step, for the overhead percentage")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--check-offload", action="store_true", help="also check Muon with CPU-resident parameters")
    ap.add_argument("--out", required=True, help="JSON file to write")
    return ap.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(label: str, fn, device: torch.device, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in tqdm(range(iters), desc=label, leave=False):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    result = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    logger.info("%-14s median %.2f ms", label, 1e3 * result["median_s"])
    return result


def ns_flops(groups: list[dict], steps: int = 5) -> float:
    """FLOPs of Newton-Schulz over every Muon matrix: per step 4 m^2 n + 2 m^3 for an [m, n] matrix, m <= n."""
    total = 0.0
    for g in groups:
        if g["use_muon"]:
            for p in g["params"]:
                m, n = sorted(p.shape[-2:])
                total += math.prod(p.shape[:-2]) * steps * (4 * m * m * n + 2 * m ** 3)
    return total


def model_config(args):
    base = preset(args.preset)
    layers = args.layers or base.num_hidden_layers
    experts = base.n_routed_experts // args.ep
    if experts < 1 or base.n_routed_experts % args.ep:
        raise SystemExit(f"--ep {args.ep} must divide the preset's {base.n_routed_experts} routed experts")
    config = dataclasses.replace(base, num_hidden_layers=layers, n_routed_experts=experts,
                                 num_experts_per_tok=min(base.num_experts_per_tok, experts))
    return config.validate(f"benchmark config ({args.preset}, {layers} layers, {experts} local experts)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    device = torch.device(args.device)
    config = model_config(args)
    # Forward and backward in bf16 as the trainer's mixed precision does; the optimizers then see fp32 master
    # parameters and fp32 gradients, as after FSDP2's fp32 gradient reduction.
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(config, device=device, dtype=compute_dtype, seed=0)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq + 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))

    def forward_backward():
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        (cross_entropy_sum(logits, tokens[:, 1:]) / tokens[:, 1:].numel()).backward()

    fwd_bwd = timed("fwd+bwd", forward_backward, device, args.warmup, args.iters)
    fwd_bwd["tflops"] = config.flops_per_token(args.seq) * args.micro_batch * args.seq / fwd_bwd["median_s"] / 1e12
    if device.type == "cuda":
        fwd_bwd["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
    grad_of = {n: p.grad.float() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cast_model(model, torch.float32)
    grads = {p: grad_of[n] for n, p in model.named_parameters()}
    del grad_of
    params = list(model.parameters())
    groups = muon_param_groups(model, lr=LR, weight_decay=WD)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": {"preset": args.preset, "layers": config.num_hidden_layers, "local_experts": config.n_routed_experts,
                  "ep": args.ep, "compute_dtype": str(compute_dtype), "master_dtype": "torch.float32",
                  "seq": args.seq, "micro_batch": args.micro_batch},
        "params": {"total": sum(p.numel() for p in params),
                   "muon": sum(p.numel() for g in groups if g["use_muon"] for p in g["params"]),
                   "adamw": sum(p.numel() for g in groups if not g["use_muon"] for p in g["params"])},
        "timings": {"fwd_bwd": fwd_bwd},
    }
    t = result["timings"]

    def bench(label: str, make_optimizer) -> None:
        for p in params:
            p.grad = grads[p]
        opt = make_optimizer()
        t[label] = timed(label, opt.step, device, args.warmup, args.iters)
        del opt
        if device.type == "cuda":
            t[label]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    if device.type == "cuda":
        bench("adamw_fused", lambda: torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WD, fused=True))
    bench("adamw_foreach", lambda: torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WD,
                                                     foreach=True))
    bench("muon", lambda: Muon(muon_param_groups(model, lr=LR, weight_decay=WD), lr=LR))
    bench("muon_matrices", lambda: Muon([g for g in muon_param_groups(model, lr=LR, weight_decay=WD)
                                         if g["use_muon"]], lr=LR))
    bench("muon_adamw", lambda: Muon([g for g in muon_param_groups(model, lr=LR, weight_decay=WD)
                                      if not g["use_muon"]], lr=LR))
    t["muon_matrices"]["ns_tflops"] = ns_flops(groups) / t["muon_matrices"]["median_s"] / 1e12

    adamw = t["adamw_fused" if "adamw_fused" in t else "adamw_foreach"]["median_s"]
    step = args.grad_accum * t["fwd_bwd"]["median_s"] + adamw
    result["summary"] = {
        "adamw_baseline": "adamw_fused" if "adamw_fused" in t else "adamw_foreach",
        "grad_accum": args.grad_accum,
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "train_step_with_adamw_s": step,
        "muon_extra_s": t["muon"]["median_s"] - adamw,
        "muon_extra_pct_of_step": 100 * (t["muon"]["median_s"] - adamw) / step,
        "target_pct": TARGET_PCT,
        # Micro-batches per optimizer step at which Muon's extra time is TARGET_PCT of the step.
        "micro_batches_for_target": max(0.0, (t["muon"]["median_s"] - adamw) * 100 / TARGET_PCT - adamw)
        / t["fwd_bwd"]["median_s"],
    }
    if args.check_offload:
        result["offload_check"] = check_offload(model, grads, device)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    logger.info("Muon adds %.1f ms to a %.1f ms step (%.2f%%); written to %s", 1e3 * result["summary"]["muon_extra_s"],
                1e3 * step, result["summary"]["muon_extra_pct_of_step"], args.out)
    return result


def check_offload(model, grads: dict, device: torch.device) -> dict:
    """One Muon step with everything on the CPU and Newton-Schulz on ``device``, against the same step on
    ``device``; reports the largest relative difference (the AdamW part runs on different hardware)."""
    if device.type != "cuda":
        raise SystemExit("--check-offload needs a CUDA device")
    named = [(n, p) for n, p in model.named_parameters()]
    on_cpu = {n: torch.nn.Parameter(p.detach().cpu()) for n, p in named}
    for n, p in named:
        on_cpu[n].grad = grads[p].cpu()
        p.grad = grads[p]
    start = {n: p.detach().clone() for n, p in named}

    class Named(torch.nn.Module):
        def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
            yield from on_cpu.items()

    gpu_opt = Muon(muon_param_groups(model, lr=LR, weight_decay=WD), lr=LR)
    cpu_opt = Muon(muon_param_groups(Named(), lr=LR, weight_decay=WD), lr=LR, compute_device=device)
    gpu_opt.step()
    begin = time.perf_counter()
    cpu_opt.step()
    offload_s = time.perf_counter() - begin
    worst = 0.0
    for n, p in named:
        moved = (p.detach() - start[n]).norm()
        diff = (on_cpu[n].detach().to(device) - p.detach()).norm()
        worst = max(worst, (diff / moved.clamp_min(1e-30)).item())
    with torch.no_grad():
        for n, p in named:
            p.copy_(start[n])
    logger.info("offloaded Muon step %.2f s; largest difference relative to the update: %.2e", offload_s, worst)
    return {"offloaded_step_s": offload_s, "max_diff_relative_to_update": worst, "ok": worst < 1e-2}


if __name__ == "__main__":
    main()

"""One EP rank's routed-expert work under the all-gather dispatcher, on one device, without the collectives: the
static rows (every gathered (token, slot) pair carried, the grouped GEMMs stopping at the local experts' last
row, no host synchronisation) against the compact rows (the host reads the local row count, then only those rows
are gathered and computed, and padded with zeros for the combine). Writes JSON.

Both compute the same values and gradients (``tests/test_model.py::test_static_rows_match_computing_the_routed_rows
_alone``). What differs: the static path moves the unrouted rows through the gather, the element-wise passes and
the combine, and saves the gathered tokens instead of the rows; the compact path stops the host once per layer.
Timed per forward + backward of one layer's experts, with the element-wise kernels compiled as in training:

    device_ms   GPU time from CUDA events with the host queueing ahead (several layers in flight)
    wall_ms     host wall time per layer when each layer waits for the previous one's backward first

It also records the relative difference between the two paths' output and gradients.

    python benchmarks/dispatch_rows_bench.py --out benchmarks/results/dispatch_rows_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_preprocess import commit  # noqa: E402

from moonforge.config import preset  # noqa: E402
from moonforge.model import KERNELS, combine, compile_kernels, expert_ffn, expert_rows, sort_by_expert  # noqa: E402
from moonforge.utils import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=2, help="expert-parallel size (the rank holds experts / EP)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--layers", type=int, default=8, help="layers queued per timed repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def make_inputs(args, device):
    c = preset("moonlight-16b-a3b")
    g = torch.Generator().manual_seed(0)
    tokens, top_k, local = args.seq * args.ep, c.num_experts_per_tok, c.n_routed_experts // args.ep
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(tokens, c.hidden_size, generator=g).to(device, dtype)
    scores = torch.rand(tokens, c.n_routed_experts, generator=g)
    indices = scores.topk(top_k, dim=-1).indices.to(device)
    weights = torch.rand(tokens, top_k, generator=g).to(device)
    std = 0.02
    gate_up = (torch.randn(local, 2, c.moe_intermediate_size, c.hidden_size, generator=g) * std).to(device, dtype)
    down = (torch.randn(local, c.hidden_size, c.moe_intermediate_size, generator=g) * std).to(device, dtype)
    key = torch.where(indices < local, indices, local)  # rank 0's experts are 0..local-1
    return x, weights, key, gate_up, down, top_k, local


def static(x, weights, key, gate_up, down, top_k, local):
    order, counts = sort_by_expert(key, local + 1)
    routed = key.numel() - counts[-1]
    h = expert_ffn(expert_rows(x, order, top_k, routed), gate_up, down, counts[:-1],
                   rows_again=lambda: x.detach()[order // top_k])
    return KERNELS.combine(h, order, weights, routed)


def compact(x, weights, key, gate_up, down, top_k, local):
    order, counts = sort_by_expert(key, local + 1)
    n = key.numel() - int(counts[-1])  # the host waits here
    h = expert_ffn(x[order[:n] // top_k], gate_up, down, counts[:-1])
    h = torch.cat([h, h.new_zeros(key.numel() - n, h.shape[1])])
    return KERNELS.combine(h, order, weights)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, inputs, args, device) -> dict:
    x, weights, *rest = inputs
    probe = torch.randn_like(x)

    def layer():
        xx, ww = x.detach().requires_grad_(), weights.detach().requires_grad_()
        out = fn(xx, ww, *rest)
        (out * probe).sum().backward()
        return xx.grad

    for _ in range(3):
        layer()
    sync(device)
    queued, waited = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for _ in range(args.layers):
            layer()
        sync(device)
        queued.append((time.perf_counter() - t0) * 1e3 / args.layers)
        t0 = time.perf_counter()
        for _ in range(args.layers):
            layer()
            sync(device)
        waited.append((time.perf_counter() - t0) * 1e3 / args.layers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layer()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    else:
        peak = None
    return {"device_ms": statistics.median(queued), "wall_ms": statistics.median(waited),
            "queued_ms_all": queued, "waited_ms_all": waited, "peak_extra_gib": peak}


def relative_difference(inputs) -> dict:
    """Per quantity, the relative (norm) difference between the two paths' output and gradients, which should agree."""
    x, weights, key, gate_up, down, top_k, local = inputs
    probe = torch.randn_like(x)
    got = []
    for fn in (static, compact):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weights, gate_up, down)]
        xx, ww, gu, dd = leaves
        out = fn(xx, ww, key, gu, dd, top_k, local)
        (out.float() * probe).sum().backward()
        got.append([out] + [t.grad for t in leaves])
    return {name: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
            for name, a, b in zip(("out", "x", "weights", "gate_up", "down"), *got)}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        compile_kernels()
    inputs = make_inputs(args, device)
    key, top_k = inputs[2], inputs[5]
    routed_fraction = float((key < inputs[6]).float().mean())
    results = {"compact": measure(compact, inputs, args, device), "static": measure(static, inputs, args, device)}
    results["static_again"] = measure(static, inputs, args, device)
    results["compact_again"] = measure(compact, inputs, args, device)
    difference = relative_difference(inputs)
    record = {
        "benchmark": "dispatch_rows_bench", "commit": commit(), "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "gpu_count": 1 if device.type == "cuda" else 0, "torch_version": torch.__version__,
        "config": {**vars(args), "top_k": top_k, "rows": key.numel(), "routed_fraction": routed_fraction},
        "results": results, "relative_difference_static_vs_compact": difference,
    }
    atomic_write_text(Path(args.out), json.dumps(record, indent=1))
    for name, r in results.items():
        print(f"{name}: device {r['device_ms']:.3f} ms, wall {r['wall_ms']:.3f} ms per layer, "
              f"peak +{r['peak_extra_gib'] or 0:.2f} GiB")
    print("relative difference, static against compact:", {k: f"{v:.1e}" for k, v in difference.items()})


if __name__ == "__main__":
    main()

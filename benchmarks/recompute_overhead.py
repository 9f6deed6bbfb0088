"""Cost of each activation-recomputation mode (none, sel, full) per training step, one process on a CPU.

On a CPU the tiny model's step is dominated by per-operator overhead, the same host-side work that feeds a GPU,
so this isolates what each mode adds there: ``sel`` runs PyTorch's selective-checkpoint dispatch mode, which
adds Python work to every operator of the forward pass and of the recomputation. Writes JSON with the median
forward+backward time per mode over interleaved rounds.

    OMP_NUM_THREADS=1 python benchmarks/recompute_overhead.py --out benchmarks/results/recompute_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moonforge.config import preset  # noqa: E402
from moonforge.model import build_model  # noqa: E402
from moonforge.parallel.checkpointing import apply_activation_checkpointing  # noqa: E402
from moonforge.utils import atomic_write_text  # noqa: E402

MODES = ("none", "sel", "full")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each times every mode")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    config = preset(args.preset)
    models = {}
    for mode in MODES:
        models[mode] = build_model(config, seed=0)
        apply_activation_checkpointing(models[mode], mode)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    grads = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for mode, model in models.items():
            for _ in range(args.steps):
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                model(ids[:, :-1], labels=ids[:, 1:]).backward()
                if rnd:
                    times[mode].append(time.perf_counter() - start)
            grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # The three modes compute the same gradients (recomputation changes where values come from, not what they are).
    same = {mode: float((grads[mode] - grads["none"]).abs().max()) for mode in MODES}
    from tiny_curves import commit, machine

    result = {"benchmark": "recompute_overhead", "commit": commit(),
              "machine": machine(), "threads": torch.get_num_threads(), "config": vars(args),
              "median_step_s": {m: statistics.median(t) for m, t in times.items()},
              "relative_to_none": {m: statistics.median(t) / statistics.median(times["none"]) for m, t in times.items()},
              "max_grad_difference_vs_none": same}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_s", "relative_to_none", "max_grad_difference_vs_none")},
                     indent=2))
    return result


if __name__ == "__main__":
    main()

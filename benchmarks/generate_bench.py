"""Greedy generation with a KV cache against recomputing every sequence for each new token, one device.

The two ways evaluation's ``generate_until`` can decode (``MoonforgeLM(kv_cache=...)``), at the model level: a
batch of prompts of different lengths (left-padded for the cache, right-padded for recomputation, as the
evaluation model does), a fixed number of new tokens, random weights. Writes JSON with each way's median time,
new tokens per second, and whether both chose the same tokens (exactly, in fp32; in bf16 a near-tie may go
either way, so the agreement is reported).

    OMP_NUM_THREADS=2 python benchmarks/generate_bench.py --out benchmarks/results/generate_cpu.json
    python benchmarks/generate_bench.py --preset moonlight-16b-a3b --layers 6 --device cuda --dtype bf16 \
        --batch 8 --prompt 1024 --new 128 --out generate_6l_h100.json
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
from moonforge.model import KVCache, Transformer, build_model, left_padded  # noqa: E402
from moonforge.utils import atomic_write_text, parse_dtype  # noqa: E402


@torch.inference_mode()
def cached(model: Transformer, prompts: list[list[int]], new: int) -> list[list[int]]:
    device = model.lm_head.weight.device
    tokens, documents = left_padded(prompts)
    cache = KVCache(capacity=tokens.shape[1] + new)
    out: list[list[int]] = [[] for _ in prompts]
    last = _last_position(model, lambda: model(tokens.to(device), document_ids=documents.to(device), cache=cache))
    for step in range(new):
        chosen = last.argmax(dim=-1)
        for row, token in zip(out, chosen.tolist()):
            row.append(token)
        if step + 1 == new:
            break
        positions = torch.tensor([[len(p) + step] for p in prompts], device=device)
        last = _last_position(model, lambda: model(chosen[:, None], position_ids=positions,
                                                   document_ids=torch.ones_like(positions), cache=cache))
    return out


@torch.inference_mode()
def recomputed(model: Transformer, prompts: list[list[int]], new: int) -> list[list[int]]:
    device = model.lm_head.weight.device
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(new):
        rows = [p + o for p, o in zip(prompts, out)]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        ends = torch.tensor([len(r) - 1 for r in rows], device=device)
        last = _last_position(model, lambda: model(tokens.to(device)), ends)
        for row, token in zip(out, last.argmax(dim=-1).tolist()):
            row.append(token)
    return out


def _last_position(model: Transformer, run, ends: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, V] at one position per row (the last, or ``ends``): only that position reaches lm_head."""
    def select(module, args):
        h = args[0]
        return (h[:, -1:] if ends is None else h[torch.arange(h.shape[0], device=h.device), ends][:, None],)

    handle = model.lm_head.register_forward_pre_hook(select)
    try:
        return run()[:, -1].float()
    finally:
        handle.remove()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256, help="longest prompt; the others are shorter")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each way, interleaved, after one warm-up")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    config = preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    device = torch.device(args.device)
    model = build_model(config, dtype=parse_dtype(args.dtype), seed=0, device=device).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [args.prompt - i * args.prompt // (2 * args.batch) for i in range(args.batch)]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tokens = fn(model, prompts, args.new)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, tokens

    times: dict[str, list[float]] = {"kv_cache": [], "recomputed": []}
    outputs = {}
    for rnd in range(args.rounds + 1):
        for name, fn in (("kv_cache", cached), ("recomputed", recomputed)):
            seconds, outputs[name] = timed(fn)
            if rnd:
                times[name].append(seconds)
    same = sum(a == b for x, y in zip(outputs["kv_cache"], outputs["recomputed"]) for a, b in zip(x, y))
    median = {name: statistics.median(t) for name, t in times.items()}
    from data_preprocess import commit

    if device.type == "cuda":
        where = {"gpu": torch.cuda.get_device_name(device), "gpu_count": 1}
    else:
        from tiny_curves import machine  # the CPU, cores and library versions

        where = machine()
    result = {
        "benchmark": "generate_bench", "commit": commit(), "machine": where, "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "config": vars(args), "prompt_lengths": lengths,
        "median_s": median, "new_tokens_per_s": {k: args.batch * args.new / v for k, v in median.items()},
        "speedup": median["recomputed"] / median["kv_cache"],
        "same_tokens": same, "tokens": args.batch * args.new,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "new_tokens_per_s", "speedup", "same_tokens", "tokens")},
                     indent=2))
    return result


if __name__ == "__main__":
    main()

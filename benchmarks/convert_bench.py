"""Conversion speed and peak memory on Moonlight-shaped weights (both directions).

Synthesises a Hugging Face directory with Moonlight-16B-A3B's real tensor shapes (bf16, per-expert tensors,
router bias fp32) for the first ``--layers`` layers plus embedding and lm_head, sharded like the published
checkpoint (~1.2 GB files), then times, each in a fresh process:

    moonforge convert hf-to-native --hf HF --out NATIVE
    moonforge convert native-to-hf --ckpt NATIVE --out EXPORT

and records GB/s and peak RSS (getrusage) in a JSON file. Usage:

    python benchmarks/convert_bench.py --layers 5 --workdir /tmp/convert-bench \
        --out benchmarks/results/convert_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moonforge.checkpoint.convert import parse_size
from moonforge.checkpoint.hf import (
    PlannedTensor,
    SafetensorsStreamWriter,
    expected_native_shapes,
    hf_order_key,
    native_to_hf,
    plan_shards,
)
from moonforge.config import preset
from moonforge.model import Transformer

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys, time
import torch
from moonforge.checkpoint.convert import hf_to_native, native_to_hf
direction, src, dst = sys.argv[1:4]
start = time.time()
if direction == "hf-to-native":
    stats = hf_to_native(src, dst)
else:
    stats = native_to_hf(src, dst, max_shard_bytes=int(sys.argv[4]))
stats["wall_seconds"] = time.time() - start
# VmHWM: this process's own peak (getrusage's ru_maxrss would carry over the parent's peak across exec).
status = open("/proc/self/status").read().splitlines()
stats["peak_rss_bytes"] = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))
print(json.dumps(stats))
"""


def synthesize(out: Path, layers: int, shard_bytes: int) -> dict:
    """Write a Moonlight-shaped HF directory; returns its size and largest shard/tensor."""
    config = preset("moonlight-16b-a3b").replace(num_hidden_layers=layers)
    with torch.device("meta"):
        shapes = expected_native_shapes(Transformer(config))
    planned = []
    for name in sorted(shapes, key=hf_order_key):
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        planned += [PlannedTensor(n, tuple(t.shape), dtype)
                    for n, t in native_to_hf(name, torch.empty(shapes[name], device="meta"))]
    shards = plan_shards(planned, shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    total = sum(t.nbytes for t in planned)
    with tqdm(total=total, unit="B", unit_scale=True, desc="synthesise", disable=None) as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1}-of-{len(shards)}.safetensors"  # Moonlight's own shard naming
            writer = SafetensorsStreamWriter(out / file, shard)
            for t in shard:
                writer.write(t.name, (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype))
                weight_map[t.name] = file
                bar.update(t.nbytes)
            writer.close()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save(out / "config.json")
    return {"bytes": total, "tensors": len(planned), "shards": len(shards),
            "largest_shard_bytes": max(sum(t.nbytes for t in s) for s in shards),
            "largest_tensor_bytes": max(t.nbytes for t in planned),
            "largest_native_tensor_bytes": max(
                torch.Size(s).numel() * 2 for s in shapes.values())}


def run_direction(direction: str, src: Path, dst: Path, shard_bytes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _CHILD, direction, str(src), str(dst), str(shard_bytes)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{direction} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_baseline(directory: Path, size: int = 1 << 30) -> dict:
    """Raw sequential write (with fsync) and cold read speed of the work directory's disk, for comparison."""
    path = directory / "disk-baseline.bin"
    block = os.urandom(16 << 20)
    start = time.time()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / 1e9 / (time.time() - start)
    cold = drop_page_cache()
    start = time.time()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    read = size / 1e9 / (time.time() - start)
    path.unlink()
    return {"write_gb_per_s": write, "read_gb_per_s": read, "read_cold": cold, "bytes": size}


def drop_page_cache() -> bool:
    """Drop the OS page cache so reads come from disk (needs root; returns whether it worked)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=5, help="Moonlight layers to synthesise (default 5: 6.2 GB)")
    parser.add_argument("--shard-size", default="1.2GB", help="HF shard size of the source and the export")
    parser.add_argument("--workdir", default="/tmp/convert-bench")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "convert_cpu.json"))
    parser.add_argument("--keep", action="store_true", help="keep the synthesised and converted directories")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    shard_bytes = parse_size(args.shard_size)
    free = shutil.disk_usage(work.parent).free
    source = synthesize(work / "hf", args.layers, shard_bytes)
    if free < 3.2 * source["bytes"]:
        raise SystemExit(f"{work.parent}: {free / 1e9:.1f} GB free, need about {3.2 * source['bytes'] / 1e9:.1f}")
    disk = disk_baseline(work)
    print(f"disk: write {disk['write_gb_per_s']:.2f} GB/s (fsync), read {disk['read_gb_per_s']:.2f} GB/s")
    results = {}
    for direction, src, dst in (("hf-to-native", work / "hf", work / "native"),
                                ("native-to-hf", work / "native", work / "export")):
        cold = drop_page_cache()
        stats = run_direction(direction, src, dst, shard_bytes)
        stats["gb_per_s"] = stats["bytes"] / 1e9 / stats["wall_seconds"]
        stats["peak_rss_gb"] = stats["peak_rss_bytes"] / 1e9
        stats["peak_rss_over_largest_shard"] = stats["peak_rss_bytes"] / source["largest_shard_bytes"]
        stats["peak_rss_over_largest_native_tensor"] = stats["peak_rss_bytes"] / source["largest_native_tensor_bytes"]
        stats["peak_rss_over_model"] = stats["peak_rss_bytes"] / source["bytes"]
        stats["page_cache_dropped"] = cold
        results[direction] = stats
        print(f"{direction}: {stats['bytes'] / 1e9:.2f} GB in {stats['wall_seconds']:.1f} s = "
              f"{stats['gb_per_s']:.2f} GB/s, peak RSS {stats['peak_rss_gb']:.2f} GB")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    record = {"benchmark": "convert", "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(),
              "config": {"model": "moonlight-16b-a3b", "layers": args.layers, "dtype": "bfloat16 (router bias fp32)",
                         "shard_size": args.shard_size, "workdir": str(work)},
              "load_average_at_end": os.getloadavg(), "disk": disk, "source": source, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

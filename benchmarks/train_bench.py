"""Training throughput on Moonlight-16B-A3B shapes (1 or more GPUs), next to transformers' DeepseekV3ForCausalLM.

    torchrun --nproc_per_node 1 benchmarks/train_bench.py --layers 6 --mbs 2 --seq 4096 --hf-baseline --out r.json
    torchrun --nproc_per_node 2 benchmarks/train_bench.py --layers 27 --mbs 1 --seq 4096 --ep 2 --out r.json

Writes JSON: tokens/s per GPU, TFLOP/s per GPU (ARCHITECTURE.md's formula), MFU against 989 and against the
measured 798 TFLOP/s matmul ceiling, peak memory, a time split from one profiled step (attention, experts,
dispatch/combine, router, lm head + loss, optimizer, communication, other), the top operations by input shape,
every rank's busy / NCCL-only / idle time in that step (a rank whose GPU idles is waiting for its host) and the
host code the idle stretches end in, commit, GPU count, torch version and the full config.

Step times: ``step_time_s_median`` (and the headline tokens/s, TFLOP/s) synchronise before and after every step,
so each includes the bubble of starting from an idle GPU; ``back_to_back`` then runs the same number of steps
without synchronising between them, as a training run does. The optimizer's time is its span on the device
(CUDA events), which is its host time when the host is the slower side. With --hf-baseline, transformers' model
runs the same shapes in the same process afterwards.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_preprocess import commit  # noqa: E402
from moonforge.config import preset  # noqa: E402
from moonforge.train.config import TrainConfig  # noqa: E402
from moonforge.train.metrics import MEASURED_MATMUL_TFLOPS, PEAK_TFLOPS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moonlight-16b-a3b", help="architecture (tiny: a CPU smoke run)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=None,
                   help="routed experts per layer (e.g. 8: what one GPU of an EP 8 run holds, same FLOPs per token)")
    p.add_argument("--engine", choices=("auto", "fsdp"), default="auto",
                   help="one GPU: auto uses flat buffers for AdamW; fsdp forces the FSDP path (as Muon takes)")
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--gbs", type=int, default=None, help="global batch (default: mbs x data-parallel size)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--ac", default="none")
    p.add_argument("--ac-layers", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="fuse element-wise kernels with torch.compile")
    p.add_argument("--compile-blocks", action="store_true", help="torch.compile every decoder block whole")
    p.add_argument("--state-dtype", default="fp32", help="Adam moment dtype (single GPU): fp32 | bf16")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--packed", type=int, default=0, help="pack this many documents per row (document masking)")
    p.add_argument("--offload", type=float, default=0.0)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra TrainConfig key=value")
    p.add_argument("--hf-baseline", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--sync-audit", action="store_true",
                   help="run one more step that records where the host waits for the GPU (CUDA only)")
    p.add_argument("--host-profile", action="store_true",
                   help="run one more step under cProfile: the Python functions the host spends its time in")
    p.add_argument("--label", default="")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def host_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine_probe(device: torch.device, world: int) -> dict | None:
    """How fast this machine is right now: bf16 matmul, memory copy and (several GPUs) NCCL bandwidth.

    Lent GPUs differ from lease to lease; these numbers make runs on different leases comparable.
    """
    if device.type != "cuda":
        return None

    def timed(fn, reps=10):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    probe = {"matmul_bf16_tflops": 2 * n ** 3 / timed(lambda: a @ a) / 1e12}
    buf = torch.empty(2 ** 28, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(buf)
    probe["copy_gb_s"] = 2 * buf.numel() * 4 / timed(lambda: dst.copy_(buf)) / 1e9  # read + write
    buf = dst = None
    if world > 1:
        x = torch.empty(2 ** 25, device=device, dtype=torch.bfloat16)  # 64 MiB
        y = torch.empty_like(x)
        probe["all_to_all_64mib_gb_s_leaving"] = (x.numel() * 2 * (world - 1) / world
                                                  / timed(lambda: dist.all_to_all_single(y, x)) / 1e9)
        g = torch.empty(world * x.numel(), device=device, dtype=torch.bfloat16)
        probe["all_gather_64mib_gb_s"] = x.numel() * 2 * (world - 1) / timed(
            lambda: dist.all_gather_into_tensor(g, x)) / 1e9
        x = y = g = None
    torch.cuda.empty_cache()
    return {k: round(v, 1) for k, v in probe.items()}


def model_dir(name: str, layers: int, tmp: Path, experts: int | None = None) -> Path:
    config = preset(name).replace(num_hidden_layers=layers)
    if experts:
        config = config.replace(n_routed_experts=experts, num_experts_per_tok=min(config.num_experts_per_tok, experts))
    path = tmp / f"moonlight_{layers}l"
    path.mkdir(parents=True, exist_ok=True)
    config.save(path / "config.json")
    return path


def train_config(args, mdir: Path, out_dir: Path, world: int) -> TrainConfig:
    dp = world // (args.tp * args.pp)
    gbs = args.gbs or args.mbs * dp
    data = {"train": ["synthetic"]}
    cfg = {
        "model": str(mdir), "precision": args.precision, "seq_len": args.seq, "micro_batch_size": args.mbs,
        "global_batch_size": gbs, "train_iters": 10**6, "lr": 1e-5, "min_lr": 1e-6, "optimizer": args.optimizer,
        "activation_checkpointing": args.ac, "ac_layers": args.ac_layers, "compile": args.compile,
        "compile_blocks": args.compile_blocks, "attention_backend": args.attention,
        "optimizer_state_dtype": args.state_dtype, "optimizer_offload": args.offload, "data": data,
        "parallel": {"ep": args.ep, "etp": args.etp, "tp": args.tp, "pp": args.pp, "sp": args.tp > 1},
        "output_dir": str(out_dir), "save_final": False, "tensorboard": False, "log_interval": 1,
    }
    from moonforge.train.config import _assign
    import yaml

    for item in args.overrides:
        key, _, value = item.partition("=")
        _assign(cfg, key, yaml.safe_load(value))
    return TrainConfig.from_dict(cfg)


class PackedBatches:
    """Wrap a loader: split every row into ``n`` documents of random lengths (document masking)."""

    def __init__(self, loader, n: int, seed: int = 0):
        self.loader, self.n = loader, n
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self):
        batch = self.loader.next_batch()
        bsz, seq = batch.input_ids.shape
        docs = torch.zeros(bsz, seq, dtype=torch.long)
        for row in range(bsz):
            cuts = torch.sort(torch.randperm(seq - 1, generator=self.gen)[: self.n - 1] + 1).values
            for i, c in enumerate(cuts.tolist()):
                docs[row, c:] = i + 1
        batch.document_ids = docs
        return batch


def device_activity(prof, wall_ms: float) -> dict:
    """One rank's profiled step: wall time, time with any kernel running (busy), time with only NCCL kernels
    running (communication not hidden, including waiting for the peer), idle time (the host was behind), and
    where the idle time falls (``idle_gaps``).
    """
    from torch.autograd import DeviceType

    spans, compute = [], []
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA and not _is_annotation(evt):
            span = (evt.time_range.start, evt.time_range.end)
            spans.append(span)
            if "nccl" not in evt.name.lower():
                compute.append(span)
    busy, compute_busy = _covered_us(spans) / 1000, _covered_us(compute) / 1000
    return {"wall_ms": round(wall_ms, 1), "busy_ms": round(busy, 1), "compute_busy_ms": round(compute_busy, 1),
            "nccl_only_ms": round(busy - compute_busy, 1), "idle_ms": round(max(wall_ms - busy, 0.0), 1),
            "idle_gaps": _or_error(idle_gaps, prof)}


def _or_error(fn, *args) -> dict:
    """A diagnostic's result, or its error: a profiler that records less than expected must not lose the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON instead
        return {"error": f"{type(e).__name__}: {e}"}


# Host-side ranges that name where in a step the host was: the innermost one around a launch names the gap.
_PHASES = ("mf.", "Optimizer.", "FSDP::", "## Call CompiledFxGraph", "autograd::engine::evaluate_function")


def idle_gaps(prof, min_us: float = 20.0, top: int = 25) -> dict:
    """Where the GPU waited for the host in a profiled step: every stretch of at least ``min_us`` with no kernel
    running, charged to the host code that launched the kernel ending it (the operator, and the enclosing
    moonforge / FSDP / optimizer / compiled-graph / autograd ranges). Returns the total, the gap count and the
    ``top`` sites by idle time: [site, gaps, ms]."""
    from torch.autograd import DeviceType

    cpu_by_id = {e.id: e for e in prof.events() if e.device_type == DeviceType.CPU}
    sites: dict[str, list] = {}
    total = 0.0
    count = 0
    covered_to = None
    for start, end, launched_by in sorted(_kernels(prof)):
        if covered_to is not None and start - covered_to >= min_us:
            gap = start - covered_to
            site = _launch_site(cpu_by_id.get(launched_by))
            entry = sites.setdefault(site, [0, 0.0])
            entry[0] += 1
            entry[1] += gap
            total += gap
            count += 1
        covered_to = end if covered_to is None else max(covered_to, end)
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]
    return {"min_gap_us": min_us, "total_ms": round(total / 1000, 2), "gaps": count,
            "sites": [[name, n, round(us / 1000, 2)] for name, (n, us) in ranked]}


def _kernels(prof) -> list[tuple[float, float, int]]:
    """(start us, end us, correlation id of the launching operator) of every kernel of a profile. Read from the
    profiler's raw events where it keeps them: the operator events carry that id, but not every torch version
    keeps it on the kernel events."""
    from torch.autograd import DeviceType

    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is None:
        return [(e.time_range.start, e.time_range.end, getattr(e, "linked_correlation_id", -1))
                for e in prof.events() if e.device_type == DeviceType.CUDA and not _is_annotation(e)]
    out = []
    for e in raw.events():
        if e.device_type() != DeviceType.CUDA or e.name().startswith(_ANNOTATION_PREFIXES):
            continue
        if getattr(e, "is_user_annotation", None) is not None and e.is_user_annotation():
            continue
        out.append((e.start_ns() / 1000, e.end_ns() / 1000, e.linked_correlation_id()))
    return out


def _launch_site(op) -> str:
    """``phase > phase / operator`` for the host operator that launched a kernel (outermost phase first)."""
    if op is None:
        return "(launch not recorded)"
    name, phases, parent = op.name, [], op.cpu_parent
    while parent is not None:
        if parent.name.startswith(_PHASES):
            label = parent.name
            if label.startswith("## Call CompiledFxGraph"):
                label = "compiled graph"
            elif label.startswith("autograd::engine::evaluate_function: "):
                label = "backward " + label.split(": ", 1)[1]
            if not phases or phases[-1] != label:
                phases.append(label)
        parent = parent.cpu_parent
    return " > ".join(reversed(phases[:3])) + f" / {name}" if phases else name


def host_sync_sites(fn) -> dict:
    """Run ``fn`` with CUDA's synchronisation warnings on; count each synchronising call by its innermost
    moonforge frames (the host waits for the GPU there, and the GPU then idles until the host catches up)."""
    import traceback
    import warnings
    from collections import Counter

    sites: Counter = Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                  if "moonforge" in f.filename and "train_bench" not in f.filename]
        sites[" <- ".join(reversed(frames[-3:])) or f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    return {"total": sum(sites.values()), "sites": sites.most_common(40)}


def host_profile(fn, top: int = 40) -> dict:
    """One call of ``fn`` under cProfile: host seconds, the functions with the most own time and the most
    cumulative time; and, from a second call under the PyTorch profiler, the top-level operator calls and the
    kernel launches the host issues. (Not a dispatch mode: one around a compiled block makes it eager for good.)"""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as counted:
        fn()
    events = counted.events()
    aten_calls = sum(1 for e in events if e.name.startswith("aten::")
                     and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    launches = sum(1 for e in events if "LaunchKernel" in e.name)
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    host_s = time.perf_counter() - t0
    sync()
    stats = pstats.Stats(prof).stats

    def rows(key):
        out = []
        for (file, line, name), (cc, nc, tt, ct, _) in sorted(stats.items(), key=key)[:top]:
            out.append([f"{Path(file).name}:{line} {name}", nc, round(tt * 1000, 1), round(ct * 1000, 1)])
        return out

    return {"host_s": round(host_s, 3), "aten_calls": aten_calls, "kernel_launches": launches,
            "columns": ["function", "calls", "own_ms", "cum_ms"], "by_own_time": rows(lambda kv: -kv[1][2]),
            "by_cumulative_time": rows(lambda kv: -kv[1][3])}


KERNEL_CLASSES = (  # (class, substrings of the kernel name), first match wins
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("grouped_gemm", ("grouped", "groupedgemm", "GroupProblemShape")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "cublas")),
    ("triton_fused", ("triton_",)),
    ("copy", ("memcpy", "memset", "copy", "chunk_cat", "cat_")),
    ("reduction", ("reduce", "norm", "sum", "softmax")),
    ("index_sort", ("index", "sort", "scatter", "gather", "radix", "topk", "cub::")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


_TRITON_ELEMENTWISE = ("triton_poi_", "triton_red_", "triton_per_")


def kernel_classes(prof, top: int = 120) -> tuple[dict, list]:
    """GPU time (ms) of one profiled step by kind of kernel, from the kernels' own names (no operator
    attribution): what the GPU itself spends its time on, whatever launched it. Also the ``top`` kernels
    themselves: [name (cut to 160 characters), launches, ms, class]."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    kernels: dict[str, list] = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CUDA or _is_annotation(evt):
            continue
        name = evt.name
        low = name.lower()
        if name.startswith(_TRITON_ELEMENTWISE):  # named after the operations they fuse, whatever those are
            kind = "triton_fused"
        else:
            kind = next((k for k, keys in KERNEL_CLASSES if any(x.lower() in low for x in keys)), "other")
        ms = (evt.time_range.end - evt.time_range.start) / 1000
        totals[kind] = totals.get(kind, 0.0) + ms
        row = kernels.setdefault(name, [name[:160], 0, 0.0, kind])
        row[1] += 1
        row[2] += ms
    table = sorted(kernels.values(), key=lambda r: -r[2])[:top]
    return ({k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            [[name, count, round(ms, 3), kind] for name, count, ms, kind in table])


_ANNOTATION_PREFIXES = ("## ", "mf.", "Optimizer.", "FSDP::", "ProfilerStep", "CheckpointFunction")


def _is_annotation(evt) -> bool:
    """A named range drawn on the GPU's timeline (record_function, compiled-graph calls), not a kernel: it spans
    its kernels and the gaps between them, so counting it as busy time would hide idle time."""
    return bool(getattr(evt, "is_user_annotation", False)) or evt.name.startswith(_ANNOTATION_PREFIXES)


def _covered_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, last = 0.0, None
    for start, end in sorted(spans):
        if last is None or start > last:
            total += end - start
            last = end
        elif end > last:
            total += end - last
            last = end
    return total


def time_split(prof) -> dict:
    """Device time (ms) per category, attributing each kernel to the op that launched it."""
    categories = {k: 0.0 for k in ("attention", "experts", "dispatch_combine", "router", "lm_head_loss",
                                   "optimizer", "communication", "dense_matmul", "other")}
    from torch.autograd import DeviceType

    for evt in prof.events():
        if evt.device_type != DeviceType.CPU:  # kernels are counted through the op that launched them
            continue
        t = getattr(evt, "self_device_time_total", 0.0) / 1000.0
        if t <= 0:
            continue
        categories[_category(evt)] += t
    return {k: round(v, 3) for k, v in categories.items()}


def _category(evt) -> str:
    name = evt.name.lower()
    scopes = []
    parent = evt
    while parent is not None:
        scopes.append(parent.name)
        parent = parent.cpu_parent
    scope = next((s for s in scopes if s.startswith("mf.")), "")
    if any(k in name for k in ("nccl", "record_param_comms", "all_to_all", "allgather", "reduce_scatter", "c10d",
                               "all_reduce", "all_gather")):
        return "communication"
    if scope == "mf.optimizer" or "adam" in name or "muon" in name:
        return "optimizer"
    if "scaled_dot_product" in name or "attention" in name or "fmha" in name or "flex" in name or \
            scope == "mf.attention":
        return "attention"
    if "grouped_mm" in name or "groupedmm" in name or scope == "mf.experts":
        return "experts"
    if scope == "mf.router" or "topk" in name:
        return "router"
    if scope in ("mf.dispatch", "mf.combine") or any(k in name for k in ("index_select", "indexselect", "index_copy",
                                                                            "indexcopy", "argsort", "sort",
                                                                            "bincount", "repeat_interleave")):
        return "dispatch_combine"
    if scope == "mf.loss" or "linearcrossentropy" in name:
        return "lm_head_loss"
    if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm", "aten::_scaled_mm") \
            or "mmbackward" in name or "addmmbackward" in name:
        return "dense_matmul"
    return "other"


def instrument():
    """Name the forward regions so the profile can split time by category."""
    import moonforge.model as m
    from torch.profiler import record_function

    def scoped(fn, label):
        def wrapped(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapped

    m.attention = scoped(m.attention, "mf.attention")
    m.KERNELS.combine = scoped(m.KERNELS.combine, "mf.combine")
    m.Router.forward = scoped(m.Router.forward, "mf.router")
    m.expert_ffn = scoped(m.expert_ffn, "mf.experts")
    m.sort_by_expert = scoped(m.sort_by_expert, "mf.dispatch")
    m.linear_cross_entropy_sum = scoped(m.linear_cross_entropy_sum, "mf.loss")
    try:
        import moonforge.parallel.expert as e

        e.expert_ffn = m.expert_ffn
        e.sort_by_expert = m.sort_by_expert
    except ImportError:
        pass


def run_moonforge(args, cfg: TrainConfig) -> dict:
    from moonforge.train.trainer import Trainer

    Trainer.single_gpu_flat = args.engine == "auto"
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    probe = machine_probe(trainer.device, trainer.world)
    loader = trainer.train_loader if not args.packed else PackedBatches(trainer.train_loader, args.packed)
    opt_step = trainer.optimizer.step

    device = trainer.device
    optimizer_spans = []  # (start, end) CUDA events around each optimizer step: its span on the device, no sync

    def timed_step(*a, **k):
        if device.type != "cuda":
            t0 = time.perf_counter()
            out = opt_step(*a, **k)
            optimizer_spans.append(time.perf_counter() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.profiler.record_function("mf.optimizer"):
            out = opt_step(*a, **k)
        end.record()
        optimizer_spans.append((start, end))
        return out

    trainer.optimizer.step = timed_step
    # Synchronised around every step: each step's own time, including the bubble of starting from an idle GPU.
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        micro = [loader.next_batch() for _ in range(trainer.grad_accum)]
        sync()
        t0 = time.perf_counter()
        result = trainer.train_step(micro)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(result.loss)
    optimizer_times = [s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1000
                       for s in optimizer_spans[args.warmup:args.warmup + args.steps]]
    # Then back to back, as a training run goes: the host prepares the next step while the GPU finishes this one.
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        micro = [loader.next_batch() for _ in range(trainer.grad_accum)]
        trainer.train_step(micro)
    sync()
    back_to_back = (time.perf_counter() - t0) / args.steps
    split = top_kernels = top_ops_by_shape = ranks = kernels_by_class = kernel_table = None
    world = trainer.world
    if not args.no_profile:
        micro = [loader.next_batch() for _ in range(trainer.grad_accum)]
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            trainer.train_step(micro)
            sync()
            wall_ms = (time.perf_counter() - t0) * 1000
        split = time_split(prof)
        top_kernels = [(e.key, round(e.self_device_time_total / 1000, 3))
                       for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:60]]
        top_ops_by_shape = [(e.key, str(e.input_shapes)[:200], e.count, round(e.self_device_time_total / 1000, 3))
                            for e in sorted(prof.key_averages(group_by_input_shape=True),
                                            key=lambda e: -e.self_device_time_total)[:30]]
        ranks = device_activity(prof, wall_ms)
        if device.type == "cuda":
            kernels_by_class, kernel_table = kernel_classes(prof)
        if world > 1:  # every rank's view: a rank that waits for its peer shows long NCCL kernels and no idle time
            gathered = [None] * world
            dist.all_gather_object(gathered, ranks)
            ranks = gathered
    syncs = None
    if args.sync_audit and device.type == "cuda":
        micro = [loader.next_batch() for _ in range(trainer.grad_accum)]
        syncs = host_sync_sites(functools.partial(trainer.train_step, micro))
    host = None
    if args.host_profile:
        micro = [loader.next_batch() for _ in range(trainer.grad_accum)]
        host = host_profile(functools.partial(trainer.train_step, micro))
    step = sorted(times)[len(times) // 2]
    tokens = cfg.global_batch_size * cfg.seq_len
    tok_s_gpu = tokens / step / world
    flops = trainer.model_config.flops_per_token(cfg.seq_len)
    tflops = tok_s_gpu * flops / 1e12
    result = {
        "step_time_s_median": step, "step_times_s": times, "tokens_per_s_per_gpu": tok_s_gpu,
        "tflops_per_gpu": tflops, "mfu": tflops / PEAK_TFLOPS, "fraction_of_matmul_ceiling": tflops /
        MEASURED_MATMUL_TFLOPS, "peak_memory_gib": peak_memory_gib(device),
        "losses": losses, "flops_per_token": flops, "time_split_ms": split, "top_kernels_ms": top_kernels,
        "top_ops_by_shape_ms": top_ops_by_shape,
        "kernel_classes_ms": kernels_by_class, "kernels_ms": kernel_table, "profiled_step_by_rank": ranks,
        "back_to_back": {"step_time_s_mean": back_to_back, "tokens_per_s_per_gpu": tokens / back_to_back / world,
                         "tflops_per_gpu": tokens / back_to_back / world * flops / 1e12},
        "optimizer_step_s_median": sorted(optimizer_times)[len(optimizer_times) // 2],
        "optimizer_step_times_s": optimizer_times,
        "layout": trainer.dims.describe(), "grad_accum": trainer.grad_accum, "setup_s": setup_s,
        "engine": "flat" if trainer.flat else "fsdp", "host_peak_rss_gib": host_peak_rss_gib(),
        "parameters": sum(p.numel() for p in trainer.pm.parameters()), "machine_probe": probe,
        "host_syncs": syncs, "host_profile": host,
    }
    del trainer, loader
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def run_hf_baseline(args, mdir: Path) -> dict:
    """transformers' DeepseekV3ForCausalLM (grouped_mm experts, SDPA), bf16 parameters, fused AdamW."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(mdir)
    config._attn_implementation = "sdpa"
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.mbs, args.seq + 1), device=device, generator=gen)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    experts_impl = model.config._experts_implementation
    step = sorted(times)[len(times) // 2]
    tok_s = args.mbs * args.seq / step
    flops = preset(args.preset).replace(num_hidden_layers=args.layers).flops_per_token(args.seq)
    result = {"step_time_s_median": step, "tokens_per_s": tok_s, "tflops": tok_s * flops / 1e12,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              "experts_implementation": experts_impl,
              "transformers_version": transformers.__version__}
    del model, opt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    args = parse_args(argv)
    instrument()
    from moonforge.parallel.mesh import init_distributed

    rank, world, device = init_distributed()
    tmp = Path(tempfile.mkdtemp(prefix="moonforge_bench_"))
    mdir = model_dir(args.preset, args.layers, tmp, args.experts)
    cfg = train_config(args, mdir, tmp / "run", world)
    record = {
        "benchmark": "train_bench", "label": args.label, "commit": commit(), "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gpu_count": world,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "args": vars(args), "train_config": cfg.to_dict(),
    }
    try:
        record["moonforge"] = run_moonforge(args, cfg)
    except torch.OutOfMemoryError as e:
        record["moonforge"] = {"error": f"out of memory: {str(e)[:300]}"}
    if args.hf_baseline and world == 1:
        try:
            record["transformers"] = run_hf_baseline(args, mdir)
            ours = record["moonforge"].get("tokens_per_s_per_gpu")
            if ours:
                record["speedup_vs_transformers"] = ours / record["transformers"]["tokens_per_s"]
        except torch.OutOfMemoryError as e:
            record["transformers"] = {"error": f"out of memory: {str(e)[:300]}"}
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2))
        summary = {k: record["moonforge"].get(k) for k in ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu",
                                                           "back_to_back", "peak_memory_gib", "time_split_ms",
                                                           "error")}
        print(json.dumps({"label": args.label, **summary, "hf": record.get("transformers"),
                          "speedup": record.get("speedup_vs_transformers")}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

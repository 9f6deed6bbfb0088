"""Training metrics: one JSON line per step, TensorBoard events, a console line per log interval, and PNG plots
of loss and throughput at the end. Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("moonforge.train")

# Dense bf16 peak of H100/H200 (MFU denominator) and the matmul ceiling measured on our H200s.
PEAK_TFLOPS = 989.0
MEASURED_MATMUL_TFLOPS = 798.0


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, record: dict, console: bool) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)
        if console:
            logger.info(_console_line(record))

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        try:
            plot_metrics(self.path, self.path.parent / "training.png")
        except Exception as e:  # a plot must never fail a finished run
            logger.warning("could not plot metrics: %s", e)


def _console_line(r: dict) -> str:
    if r.get("split") == "valid":
        return f"iter {r['iteration']:>6} | validation loss {r['loss']:.4f} | ppl {math.exp(min(r['loss'], 50)):.2f}"
    parts = [f"iter {r['iteration']:>6}/{r['train_iters']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
             f"grad norm {r['grad_norm']:.3f}", f"{r['tokens_per_s_per_gpu']:.0f} tok/s/gpu"]
    if r.get("tflops_per_gpu") is not None:
        parts.append(f"{r['tflops_per_gpu']:.1f} TFLOP/s/gpu")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"mem {r['memory_gib']:.1f} GiB")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)


def read_metrics(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    return records


def plot_metrics(path: Path, out: Path) -> Path:
    """Loss (train and validation) and throughput against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    train = [r for r in records if r.get("split", "train") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["iteration"] for r in train], [r["loss"] for r in train], label="train")
    if valid:
        ax1.plot([r["iteration"] for r in valid], [r["loss"] for r in valid], "o-", label="validation")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title("loss")
    ax2.plot([r["iteration"] for r in train], [r["tokens_per_s_per_gpu"] for r in train])
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("tokens/s per GPU")
    ax2.set_title("throughput")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

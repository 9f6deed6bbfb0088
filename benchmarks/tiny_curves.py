"""Loss curves of the tiny presets on the shared real data: pretraining (configs/tiny_pretrain.yaml) on the
CLUECorpusSmall + C4 samples, then SFT (configs/tiny_sft.yaml) on the alpaca and ShareGPT samples, starting
from the pretraining run's checkpoint.

It runs the commands of docs/training.md ("Tiny runs on a CPU") in a work directory: train the 4096-entry
tokenizer, build data/tiny/, then `moonforge train` each preset (one process, OMP_NUM_THREADS=1). The curves go
to benchmarks/results/tiny_{pretrain,sft}_curve.{json,png}.

    python benchmarks/tiny_curves.py [--work DIR] [--pretrain-steps N] [--sft-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def run(cmd: list[str], cwd: Path) -> float:
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True)
    return time.perf_counter() - start


def build_data(work: Path) -> None:
    """The data commands of docs/training.md, with the shared samples as input."""
    pretrain = [str(SHARED_DATA / "pretrain" / f) for f in ("clue_small_zh.jsonl", "c4_demo_en.jsonl")]
    run(["moonforge", "tokenizer", "train", "--input", *pretrain, "--out", "data/tiny/tokenizer",
         "--vocab-size", "4096"], work)
    run(["moonforge", "data", "pretrain", "--input", *pretrain, "--tokenizer", "data/tiny/tokenizer",
         "--output-prefix", "data/tiny/pretrain", "--append-eod", "--no-progress"], work)
    run(["moonforge", "data", "sft", "--input", str(SHARED_DATA / "sft" / "alpaca_zh_demo.json"),
         str(SHARED_DATA / "sft" / "alpaca_en_demo.json"), "--tokenizer", "data/tiny/tokenizer", "--seq-len", "128",
         "--output-prefix", "data/tiny/sft_alpaca", "--no-progress"], work)
    run(["moonforge", "data", "sft", "--input", str(SHARED_DATA / "sft" / "sharegpt_zh_1K.jsonl"), "--tokenizer",
         "data/tiny/tokenizer", "--seq-len", "128", "--output-prefix", "data/tiny/sft_sharegpt", "--skip-bad-lines",
         "--no-progress"], work)


def curve(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split", "train") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    return {
        "iteration": [r["iteration"] for r in train],
        "loss": [round(r["loss"], 5) for r in train],
        "lr": [r["lr"] for r in train],
        "loss_tokens": [r["loss_tokens"] for r in train],
        "validation": [{"iteration": r["iteration"], "loss": round(r["loss"], 5)} for r in valid],
        "tokens_per_s": round(sum(r["tokens_per_s_per_gpu"] for r in train) / len(train), 1),
    }


def smoothed(values: list[float], window: int = 10) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot(result: dict, out: Path, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(c["iteration"], c["loss"], color="tab:blue", alpha=0.3, label="train (per step)")
    ax.plot(c["iteration"], smoothed(c["loss"]), color="tab:blue", label="train (mean of 10 steps)")
    if c["validation"]:
        ax.plot([v["iteration"] for v in c["validation"]], [v["loss"] for v in c["validation"]], "o-",
                color="tab:orange", label="validation (held-out 2%)")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def machine() -> dict:
    from data_preprocess import machine as describe

    return describe([round(x, 2) for x in os.getloadavg()])


def commit() -> str:
    from data_preprocess import commit as lookup

    return lookup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the preset's train_iters")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the preset's train_iters")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tiny_curves_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        build_data(work)
        args.out.mkdir(parents=True, exist_ok=True)
        jobs = [
            ("pretrain", "tiny_pretrain.yaml", args.pretrain_steps, [], "pretraining loss (all tokens)"),
            ("sft", "tiny_sft.yaml", args.sft_steps, ["--set", "init_from=runs/tiny_pretrain/checkpoint"],
             "SFT loss (assistant tokens)"),
        ]
        for kind, config, steps, extra, ylabel in jobs:
            cmd = ["moonforge", "train", str(ROOT / "configs" / config), *extra]
            if steps:
                cmd += ["--set", f"train_iters={steps}"]
            seconds = run(cmd, work)
            run_dir = work / "runs" / config.removesuffix(".yaml")
            result = {"benchmark": f"tiny_{kind}_curve", "commit": commit(), "machine": machine(),
                      "command": " ".join(["moonforge", "train", f"configs/{config}", *cmd[3:]]),
                      "wall_s": round(seconds, 1), "config": _config(run_dir), "curve": curve(run_dir)}
            c = result["curve"]
            result["summary"] = {"first_loss": c["loss"][0], "mean_first_10": round(sum(c["loss"][:10]) / 10, 4),
                                 "mean_last_10": round(sum(c["loss"][-10:]) / 10, 4),
                                 "final_validation": c["validation"][-1]["loss"] if c["validation"] else None}
            out = args.out / f"tiny_{kind}_curve.json"
            out.write_text(json.dumps(result, indent=1) + "\n")
            plot(result, out.with_suffix(".png"), f"tiny model, {config}: {len(c['loss'])} steps", ylabel)
            print(f"{kind}: {result['summary']} -> {out}")
    return 0


def _config(run_dir: Path) -> dict:
    """The configuration the run recorded in its last checkpoint."""
    latest = (run_dir / "checkpoint" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoint" / latest / "meta.json").read_text())["train_config"]


if __name__ == "__main__":
    sys.exit(main())

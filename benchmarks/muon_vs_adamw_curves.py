"""Muon against AdamW on the tiny model: the pretraining preset (configs/tiny_pretrain.yaml) on the shared real
text, run twice at the same learning rate and weight decay, once per optimizer. Writes
benchmarks/results/tiny_muon_vs_adamw.{json,png}.

    python benchmarks/muon_vs_adamw_curves.py [--steps N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_curves import RESULTS, ROOT, build_data, commit, curve, machine, run, smoothed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="muon_curves_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        build_data(work)
        curves, commands, seconds = {}, {}, {}
        for optimizer in ("adamw", "muon"):
            out_dir = f"runs/tiny_{optimizer}"
            cmd = ["moonforge", "train", str(ROOT / "configs" / "tiny_pretrain.yaml"), "--set", f"optimizer={optimizer}",
                   "--set", f"output_dir={out_dir}", "--set", f"train_iters={args.steps}", "--set", "save_interval=null"]
            seconds[optimizer] = round(run(cmd, work), 1)
            commands[optimizer] = " ".join(["moonforge", "train", "configs/tiny_pretrain.yaml", *cmd[3:]])
            curves[optimizer] = curve(work / out_dir)
        summary = {name: {"mean_first_10": round(sum(c["loss"][:10]) / 10, 4),
                          "mean_last_10": round(sum(c["loss"][-10:]) / 10, 4),
                          "final_validation": c["validation"][-1]["loss"] if c["validation"] else None}
                   for name, c in curves.items()}
        result = {"benchmark": "tiny_muon_vs_adamw", "commit": commit(), "machine": machine(), "commands": commands,
                  "wall_s": seconds, "lr": "3e-3 for both (configs/tiny_pretrain.yaml)", "summary": summary,
                  "curves": curves}
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / "tiny_muon_vs_adamw.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        _plot(curves, out.with_suffix(".png"))
        print(json.dumps(summary, indent=1))
    return 0


def _plot(curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c["iteration"], smoothed(c["loss"]), label=f"{name} (train, 10-step mean)")
        if c["validation"]:
            ax.plot([v["iteration"] for v in c["validation"]], [v["loss"] for v in c["validation"]], "o--",
                    label=f"{name} (validation)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("tiny model pretraining, same learning rate: Muon vs AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

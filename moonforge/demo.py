"""``moonforge demo``: the seed's whole Moonlight workflow on a tiny model, on the CPU, in a few minutes.

Every step runs the ``moonforge`` command a user would type (through ``moonforge.cli.main``), so the demo
exercises the toolkit end to end, and its summary lists each command with its result:

     1  generate the demo's data (a corpus, instruction data, CMMLU/C-Eval-layout exams, a word list)
     2  moonforge tokenizer train            a tokenizer in Moonlight's format
     3  moonforge convert native-to-hf       a tiny random "pretrained" model, saved as a Hugging Face directory
     4  moonforge convert hf-to-native       ... converted to a moonforge checkpoint (the seed's hf2mcore)
     5  moonforge verify                     transformers' logits on the HF directory vs ours on the checkpoint
     6  moonforge data pretrain              corpus -> Megatron idxmap
     7  moonforge data sft                   instruction data -> SFT idxmap (packed)
     8  moonforge train (pretraining)        continued pretraining from the converted checkpoint
     9  moonforge train (SFT, idxmap)        fine-tuning from the pretraining checkpoint
    10  moonforge train (SFT, raw JSON)      the same from the JSON file (the seed's MP_DATASET_TYPE=raw)
    11  moonforge convert native-to-hf       export of the fine-tuned checkpoint (the seed's mcore2hf)
    12  moonforge verify                     the export against the checkpoint
    13-16  moonforge eval                 CMMLU and C-Eval layouts: the pretrained checkpoint, the fine-tuned
                                             checkpoints (idxmap, raw) and the export
    17  summary.md, summary.json and loss_curves.png

Training is one process in fp32, so runs are deterministic and fast on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moonforge.demo_data import FULL, QUICK, DemoSize

logger = logging.getLogger(__name__)

MARKER = ".moonforge-demo"
TASKS = "cmmlu,ceval-valid"
# What the seed (Pai-Megatron-Patch's Moonlight best practice) runs for each step, by step kind.
SEED_COMMANDS = {
    "tokenizer": "(none: Moonlight-16B-A3B-Instruct ships tiktoken.model and tokenizer_config.json)",
    "download": "wget .../Moonlight-16B-A3B-Instruct.tar && tar -xvf Moonlight-16B-A3B-Instruct.tar",
    "hf2mcore": "bash hf2mcore_moonlight_convertor.sh A3B HF_DIR MCORE_DIR 1 1 1 8 bf16 false",
    "verify": "(none: the seed has no logit comparison)",
    "data-pretrain": "bash run_make_pretraining_dataset_megatron.sh SlimPajama.json DeepSeekV2Tokenizer text "
                     "DATA_DIR HF_DIR",
    "data-sft": "bash run_build_idxmap_sft_dataset.sh alpaca_zh-train-general.json DeepSeekV2Tokenizer 1024 "
                "SFT_PREFIX HF_DIR true",
    "pretrain": "bash run_mcore_moonlight.sh dsw A3B 1 8 1e-5 1e-6 1024 1024 bf16 1 1 1 1 8 true true false false "
                "none false 100000 DATA_PREFIX DATA_PREFIX MCORE_DIR 1000000000 10000 OUT_PRETRAIN",
    "sft": "bash run_mcore_moonlight.sh dsw A3B 1 8 1e-5 1e-6 1024 1024 bf16 1 1 1 1 8 true true false true "
           "none false 100000 SFT_PREFIX SFT_PREFIX MCORE_DIR 10000 100 OUT_SFT",
    "sft-raw": "MP_DATASET_TYPE=raw bash run_mcore_moonlight.sh dsw A3B 1 8 1e-5 1e-6 1024 1024 bf16 1 1 1 1 8 "
               "true true false true none false 100000 alpaca_zh-train.json alpaca_zh-train.json MCORE_DIR 10000 "
               "100 OUT_SFT",
    "mcore2hf": "bash hf2mcore_moonlight_convertor.sh A3B MCORE_DIR HF_OUT 1 1 1 8 bf16 true HF_DIR",
    "eval": "accelerate launch -m lm_eval --model hf --model_args pretrained=HF_OUT,trust_remote_code=True "
            "--tasks cmmlu,ceval-valid --batch_size 16",
}


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and its command."""


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and steps of one demo run (the full demo, or the shortened ``--quick`` one)."""

    data: DemoSize
    vocab_size: int = 1024  # BPE ranks + 256 special ids
    hidden_size: int = 128
    pretrain_iters: int = 200
    pretrain_seq_len: int = 128
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    sft_iters: int = 250
    sft_seq_len: int = 256  # rows of the packed SFT idxmap: about 3 samples each
    sft_batch: int = 8
    raw_iters: int = 250
    raw_pad_len: int = 96
    raw_batch: int = 16
    sft_lr: float = 2e-3
    seed: int = 1234


FULL_PLAN = DemoPlan(data=FULL)
# Half the facts, and just enough fine-tuning to be clearly above chance; the raw-JSON run only shows its loss
# falling.
QUICK_PLAN = DemoPlan(data=QUICK, pretrain_iters=120, sft_iters=100, raw_iters=60)


@dataclass
class StepRecord:
    number: int
    title: str
    command: str
    seconds: float = 0.0
    result: str = ""
    output: str = ""
    seed: str = ""


@dataclass
class DemoSummary:
    workdir: str
    quick: bool
    steps: list[StepRecord] = field(default_factory=list)
    losses: dict[str, dict] = field(default_factory=dict)
    verify: dict[str, dict] = field(default_factory=dict)
    accuracy: dict[str, dict] = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the whole workflow on a tiny model (CPU, a few minutes)",
                            description="Build a tokenizer and a tiny Moonlight-architecture model, convert it, "
                                        "preprocess data, continue pretraining, fine-tune (idxmap and raw JSON), "
                                        "export, verify and evaluate, all with the moonforge commands.")
    parser.add_argument("--workdir", default="demo-work",
                        help="where every file of the demo goes (default demo-work); a previous demo's files "
                             "there are replaced")
    parser.add_argument("--quick", action="store_true", help="a shortened demo (about half the time)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch (default 1: more are faster only on an otherwise idle "
                             "machine, and many times slower as soon as another process is busy; docs/demo.md)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    # PyTorch's OpenMP threads spin while they wait for each other, and a model this small runs thousands of
    # short parallel regions per step: with a second process busy on a 2-core machine, two threads took 5.3 s
    # per pretraining step where one takes 0.26 s (two take 0.14 s on an idle machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    logger.info("PyTorch uses %d CPU thread(s)", args.threads)
    try:
        summary = Demo(Path(args.workdir), QUICK_PLAN if args.quick else FULL_PLAN, quick=args.quick).run()
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(previous)
    print(format_summary(summary))
    return 0


class Demo:
    """One demo run in ``workdir``: ``run()`` performs every step and returns the summary."""

    def __init__(self, workdir: Path, plan: DemoPlan, quick: bool = False):
        self.work = Path(workdir)
        self.plan = plan
        self.summary = DemoSummary(workdir=str(self.work), quick=quick)

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def run(self) -> DemoSummary:
        start = time.perf_counter()
        self.prepare_workdir()
        self.generate_data()
        self.make_tokenizer()
        self.create_base_model()
        self.convert("convert the HF model to a moonforge checkpoint", "hf-to-native", self.path("hf", "base"),
                     self.path("ckpt", "base"), "hf2mcore")
        self.verify("base", self.path("hf", "base"), self.path("ckpt", "base"))
        self.make_idxmaps()
        self.train("pretrain", "continued pretraining from the idxmap", self.pretrain_config(), "pretrain")
        self.train("sft-idxmap", "SFT from the SFT idxmap", self.sft_config("idxmap"), "sft")
        self.train("sft-raw", "SFT from the raw JSON file", self.sft_config("raw"), "sft-raw")
        sft = self.path("runs", "sft-idxmap", "checkpoint")
        self.convert("export the SFT checkpoint to HF", "native-to-hf", sft, self.path("hf", "sft"), "mcore2hf")
        self.verify("sft", self.path("hf", "sft"), sft)
        self.evaluate("pretrain", "the pretrained checkpoint", self.path("runs", "pretrain", "checkpoint"))
        self.evaluate("sft-idxmap", "the SFT (idxmap) checkpoint", sft)
        self.evaluate("sft-export", "the SFT export (HF directory)", self.path("hf", "sft"))
        self.evaluate("sft-raw", "the SFT (raw JSON) checkpoint", self.path("runs", "sft-raw", "checkpoint"))
        self.finish(time.perf_counter() - start)
        return self.summary

    def prepare_workdir(self) -> None:
        import importlib.util

        from moonforge.utils import atomic_write_text

        missing = [f"{module} ({extra})" for module, extra in (("transformers", "moonforge verify"),
                                                                ("lm_eval", "moonforge eval"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            raise DemoError(f"the demo needs {' and '.join(missing)}: pip install 'moonforge[test]'")
        work = self.work
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            if not (work / MARKER).is_file():
                raise DemoError(f"--workdir {work}: exists and holds files that are not a previous demo's; choose "
                                "an empty or new directory")
            logger.info("removing the previous demo in %s", work)
            shutil.rmtree(work)
        atomic_write_text(work / MARKER, "files written by `moonforge demo`; the next demo run replaces them\n")

    # ------------------------------------------------------------------ running commands
    def begin(self, title: str, command: str, seed: str = "") -> StepRecord:
        record = StepRecord(len(self.summary.steps) + 1, title, command, seed=SEED_COMMANDS.get(seed, ""))
        self.summary.steps.append(record)
        logger.info("=== step %d: %s", record.number, title)
        logger.info("$ %s", command)
        return record

    def cli(self, title: str, argv: list, output: Path | str, seed: str = "") -> StepRecord:
        """Run ``moonforge ARGV`` in this process; a non-zero exit status stops the demo. ``seed`` names the
        seed's equivalent command (a key of SEED_COMMANDS)."""
        from moonforge.cli import main

        argv = [str(a) for a in argv]
        record = self.begin(title, shlex.join(["moonforge", *argv]), seed)
        start = time.perf_counter()
        status = main(argv)
        record.seconds = time.perf_counter() - start
        record.output = self.show(output)
        if status != 0:
            raise DemoError(f"step {record.number} ({title}) failed with exit status {status}: {record.command}")
        return record

    def show(self, path: Path | str) -> str:
        """A path as the summary shows it: relative to the work directory."""
        try:
            return str(Path(path).relative_to(self.work))
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------ steps
    def generate_data(self) -> None:
        from moonforge.demo_data import generate

        record = self.begin("generate the demo's data", "(inside moonforge demo: moonforge.demo_data.generate)")
        start = time.perf_counter()
        data = generate(self.path("data"), self.plan.data, seed=self.plan.seed,
                        descriptions=lm_eval_descriptions())
        self.summary.data = data.summary()
        record.seconds = time.perf_counter() - start
        record.result = (f"{data.corpus_documents} corpus documents, {len(data.practice)} instruction samples, "
                         f"{len(data.exam)} exam questions in {len(data.topics)} subjects")
        record.output = "data/"

    def make_tokenizer(self) -> None:
        from moonforge.tokenizer import load_tokenizer

        record = self.cli("tokenizer in Moonlight's format",
                          ["tokenizer", "train", "--input", self.path("data", "lexicon.txt"),
                           "--out", self.path("tokenizer"), "--vocab-size", self.plan.vocab_size],
                          self.path("tokenizer"), "tokenizer")
        tokenizer = load_tokenizer(self.path("tokenizer"))
        record.result = f"{tokenizer.n_bpe} BPE tokens + 256 special ids"

    def create_base_model(self) -> None:
        """A random tiny model in Moonlight's architecture, saved as a moonforge checkpoint and exported by
        ``moonforge convert native-to-hf``, so that it has the layout of Moonlight's published directory."""
        from moonforge.checkpoint.native import CheckpointManager, write_checkpoint_skeleton
        from moonforge.model import build_model
        from moonforge.tokenizer import load_tokenizer

        config = demo_model_config(load_tokenizer(self.path("tokenizer")), self.plan.hidden_size)
        staging = self.path("ckpt", "random-init")
        write_checkpoint_skeleton(staging, config, self.path("tokenizer"))
        model = build_model(config, seed=self.plan.seed)
        CheckpointManager(staging).save(0, {"model": model}, {"note": "random initialisation of the demo model"})
        record = self.convert("a tiny random 'pretrained' model as an HF directory", "native-to-hf", staging,
                              self.path("hf", "base"), "download")
        counts = config.param_counts()
        record.result = (f"{counts['total'] / 1e6:.2f} M parameters, {config.num_hidden_layers} layers, "
                         f"{config.n_routed_experts} experts (top-{config.num_experts_per_tok}) + "
                         f"{config.n_shared_experts} shared, vocab {config.vocab_size}; {record.result}")

    def convert(self, title: str, direction: str, source: Path, out: Path, seed: str) -> StepRecord:
        source_flag = "--hf" if direction == "hf-to-native" else "--ckpt"
        record = self.cli(title, ["convert", direction, source_flag, source, "--out", out], out, seed)
        files = [p for p in out.rglob("*") if p.is_file()]
        record.result = f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB"
        return record

    def verify(self, name: str, hf_dir: Path, ckpt: Path) -> None:
        out = self.path("verify", f"{name}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        record = self.cli(f"verify {self.show(hf_dir)} (transformers) against {self.show(ckpt)}",
                          ["verify", "--hf", hf_dir, "--ckpt", ckpt, "--json", out], out, "verify")
        result = json.loads(out.read_text())
        self.summary.verify[name] = result
        record.result = (f"largest logit difference {result['max_abs_diff']:.1e}, top-1 agreement "
                         f"{result['top1_agreement']:.0%} over {result['tokens']} tokens")

    def make_idxmaps(self) -> None:
        summary = self.path("idxmap", "demo.summary.json")
        record = self.cli("pretraining corpus -> idxmap",
                          ["data", "pretrain", "--input", self.path("data", "corpus.jsonl"),
                           "--tokenizer", self.path("ckpt", "base"), "--json-keys", "text",
                           "--output-prefix", self.path("idxmap", "demo"), "--append-eod", "--workers", 0,
                           "--summary-json", summary, "--no-progress"],
                          self.path("idxmap", "demo_text_document.bin"), "data-pretrain")
        stats = json.loads(summary.read_text())
        record.result = f"{stats['documents']} documents, {stats['tokens']} tokens ({stats['dtype']})"
        summary = self.path("idxmap", "demo_sft.summary.json")
        record = self.cli("SFT data -> SFT idxmap (packed)",
                          ["data", "sft", "--input", self.path("data", "sft.json"),
                           "--tokenizer", self.path("ckpt", "base"), "--seq-len", self.plan.sft_seq_len,
                           "--output-prefix", self.path("idxmap", "demo_sft"), "--packing", "--workers", 0,
                           "--summary-json", summary, "--no-progress"],
                          self.path("idxmap", "demo_sft_text_document.bin"), "data-sft")
        stats = json.loads(summary.read_text())
        record.result = (f"{stats['samples']} samples in {stats['rows']} rows of {stats['seq_len']} tokens "
                         f"({stats['row_fill']:.0%} filled), {stats['target_tokens']} loss tokens")

    def train(self, name: str, title: str, config: dict, seed: str) -> None:
        import yaml

        from moonforge.train.metrics import read_metrics
        from moonforge.utils import atomic_write_text

        path = self.path("configs", f"{name}.yaml")
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        run_dir = Path(config["output_dir"])
        record = self.cli(title, ["train", path, "--nproc", 1], run_dir, seed)
        records = read_metrics(run_dir / "metrics.jsonl")
        train = [r["loss"] for r in records if r.get("split", "train") == "train"]
        valid = [r["loss"] for r in records if r.get("split") == "valid"]
        window = max(1, min(5, len(train) // 4))
        losses = {"first": train[0], "last": train[-1], "first_mean": sum(train[:window]) / window,
                  "last_mean": sum(train[-window:]) / window, "iterations": len(train), "valid": valid,
                  "metrics": str(run_dir / "metrics.jsonl")}
        self.summary.losses[name] = losses
        record.result = (f"loss {losses['first_mean']:.3f} -> {losses['last_mean']:.3f} (mean of the first and last "
                         f"{window} of {len(train)} iterations)")
        if valid:
            record.result += f"; validation {valid[0]:.3f} -> {valid[-1]:.3f}"

    def pretrain_config(self) -> dict:
        p = self.plan
        return {
            "init_from": str(self.path("ckpt", "base")), "output_dir": str(self.path("runs", "pretrain")),
            "seq_len": p.pretrain_seq_len, "micro_batch_size": p.pretrain_batch,
            "global_batch_size": p.pretrain_batch, "train_iters": p.pretrain_iters,
            "warmup_iters": p.pretrain_iters // 20, "lr": p.pretrain_lr, "min_lr": p.pretrain_lr / 10,
            "precision": "fp32", "log_interval": 20, "eval_interval": p.pretrain_iters // 4, "eval_iters": 2,
            "seed": p.seed,
            "data": {"type": "idxmap", "train": [str(self.path("idxmap", "demo_text_document"))], "split": "95,5,0"},
        }

    def sft_config(self, kind: str) -> dict:
        """Both SFT runs start from the pretraining run's checkpoint and see every instruction sample."""
        p = self.plan
        common = {"init_from": str(self.path("runs", "pretrain", "checkpoint")), "sft": True, "lr": p.sft_lr,
                  "min_lr": p.sft_lr / 10, "precision": "fp32", "log_interval": 20, "seed": p.seed}
        if kind == "idxmap":
            return {**common, "output_dir": str(self.path("runs", "sft-idxmap")), "seq_len": p.sft_seq_len,
                    "micro_batch_size": p.sft_batch, "global_batch_size": p.sft_batch, "train_iters": p.sft_iters,
                    "warmup_iters": p.sft_iters // 20,
                    "data": {"type": "idxmap", "train": [str(self.path("idxmap", "demo_sft_text_document"))],
                             "split": "100,0,0"}}
        return {**common, "output_dir": str(self.path("runs", "sft-raw")), "seq_len": p.raw_pad_len,
                "pad_len": p.raw_pad_len, "micro_batch_size": p.raw_batch, "global_batch_size": p.raw_batch,
                "train_iters": p.raw_iters, "warmup_iters": p.raw_iters // 20,
                "data": {"type": "raw", "train": [str(self.path("data", "sft.json"))]}}

    def evaluate(self, name: str, what: str, model: Path) -> None:
        out = self.path("eval", f"{name}.json")
        record = self.cli(f"evaluate {what}",
                          ["eval", "--model", model, "--tasks", TASKS, "--data-dir", self.path("data", "eval"),
                           "--apply-chat-template", "--batch-size", 32, "--output", out], out, "eval")
        accuracy = read_accuracy(out)
        self.summary.accuracy[name] = accuracy
        record.result = (f"accuracy {accuracy['overall']:.1%} of {accuracy['questions']} (cmmlu "
                         f"{accuracy['cmmlu']:.1%}, ceval-valid {accuracy['ceval-valid']:.1%}; chance 25%)")

    def finish(self, seconds: float) -> None:
        from moonforge.utils import atomic_write_text

        record = self.begin("summary and loss curves", "(inside moonforge demo)")
        plot_losses({name: Path(losses["metrics"]) for name, losses in self.summary.losses.items()},
                    self.path("loss_curves.png"))
        self.summary.seconds = seconds
        record.output = "summary.md, summary.json, loss_curves.png"
        record.result = "per run: runs/*/training.png, runs/*/tensorboard/"
        atomic_write_text(self.path("summary.json"),
                          json.dumps(self.summary.to_dict(), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(self.path("summary.md"), format_summary(self.summary))


# ---------------------------------------------------------------------------------------------------- helpers
def demo_model_config(tokenizer, hidden_size: int = 128):
    """The tiny preset's structure (Moonlight's: MLA, one dense layer, then MoE with shared experts and a sigmoid
    router), a little wider, with the vocabulary and special ids of the demo's tokenizer."""
    from moonforge.config import preset

    return preset("tiny").replace(
        vocab_size=tokenizer.n_bpe + 256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size // 2, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, max_position_embeddings=512, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.token_to_id("<|im_end|>"), pad_token_id=tokenizer.pad_id)


def lm_eval_descriptions() -> dict[str, str]:
    """lm-eval's instruction line for every CMMLU and C-Eval subject, by task name (empty without lm-eval)."""
    try:
        from moonforge.eval.tasks import lm_eval_tasks_dir
        tasks_dir = lm_eval_tasks_dir()
    except ImportError:
        return {}
    import yaml

    out = {}
    for folder in ("cmmlu", "ceval"):
        for path in sorted((tasks_dir / folder).glob("*.yaml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and isinstance(doc.get("task"), str) and isinstance(doc.get("description"), str):
                out[doc["task"]] = doc["description"]
    return out


def read_accuracy(path: Path) -> dict:
    """Group accuracies and the overall accuracy (weighted by questions) from an lm-eval results file."""
    results = json.loads(Path(path).read_text())
    groups = {}
    total = correct = 0.0
    for group in TASKS.split(","):
        groups[group] = results["results"][group]["acc,none"]
        for task in results["group_subtasks"][group]:
            n = results["n-samples"][task]["effective"]
            total += n
            correct += n * results["results"][task]["acc,none"]
    per_subject = {task: r["acc,none"] for task, r in results["results"].items() if task not in groups}
    return {**groups, "overall": correct / total, "questions": int(total), "subjects": per_subject,
            "file": str(path)}


RUN_TITLES = {"pretrain": "continued pretraining (idxmap)", "sft-idxmap": "SFT (packed SFT idxmap)",
              "sft-raw": "SFT (raw JSON)"}


def plot_losses(runs: dict[str, Path], out: Path) -> Path:
    """One figure with the training (and validation) loss of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moonforge.train.metrics import read_metrics

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, (name, path) in zip(axes[0], runs.items()):
        records = read_metrics(path)
        train = [r for r in records if r.get("split", "train") == "train"]
        valid = [r for r in records if r.get("split") == "valid"]
        ax.plot([r["iteration"] for r in train], [r["loss"] for r in train], label="train")
        if valid:
            ax.plot([r["iteration"] for r in valid], [r["loss"] for r in valid], "o-", label="validation")
        ax.set_title(RUN_TITLES.get(name, name))
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def format_summary(summary: DemoSummary) -> str:
    lines = [f"# moonforge demo{' (quick)' if summary.quick else ''}: {summary.seconds:.0f} s, files in "
             f"{summary.workdir}", "", "| step | what | seconds | result | files |", "|---:|---|---:|---|---|"]
    for s in summary.steps:
        lines.append(f"| {s.number} | {s.title} | {s.seconds:.1f} | {s.result} | {s.output} |")
    lines += ["", "## Commands (and the seed's equivalent)", "", "```"]
    for s in summary.steps:
        lines.append(f"{s.number:>2}. {s.command}")
        if s.seed:
            lines.append(f"    seed: {s.seed}")
    lines.append("```")
    if summary.accuracy:
        lines += ["", "## Accuracy on the demo's exams (0-shot, chat template; chance 25%)", "",
                  "| model | cmmlu | ceval-valid | overall |", "|---|---:|---:|---:|"]
        for name, a in summary.accuracy.items():
            lines.append(f"| {name} | {a['cmmlu']:.1%} | {a['ceval-valid']:.1%} | {a['overall']:.1%} |")
    return "\n".join(lines) + "\n"

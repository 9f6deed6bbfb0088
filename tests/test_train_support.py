"""Helpers shared by the training tests (test_train_*.py); no tests of their own.

Tiny data sets laid out as configs/tiny_*.yaml expect them, a tiny starting model, `moonforge train` in a
subprocess, metrics.jsonl reading, and SIGKILL of a whole process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXAMPLES = ROOT / "examples" / "moonlight"
COMPARED_KEYS = ("loss", "grad_norm", "lr", "loss_tokens", "consumed_samples", "expert_load_max_min")


def train_env(**extra: str) -> dict:
    """`moonforge` first on PATH, this checkout importable, one thread per process (2 cores are shared)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def build_tiny_data(root: Path, tokenizer_dir: Path, sft_seq_len: int | None = None) -> Path:
    """``root/data/tiny``: tokenizer, pretraining idxmap and (with ``sft_seq_len``) the two SFT idxmaps, the
    files docs/training.md builds with `moonforge tokenizer/data` for configs/tiny_*.yaml."""
    from moonforge.data.preprocess import preprocess_pretrain
    from moonforge.data.sft import build_sft_idxmap

    data = root / "data" / "tiny"
    shutil.copytree(tokenizer_dir, data / "tokenizer")
    corpus = [str(shared_data("pretrain", "clue_small_zh.jsonl")), str(shared_data("pretrain", "c4_demo_en.jsonl"))]
    preprocess_pretrain(corpus, tokenizer_dir, data / "pretrain", append_eod=True, workers=0, progress=False)
    if sft_seq_len:
        alpaca = [str(shared_data("sft", "alpaca_zh_demo.json")), str(shared_data("sft", "alpaca_en_demo.json"))]
        build_sft_idxmap(alpaca, tokenizer_dir, data / "sft_alpaca", sft_seq_len, workers=0, progress=False)
        # One ShareGPT record has no assistant reply; skipping it is what the docs' command does too.
        build_sft_idxmap([str(shared_data("sft", "sharegpt_zh_1K.jsonl"))], tokenizer_dir, data / "sft_sharegpt",
                         sft_seq_len, workers=0, skip_bad_lines=True, progress=False)
    return data


def write_tiny_hf_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random `tiny` model saved as a Hugging Face directory (Moonlight's tensor names) with the tokenizer."""
    from safetensors.torch import save_file

    from moonforge.checkpoint.hf import native_to_hf
    from moonforge.config import preset
    from moonforge.model import build_model

    config = preset("tiny")
    model = build_model(config, seed=seed)
    tensors = {}
    for name, tensor in model.state_dict().items():
        for hf_name, part in native_to_hf(name, tensor):
            tensors[hf_name] = part.contiguous().clone()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save(out / "config.json")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


def read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl in file order. A process killed while writing may leave one torn line, which
    the next run's first record then follows on the same line; such a line is dropped (at most one)."""
    records, torn = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            torn += 1
    assert torn <= 1, f"{path}: {torn} unreadable lines"
    return records


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("split", "train") == "train"]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its workers in sessions of their own, so a process
    group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_tree(pid: int) -> list[int]:
    pids = descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def moonforge_train(config: Path, overrides: dict, *extra: str, cwd: Path | None = None,
                    timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = ["moonforge", "train", str(config)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value_text(value)}"]
    cmd += list(extra)
    return subprocess.run(cmd, env=train_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def value_text(value) -> str:
    """A --set value: YAML/JSON text (None as null, lists as JSON)."""
    if value is None:
        return "null"
    if isinstance(value, (list, dict, bool)):
        return json.dumps(value)
    return str(value)


def failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"

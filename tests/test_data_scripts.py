"""The seed's data-preparation command lines, unchanged but for paths, on the project's small tokenizer.

Each test starts the example script in a subprocess (about as long as one ``moonforge`` start-up).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED, shared_data
from tests.test_data_preprocess import megatron_preprocess

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "moonlight"


def _env() -> dict:
    # The scripts call `moonforge`; put this interpreter's scripts directory first on PATH.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=str(ROOT), MOONFORGE_DATA_WORKERS="2")


def seed_block(marker: str) -> str:
    seed = SHARED / "seed" / "moonlight_best_practice_zh.md"
    if not seed.exists():
        pytest.skip(f"seed document not found: {seed}")
    for block in re.findall(r"```bash\n(.*?)```", seed.read_text(encoding="utf-8"), flags=re.S):
        if marker in block:
            return block
    raise AssertionError(f"no bash block with {marker} in {seed}")


@pytest.mark.slow  # a subprocess
def test_seed_pretraining_command(tokenizer, tokenizer_dir, tmp_path):
    """The seed's `bash run_make_pretraining_dataset_megatron.sh /mnt/.../SlimPajama.json DeepSeekV2Tokenizer text
    /mnt/moonlight-datasets/ /mnt/moonlight-ckpts/...` writes the prefix its training commands read."""
    block = seed_block("run_make_pretraining_dataset_megatron.sh")
    datasets, model_dir = tmp_path / "moonlight-datasets", tmp_path / "moonlight-ckpts" / "Moonlight-16B-A3B-Instruct"
    datasets.mkdir()
    shutil.copytree(tokenizer_dir, model_dir)
    # Like the seed's SlimPajama.json: JSONL records under a .json name.
    shutil.copy(shared_data("pretrain", "c4_demo_en.jsonl"), datasets / "SlimPajama.json")
    script = (block.replace("/workspace/Pai-Megatron-Patch/toolkits/pretrain_data_preprocessing", str(EXAMPLES))
              .replace("/mnt/moonlight-datasets", str(datasets))
              .replace("/mnt/moonlight-ckpts", str(tmp_path / "moonlight-ckpts")))
    run = subprocess.run(["bash", "-c", "set -e\n" + script], env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]

    megatron_preprocess(datasets / "SlimPajama.json", tokenizer, str(tmp_path / "ref"))
    for suffix in (".bin", ".idx"):
        produced = datasets / f"mmap_moonlight_datasets_text_document{suffix}"
        assert produced.read_bytes() == (tmp_path / f"ref_text_document{suffix}").read_bytes()


@pytest.mark.slow  # a subprocess
def test_sft_script_with_packing(tokenizer, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    records = json.loads(shared_data("sft", "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:60]
    src = tmp_path / "alpaca_zh-train.json"
    src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "moonlight-datasets"
    run = subprocess.run(["bash", str(EXAMPLES / "run_build_idxmap_sft_dataset.sh"), str(src), "DeepSeekV2Tokenizer",
                          "256", str(out) + "/", str(tokenizer_dir), "true"], env=_env(), capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    prefix = out / "mmap_moonlight_sft_datasets_text_document"
    meta = json.loads(Path(f"{prefix}.sft.json").read_text())
    assert meta["packing"] is True and meta["seq_len"] == 256 and meta["samples"] == 60
    tokens = IndexedDataset(str(prefix))
    assert len(tokens) == 60 and len(tokens.document_indices) - 1 == meta["rows"] < 60
    assert int(np.sum(tokens.sequence_lengths)) == meta["tokens"]


@pytest.mark.parametrize("script, args, message", [
    ("run_make_pretraining_dataset_megatron.sh", ["in.json", "Qwen2Tokenizer", "text", "out", "."],
     "TOKENIZER_NAME must be DeepSeekV2Tokenizer"),
    ("run_make_pretraining_dataset_megatron.sh", ["in.json", "DeepSeekV2Tokenizer"], "usage:"),
    ("run_build_idxmap_sft_dataset.sh", ["in.json", "DeepSeekV2Tokenizer", "1k", "out", "."],
     "SEQ_LEN must be a positive integer"),
    ("run_build_idxmap_sft_dataset.sh", ["in.json", "DeepSeekV2Tokenizer", "128", "out", ".", "yes"],
     "must be true or false"),
])
def test_script_argument_errors(script, args, message):
    run = subprocess.run(["bash", str(EXAMPLES / script), *args], env=_env(), capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr

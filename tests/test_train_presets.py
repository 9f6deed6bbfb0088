"""The preset configs: every one validates (and `moonforge train --dry-run` prints it), the Moonlight ones hold
the seed's defaults and a layout that fits the model, and the tiny ones train on the shared real data with
falling loss: pretraining (train and validation loss) and SFT (loss on assistant tokens only)."""

from __future__ import annotations

import math
import subprocess

import pytest
import yaml

from moonforge.config import ConfigError, preset
from moonforge.parallel import ParallelDims
from moonforge.train.config import TrainConfig
from tests.test_train_schedule import megatron_lrs
from tests.test_train_support import CONFIGS, build_tiny_data, failure, moonforge_train, read_metrics, \
    train_env, train_records

PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_every_preset_is_here():
    assert PRESETS == ["moonlight_16b_a3b_pretrain.yaml", "moonlight_16b_a3b_sft.yaml", "tiny_pretrain.yaml",
                       "tiny_sft.yaml"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_with_its_model(name):
    cfg = TrainConfig.from_yaml(CONFIGS / name)
    model = preset(cfg.model)
    p = cfg.parallel
    # The layout the preset asks for fits the model on the smallest world it needs (EP x ETP ranks).
    world = max(p.tp * p.pp * p.cp, p.ep * p.etp)
    ParallelDims.for_world(world, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=p.etp, sp=p.sp).validate(model, cfg.seq_len)
    train, warmup, decay = cfg.iterations()
    assert 0 <= warmup < decay <= train


@pytest.mark.parametrize("name, sft, iterations, data", [
    ("moonlight_16b_a3b_pretrain.yaml", False, (122070, 1, 122070),
     "/mnt/moonlight-datasets/mmap_moonlight_datasets_text_document"),
    ("moonlight_16b_a3b_sft.yaml", True, (10000, 100, 9900),
     "/mnt/moonlight-datasets/mmap_moonlight_sft_datasets_text_document"),
])
def test_moonlight_presets_hold_the_seed_defaults(name, sft, iterations, data):
    cfg = TrainConfig.from_yaml(CONFIGS / name)
    assert (cfg.model, cfg.sft, cfg.micro_batch_size, cfg.global_batch_size, cfg.seq_len) == \
        ("moonlight-16b-a3b", sft, 1, 8, 1024)
    assert (cfg.lr, cfg.min_lr, cfg.lr_decay_style, cfg.precision) == (1e-5, 1e-6, "cosine", "bf16")
    assert (cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.clip_grad) == (0.1, 0.9, 0.95, 1.0)
    p = cfg.parallel
    assert (p.tp, p.pp, p.cp, p.etp, p.ep, p.sp, p.data_parallel) == (1, 1, 1, 1, 8, False, "fsdp")
    assert (cfg.activation_checkpointing, cfg.optimizer_offload, cfg.save_interval) == ("none", 0.0, 100000)
    assert (cfg.aux_loss_coeff, cfg.expert_bias_update_rate) == (0.0, 1e-3)
    assert cfg.iterations() == iterations
    assert cfg.data.train == [data] and cfg.init_from == "/mnt/moonlight-ckpts/Moonlight-16B-A3B-Instruct"


@pytest.mark.slow  # a subprocess
def test_dry_run_prints_the_config_with_overrides():
    proc = subprocess.run(["moonforge", "train", str(CONFIGS / "moonlight_16b_a3b_sft.yaml"), "--dry-run",
                           "--set", "lr=2e-5", "--set", "parallel.ep=4", "--set", "data.train=[a, b]"],
                          env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure(proc)
    printed = TrainConfig.from_dict(yaml.safe_load(proc.stdout))
    assert (printed.lr, printed.parallel.ep, printed.data.train, printed.train_iters) == (2e-5, 4, ["a", "b"], 10000)

    with pytest.raises(ConfigError, match="parallel.epp"):
        TrainConfig.from_yaml(CONFIGS / "tiny_pretrain.yaml", ["parallel.epp=2"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer_dir):
    """A directory laid out as the tiny presets expect (data/tiny/...), the working directory of the runs."""
    root = tmp_path_factory.mktemp("tiny_presets")
    build_tiny_data(root, tokenizer_dir, sft_seq_len=TrainConfig.from_yaml(CONFIGS / "tiny_sft.yaml").seq_len)
    return root


@pytest.mark.slow  # a subprocess, about 80 CPU steps
def test_tiny_pretrain_preset_lowers_the_loss_on_real_text(workdir):
    steps = 80
    proc = moonforge_train(CONFIGS / "tiny_pretrain.yaml", {"train_iters": steps, "eval_interval": 20,
                                                             "save_interval": None}, cwd=workdir)
    assert proc.returncode == 0, failure(proc)
    records = read_metrics(workdir / "runs" / "tiny_pretrain" / "metrics.jsonl")
    train = train_records(records)
    valid = [r for r in records if r.get("split") == "valid"]
    losses = [r["loss"] for r in train]
    print("train loss every 10 steps:", [round(x, 3) for x in losses[::10]])
    print("validation loss:", [(r["iteration"], round(r["loss"], 3)) for r in valid])
    assert [r["iteration"] for r in train] == list(range(1, steps + 1))
    assert abs(losses[0] - math.log(4096)) < 0.05          # a random model predicts about uniformly
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.7
    assert [r["iteration"] for r in valid] == [20, 40, 60, 80]
    assert all(b["loss"] < a["loss"] for a, b in zip(valid, valid[1:])), valid
    assert valid[-1]["loss"] < losses[0] - 0.7
    # Every step ran at the learning rate Megatron's scheduler gives for the preset's schedule.
    cfg = TrainConfig.from_yaml(CONFIGS / "tiny_pretrain.yaml", [f"train_iters={steps}"])
    want = megatron_lrs(cfg.lr, cfg.min_lr, *cfg.iterations()[1:], steps, cfg.global_batch_size, cfg.lr_decay_style)
    assert all(math.isclose(r["lr"], w, rel_tol=1e-12, abs_tol=1e-18) for r, w in zip(train, want))
    assert (workdir / "runs" / "tiny_pretrain" / "checkpoint" / "iter_0000080" / "meta.json").is_file()
    assert (workdir / "runs" / "tiny_pretrain" / "training.png").stat().st_size > 0


@pytest.mark.slow  # a subprocess, about 60 CPU steps
def test_tiny_sft_preset_lowers_the_loss_on_assistant_tokens(workdir):
    from moonforge.data.loader import build_dataset
    from moonforge.tokenizer import load_tokenizer

    steps = 60
    proc = moonforge_train(CONFIGS / "tiny_sft.yaml", {"train_iters": steps, "save_interval": None}, cwd=workdir)
    assert proc.returncode == 0, failure(proc)
    train = train_records(read_metrics(workdir / "runs" / "tiny_sft" / "metrics.jsonl"))
    losses = [r["loss"] for r in train]
    print("SFT loss every 10 steps:", [round(x, 3) for x in losses[::10]])
    assert [r["iteration"] for r in train] == list(range(1, steps + 1))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.7

    # The loss is over assistant tokens only: each step's count of loss tokens is that of its global batch's
    # labels, read independently from the data set (alpaca and ShareGPT idxmaps, the preset's order and seed).
    cfg = TrainConfig.from_yaml(CONFIGS / "tiny_sft.yaml", [f"train_iters={steps}"])
    ds = build_dataset("sft", [str(workdir / p) for p in cfg.data.train], tokenizer=load_tokenizer(
        workdir / cfg.data.tokenizer), seq_len=cfg.seq_len, split="train", split_spec=cfg.data.split, seed=cfg.seed,
        num_samples=steps * cfg.global_batch_size)
    gbs = cfg.global_batch_size
    for record in train[:3]:
        first = (record["iteration"] - 1) * gbs
        rows = [ds[i] for i in range(first, first + gbs)]
        targets = sum(int((row["labels"] != -100).sum()) for row in rows)
        assert record["loss_tokens"] == targets < gbs * cfg.seq_len

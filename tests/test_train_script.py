"""examples/moonlight/run_mcore_moonlight.sh: the seed's training command lines, mapped to `moonforge train`.

The mapping tests run the script with MOONFORGE pointing at a recorder instead of moonforge, then read the
recorded command the way `moonforge train` does (its own parser and TrainConfig.from_yaml). The run tests start
the seed's command lines, taken from the seed document and changed only in paths and training length, on the
tiny model, and a two-node ENV=dlc job on this machine.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

from moonforge.config import ConfigError, preset
from moonforge.train.config import TrainConfig
from tests.conftest import SHARED, shared_data
from tests.test_train_support import EXAMPLES, build_tiny_data, failure, read_metrics, train_env, train_records, \
    write_tiny_hf_model

SCRIPT = EXAMPLES / "run_mcore_moonlight.sh"
RECORDER = """#!/usr/bin/env python3
import json, os, sys
keys = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
with open(os.environ["RECORD_TO"], "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}, f)
"""
CKPT = "Moonlight-16B-A3B-Instruct-to-mcore-tp1-pp1-etp1-ep8"


def seed_commands() -> dict[str, tuple[dict, list[str]]]:
    """The seed document's run_mcore_moonlight.sh command lines: {"pretrain" | "sft" | "sft_raw": (env, args)}."""
    seed = SHARED / "seed" / "moonlight_best_practice_zh.md"
    if not seed.exists():
        pytest.skip(f"seed document not found: {seed}")
    found = {}
    for block in re.findall(r"```bash\n(.*?)```", seed.read_text(encoding="utf-8"), flags=re.S):
        if "bash run_mcore_moonlight.sh" not in block:
            continue
        env = dict(re.findall(r'^export (\w+)="?([^"\n]*)"?$', block, flags=re.M))
        words = shlex.split(block[block.index("bash run_mcore_moonlight.sh"):].replace("\\\n", " "))
        args = words[2:]
        name = "pretrain" if args[17] == "false" else "sft_raw" if env.get("MP_DATASET_TYPE") == "raw" else "sft"
        found[name] = (env, args)
    assert sorted(found) == ["pretrain", "sft", "sft_raw"], sorted(found)
    return found


def relocate(args: list[str], root: Path) -> list[str]:
    """The seed's absolute paths, moved under ``root``."""
    moves = {"/mnt/": f"{root}/mnt/", "/workspace/": f"{root}/workspace/"}
    out = []
    for a in args:
        for old, new in moves.items():
            if a.startswith(old):
                a = new + a[len(old):]
        out.append(a)
    return out


def run_script(args: list[str], env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=train_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ mapping (no training)
@pytest.fixture(scope="module")
def fake_paths(tmp_path_factory):
    """The seed's inputs as placeholders: a Moonlight-16B-A3B config.json, idxmap file names, JSON files."""
    root = tmp_path_factory.mktemp("seed_paths")
    ckpt = root / "mnt" / "moonlight-ckpts" / CKPT
    ckpt.mkdir(parents=True)
    preset("moonlight-16b-a3b").save(ckpt / "config.json")
    datasets = root / "mnt" / "moonlight-datasets"
    datasets.mkdir(parents=True)
    for prefix in ("mmap_moonlight_datasets_text_document", "mmap_moonlight_sft_datasets_text_document"):
        for suffix in (".bin", ".idx"):
            (datasets / f"{prefix}{suffix}").touch()
    (datasets / "mmap_moonlight_sft_datasets_text_document.sft.json").write_text("{}")
    (root / "mnt" / "deepseek-datasets").mkdir(parents=True)
    (root / "mnt" / "deepseek-datasets" / "alpaca_zh-train.json").write_text("[]")
    recorder = root / "recorder.py"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    return root


def recorded(fake_paths: Path, args: list[str], env: dict | None = None) -> tuple[TrainConfig, dict, dict]:
    """Run the script against the recorder; the config `moonforge train` would run, its options, its env."""
    from moonforge.cli import build_parser

    record = fake_paths / "record.json"
    record.unlink(missing_ok=True)
    proc = run_script(args, {"MOONFORGE": str(fake_paths / "recorder.py"), "RECORD_TO": str(record), **(env or {})})
    assert proc.returncode == 0, failure(proc)
    data = json.loads(record.read_text())
    ns = build_parser().parse_args(data["argv"])
    assert ns.command == "train"
    return TrainConfig.from_yaml(ns.config, ns.overrides), {"nproc": ns.nproc, "dry_run": ns.dry_run}, data["env"]


def seed_args(name: str, root: Path, sft_prefix: bool = True) -> tuple[dict, list[str]]:
    env, args = seed_commands()[name]
    args = relocate(args, root)
    if name == "sft" and sft_prefix:
        # The seed passes its pretraining idxmap to SFT; SFT reads the SFT idxmap (see the rejection test).
        args[21] = args[21].replace("mmap_moonlight_datasets", "mmap_moonlight_sft_datasets")
    return env, args


def test_seed_pretraining_line_maps_every_argument(fake_paths):
    env, args = seed_args("pretrain", fake_paths)
    assert len(args) == 27 and args[16] == "false"  # the README form, FL=false
    cfg, opts, launch = recorded(fake_paths, args, env)
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.lr, cfg.min_lr, cfg.seq_len) == (1, 8, 1e-5, 1e-6, 1024)
    assert (cfg.precision, cfg.sft, cfg.pad_len, cfg.attention_backend) == ("bf16", False, None, "sdpa")
    p = cfg.parallel
    # SP=true with TP=1 is no sequence parallelism (as in the seed); DO=true is the sharded optimizer.
    assert (p.tp, p.pp, p.cp, p.etp, p.ep, p.sp, p.data_parallel) == (1, 1, 1, 1, 8, False, "fsdp")
    assert (p.pp0_layers, p.vp_layers) == (None, None)
    assert (cfg.activation_checkpointing, cfg.ac_layers, cfg.optimizer_offload) == ("none", None, 0.0)
    assert cfg.save_interval == 100000
    assert cfg.data.type == "idxmap" and cfg.data.valid == []
    assert cfg.data.train == [str(fake_paths / "mnt/moonlight-datasets/mmap_moonlight_datasets_text_document")]
    assert cfg.init_from == str(fake_paths / "mnt/moonlight-ckpts" / CKPT)
    assert (cfg.train_tokens, cfg.warmup_tokens, cfg.train_iters, cfg.warmup_iters) == (10**9, 10000, None, None)
    assert cfg.iterations() == (122070, 1, 122070)      # bash's 1000000000 / 8 / 1024 and 10000 / 8 / 1024
    name = ("pretrain-moonlight-A3B-lr-1e-5-minlr-1e-6-bs-1-gbs-8-seqlen-1024-pr-bf16-tp-1-pp-1-cp-1-ac-none-do-true-"
            "sp-true-ti-122070-wi-1")
    assert cfg.output_dir == str(fake_paths / "workspace/output_mcore_moonlight_pretrain/checkpoint" / name)
    assert (fake_paths / "workspace/output_mcore_moonlight_pretrain/log").is_dir()
    # dsw: this node only, one process per visible GPU (moonforge's default, so no --nproc).
    assert opts == {"nproc": None, "dry_run": False}
    assert (launch["NNODES"], launch["NODE_RANK"], launch["WORLD_SIZE"], launch["RANK"]) == ("1", "0", None, None)


def test_current_26_argument_form_is_the_27_argument_form_without_fl(fake_paths):
    env, args = seed_args("pretrain", fake_paths)
    with_fl, _, _ = recorded(fake_paths, args, env)
    without_fl, _, _ = recorded(fake_paths, args[:16] + args[17:], env)
    assert without_fl == with_fl


def test_seed_sft_lines_map_to_sft(fake_paths):
    env, args = seed_args("sft", fake_paths)
    cfg, _, _ = recorded(fake_paths, args, env)
    assert cfg.sft and cfg.data.type == "idxmap"
    assert (cfg.train_iters, cfg.warmup_iters, cfg.train_tokens) == (10000, 100, None)
    assert cfg.iterations() == (10000, 100, 9900)      # SFT decays over train - warmup, as the seed
    assert cfg.output_dir.endswith("/workspace/output_mcore_moonlight_finetune/checkpoint/finetune-moonlight-A3B-lr-"
                                   "1e-5-minlr-1e-6-bs-1-gbs-8-seqlen-1024-pr-bf16-tp-1-pp-1-cp-1-ac-none-do-true-"
                                   "sp-true-ti-10000-wi-100")

    env, args = seed_args("sft_raw", fake_paths)
    assert env == {"MP_DATASET_TYPE": "raw"}
    cfg, _, _ = recorded(fake_paths, args, env)
    alpaca = str(fake_paths / "mnt/deepseek-datasets/alpaca_zh-train.json")
    assert (cfg.sft, cfg.data.type, cfg.data.train, cfg.data.valid, cfg.pad_len) == (True, "raw", [alpaca], [alpaca],
                                                                                     1024)


def _set(args: list[str], **values) -> list[str]:
    """The 27-argument form with arguments replaced by name."""
    names = ["ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN", "PAD_LEN", "PR", "TP",
             "PP", "CP", "ETP", "EP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD", "SAVE_INTERVAL",
             "DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH", "TRAIN", "WARMUP", "OUTPUT_BASEPATH"]
    args = list(args)
    for key, value in values.items():
        args[names.index(key)] = str(value)
    return args


def test_layout_and_memory_options_map_to_their_keys(fake_paths):
    _, args = seed_args("pretrain", fake_paths)
    cfg, opts, _ = recorded(fake_paths, _set(args, TP=2, PP=2, CP=2, ETP=2, EP=4, SP="true", DO="false", FL="true",
                                             AC="offload", OPTIMIZER_OFFLOAD="0.5", PR="bf16", PAD_LEN=2048),
                            {"MP_PP0_LAYERS": "13", "MP_AC_LAYERS": "3", "MOONFORGE_NPROC": "4"})
    p = cfg.parallel
    assert (p.tp, p.pp, p.cp, p.etp, p.ep, p.sp, p.pp0_layers) == (2, 2, 2, 2, 4, True, 13)
    # OPTIMIZER_OFFLOAD needs the distributed optimizer: DO=false becomes true, as in the seed.
    assert (p.data_parallel, cfg.optimizer_offload) == ("fsdp", 0.5)
    assert (cfg.activation_checkpointing, cfg.ac_layers) == ("offload", 3)
    assert (cfg.precision, cfg.attention_backend, cfg.pad_len) == ("bf16", "varlen", None)  # PAD_LEN: raw data only
    assert opts["nproc"] == 4

    # FP8 products take whole weights: PR=fp8 with TP 1, and refused with TP 2 naming the keys.
    cfg, _, _ = recorded(fake_paths, _set(args, TP=1, EP=4, PR="fp8"), {"MOONFORGE_NPROC": "4"})
    assert (cfg.precision, cfg.parallel.tp, cfg.compile_blocks) == ("fp8", 1, True)
    with pytest.raises(ConfigError, match=r"'precision'.*parallel.tp 2"):
        recorded(fake_paths, _set(args, TP=2, EP=4, PR="fp8"), {"MOONFORGE_NPROC": "4"})

    cfg, _, _ = recorded(fake_paths, _set(args, PP=3, DO="false", AC="full", PR="fp16"),
                         {"MP_VP": "3", "MP_AC_LAYERS": "3", "MOONFORGE_PRECISION": "fp32"})
    assert (cfg.parallel.pp, cfg.parallel.vp_layers, cfg.parallel.data_parallel) == (3, 3, "replicate")
    # Megatron's uniform full recomputation recomputes every layer; MP_AC_LAYERS only groups them.
    assert (cfg.activation_checkpointing, cfg.ac_layers, cfg.precision) == ("full", None, "fp32")
    assert "-pr-fp32-" in cfg.output_dir

    cfg, _, _ = recorded(fake_paths, _set(args, AC="sel", TP=2, SP="false"))
    assert (cfg.activation_checkpointing, cfg.ac_layers, cfg.parallel.sp) == ("sel", None, False)


def test_dlc_takes_nodes_rank_and_gpus_from_the_platform(fake_paths):
    _, args = seed_args("pretrain", fake_paths)
    platform = {"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"}
    cfg, opts, env = recorded(fake_paths, _set(args, ENV="dlc"), platform)
    assert opts["nproc"] == 8          # KUBERNETES_CONTAINER_RESOURCE_GPU defaults to 8
    # WORLD_SIZE and RANK count nodes on the platform; the launcher gets them as NNODES and NODE_RANK.
    assert env == {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456",
                   "WORLD_SIZE": None, "RANK": None, "LOCAL_RANK": None}
    _, opts, _ = recorded(fake_paths, _set(args, ENV="dlc"), {**platform, "KUBERNETES_CONTAINER_RESOURCE_GPU": "2"})
    assert opts["nproc"] == 2


@pytest.mark.parametrize("change, env, message", [
    ({"ENV": "pai"}, {}, "ENV (argument 1) is 'pai'; use dsw"),
    ({"MODEL_SIZE": "A37B"}, {}, "only A3B"),
    ({"PR": "fp4"}, {}, "PR (argument 9) is 'fp4'"),
    ({"SP": "yes"}, {}, "SP (argument 15) is 'yes'; use true or false"),
    ({"FL": "maybe"}, {}, "FL (argument 17)"),
    ({"EP": "0"}, {}, "EP (argument 14) is '0'; it must be a positive integer"),
    ({"LR": "fast"}, {}, "LR (argument 5) is 'fast'; it must be a number"),
    ({"AC": "false"}, {}, "AC (argument 19) is 'false'; use none"),
    ({"OPTIMIZER_OFFLOAD": "static"}, {}, "OPTIMIZER_OFFLOAD (argument 20) is 'static'"),
    ({"OPTIMIZER_OFFLOAD": "1.5"}, {}, "a fraction in (0, 1]"),
    ({}, {"MP_PP0_LAYERS": "13"}, "needs PP > 1"),                    # PP=1, as the seed refuses it
    ({"PP": "4"}, {"MP_PP0_LAYERS": "13"}, "leaves 14 of the 27 layers for the other 3"),
    ({"AC": "full"}, {"MP_AC_LAYERS": "2"}, "must divide the 27 layers per stage"),
    ({}, {"MP_VP": "3"}, "MP_VP (layers per virtual pipeline stage) needs PP > 1"),
    ({}, {"MP_DATASET_TYPE": "json"}, "MP_DATASET_TYPE is 'json'"),
    ({}, {"MP_DATASET_TYPE": "raw"}, "needs SFT (argument 18)=true"),
    ({"DATASET_PATH": "/nonexistent/prefix"}, {}, "'/nonexistent/prefix' is not a Megatron dataset prefix"),
    ({"PRETRAIN_CHECKPOINT_PATH": "/nonexistent/ckpt"}, {}, "is not a directory"),
    ({"PRETRAIN_CHECKPOINT_PATH": "none"}, {}, "set MOONFORGE_TOKENIZER"),
    ({"TRAIN": "8191"}, {}, "less than one iteration of GLOBAL_BATCH_SIZE x SEQ_LEN = 8192 tokens"),
    ({"ENV": "dlc"}, {}, "WORLD_SIZE (the number of nodes) is ''"),
    ({"ENV": "dlc"}, {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "in [0, WORLD_SIZE=2)"),
    ({"ENV": "dlc"}, {"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR (the address of node 0) is not set"),
])
def test_invalid_values_are_refused_with_the_reason(fake_paths, change, env, message):
    _, args = seed_args("pretrain", fake_paths)
    record = fake_paths / "refused.json"
    proc = run_script(_set(args, **change), {"MOONFORGE": str(fake_paths / "recorder.py"),
                                             "RECORD_TO": str(record), **env})
    assert proc.returncode == 2, failure(proc)
    assert message in proc.stderr, proc.stderr
    assert not record.exists()  # nothing was launched


def test_wrong_argument_count_and_seed_pitfalls_are_refused(fake_paths):
    _, args = seed_args("pretrain", fake_paths)
    proc = run_script(args[:25])
    assert proc.returncode == 2 and "expected 26 arguments" in proc.stderr and "ENV MODEL_SIZE" in proc.stderr

    # The seed's SFT example passes the pretraining idxmap: that would train on every token.
    env, args = seed_args("sft", fake_paths, sft_prefix=False)
    proc = run_script(args, env)
    assert proc.returncode == 2 and "is a pretraining idxmap but SFT=true" in proc.stderr, failure(proc)

    # A checkpoint that is not Moonlight-16B-A3B needs MOONFORGE_MODEL.
    other = fake_paths / "other_model"
    other.mkdir(exist_ok=True)
    preset("tiny").save(other / "config.json")
    proc = run_script(_set(seed_args("pretrain", fake_paths)[1], PRETRAIN_CHECKPOINT_PATH=other))
    assert proc.returncode == 2 and "not Moonlight-16B-A3B's 27/2048/64; set MOONFORGE_MODEL" in proc.stderr


# ------------------------------------------------------------------ real runs on the tiny model
@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory, tokenizer_dir):
    """The seed's paths holding tiny-model data and a tiny starting checkpoint converted from Hugging Face, as the
    seed's hf2mcore step makes its starting checkpoint."""
    from moonforge.checkpoint.convert import hf_to_native
    from moonforge.data.sft import build_sft_idxmap

    root = tmp_path_factory.mktemp("seed_tiny")
    data = build_tiny_data(root, tokenizer_dir)
    datasets = root / "mnt" / "moonlight-datasets"
    datasets.mkdir(parents=True)
    for suffix in (".bin", ".idx"):
        (datasets / f"mmap_moonlight_datasets_text_document{suffix}").symlink_to(data / f"pretrain_text_document"
                                                                                         f"{suffix}")
    build_sft_idxmap([str(shared_data("sft", "alpaca_en_demo.json"))], tokenizer_dir,
                     datasets / "mmap_moonlight_sft_datasets", 1024, workers=0, progress=False)
    (root / "mnt" / "deepseek-datasets").mkdir(parents=True)
    (root / "mnt" / "deepseek-datasets" / "alpaca_zh-train.json").symlink_to(shared_data("sft", "alpaca_zh_demo.json"))
    hf = write_tiny_hf_model(root / "tiny_hf", tokenizer_dir)
    hf_to_native(hf, root / "mnt" / "moonlight-ckpts" / CKPT)
    return root


# The seed's lines ask for EP=8 (8 GPUs) in bf16; one CPU process runs them with EP=1 in fp32.
CPU_ENV = {"MOONFORGE_MODEL": "tiny", "MOONFORGE_PRECISION": "fp32", "MOONFORGE_TRAIN_ARGS": "--set parallel.ep=1"}


@pytest.mark.slow  # subprocesses: three short runs at the seed's sequence length 1024
@pytest.mark.parametrize("name", ["pretrain", "sft", "sft_raw"])
def test_seed_training_lines_run_on_the_tiny_model(tiny_paths, name):
    env, args = seed_args(name, tiny_paths)
    iterations = 3  # SFT decays over train - warmup iterations, which must exceed the one warmup iteration
    if name == "pretrain":
        args[24] = str(iterations * 8 * 1024)     # TRAIN_TOKENS: 3 iterations of GBS 8 x seq 1024
    else:
        args[24] = str(iterations)                # TRAIN_ITERS
        args[25] = "1"                            # WARMUP_ITERS
    # The seed's two SFT lines share an output directory and run name; here each line gets its own (a run
    # directory resumes, and moonforge refuses to resume a run on other data).
    base = tiny_paths / "runs" / name / Path(args[26]).name
    args[26] = str(base)
    proc = run_script(args, {**env, **CPU_ENV}, timeout=300)
    assert proc.returncode == 0, failure(proc)
    (run_dir,) = (base / "checkpoint").iterdir()
    assert run_dir.name.startswith("pretrain-tiny-lr-1e-5" if name == "pretrain" else "finetune-tiny-lr-1e-5")
    train = train_records(read_metrics(run_dir / "metrics.jsonl"))
    assert [r["iteration"] for r in train] == list(range(1, iterations + 1))
    assert all(r["consumed_tokens"] == r["iteration"] * 8 * 1024 for r in train)
    if name == "pretrain":
        assert all(r["loss_tokens"] == 8 * 1024 for r in train)
    else:
        assert all(0 < r["loss_tokens"] < 8 * 1024 for r in train)   # assistant tokens only
    meta = json.loads((run_dir / "checkpoint" / f"iter_{iterations:07d}" / "meta.json").read_text())
    assert meta["train_config"]["init_from"] == str(tiny_paths / "mnt" / "moonlight-ckpts" / CKPT)
    assert meta["train_config"]["sft"] == (name != "pretrain")
    assert meta["train_config"]["data"]["type"] == ("raw" if name == "sft_raw" else "idxmap")
    (log,) = (base / "log").iterdir()
    assert f"iter      {iterations}/{iterations}" in log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two "nodes" of one process each, on this machine
def test_dlc_two_nodes(tiny_paths, tmp_path):
    """ENV=dlc on 2 nodes (WORLD_SIZE=2, RANK=0/1) of 1 process each (KUBERNETES_CONTAINER_RESOURCE_GPU=1),
    with EP=2 across the nodes: both nodes run the same 26-argument command, as the platform starts them."""
    data = tiny_paths / "mnt" / "moonlight-datasets" / "mmap_moonlight_datasets_text_document"
    out = tmp_path / "output"
    args = ["dlc", "A3B", "1", "4", "1e-3", "1e-4", "64", "64", "fp32", "1", "1", "1", "1", "2", "false", "true",
            "false", "none", "false", "2", str(data), str(data), str(tiny_paths / "mnt" / "moonlight-ckpts" / CKPT),
            str(3 * 4 * 64), "0", str(out)]
    platform = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "KUBERNETES_CONTAINER_RESOURCE_GPU": "1", "MOONFORGE_MODEL": "tiny"}
    nodes = [subprocess.Popen(["bash", str(SCRIPT), *args], env=train_env(**platform, RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = []
    for node in nodes:
        try:
            logs.append(node.communicate(timeout=300)[0])
        finally:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n=====\n".join(log[-4000:] for log in logs)
    assert "on 2 node(s) (this is node 0)" in logs[0] and "on 2 node(s) (this is node 1)" in logs[1]
    assert "launching 1 process(es) per node on 2 node(s)" in logs[0]
    assert "layout DP=2 TP=1 PP=1 CP=1 EP=2 ETP=1" in logs[0]
    (run_dir,) = (out / "checkpoint").iterdir()
    assert [r["iteration"] for r in train_records(read_metrics(run_dir / "metrics.jsonl"))] == [1, 2, 3]
    meta = json.loads((run_dir / "checkpoint" / "iter_0000003" / "meta.json").read_text())
    assert meta["world_size"] == 2
    # One console log per node, named after the run as the seed names it.
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (out / "log").iterdir()) == ["node0.log", "node1.log"]

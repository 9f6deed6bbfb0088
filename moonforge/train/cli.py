"""``moonforge train CONFIG.yaml [--set key=value ...]``: continued pretraining or SFT.

Started without torchrun, it launches itself: one process per visible GPU (the seed's ``dsw`` mode), or
``--nproc N`` processes (gloo on CPUs). Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR
and MASTER_PORT set (or under torchrun / your scheduler, which sets RANK and WORLD_SIZE).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="continued pretraining or SFT (any parallel layout)")
    parser.add_argument("config", help="training config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lr=3e-4 --set parallel.ep=8 (repeatable)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes per node when launching (default: visible GPUs, or 1 on a CPU machine)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print it, then exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moonforge.train.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if "LOCAL_RANK" not in os.environ:
        nproc = args.nproc if args.nproc is not None else _visible_gpus()
        nnodes = int(os.environ.get("NNODES", "1"))
        if nproc > 1 or nnodes > 1:
            return _launch(args, max(nproc, 1), nnodes)
    from moonforge.train.trainer import Trainer, TrainingStopped

    try:
        Trainer(cfg).train()
    except TrainingStopped as e:
        logger.error("%s", e)
        return 3
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _launch(args: argparse.Namespace, nproc: int, nnodes: int) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={os.environ.get('NODE_RANK', '0')}",
                f"--master_addr={os.environ['MASTER_ADDR']}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    else:
        cmd.append("--standalone")
    cmd += ["-m", "moonforge.cli", "train", args.config]
    for item in args.overrides:
        cmd += ["--set", item]
    logger.info("launching %d process(es) per node on %d node(s): %s", nproc, nnodes, " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, env=env)
    # Stopping this launcher stops the job: torchrun passes the signal on to its workers.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    return proc.wait()

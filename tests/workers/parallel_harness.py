"""Run a few training steps of the tiny model in some parallel layout and write losses and grad norms as JSON.

Launched with torchrun by tests/test_parallel.py. Every layout starts from the same weights (a full state dict
file) and sees the same global batches, so its numbers must match the single-process run.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from moonforge.train.config import TrainConfig
from moonforge.train.trainer import Trainer


class FixedLoader:
    """Global batch order as the real loader: step t, micro m, rank r -> samples t*GBS + m*MBS*DP + r*MBS."""

    def __init__(self, samples, mbs, dp_rank, dp_size):
        self.samples, self.mbs, self.dp_rank, self.dp_size, self.consumed = samples, mbs, dp_rank, dp_size, 0

    def next_batch(self):
        start = self.consumed + self.dp_rank * self.mbs
        rows = [self.samples[(start + i) % len(self.samples)] for i in range(self.mbs)]
        self.consumed += self.mbs * self.dp_size
        return Batch({k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]})

    def state_dict(self):
        return {"consumed_samples": self.consumed}

    def load_state_dict(self, state):
        self.consumed = state["consumed_samples"]


class Batch:
    def __init__(self, tensors):
        self.input_ids = tensors["input_ids"]
        self.labels = tensors["labels"]
        self.document_ids = tensors.get("document_ids")

    def num_loss_tokens(self):
        return int((self.labels != -100).sum())


class NoCheckpoints:
    root = "none"

    def latest_iteration(self):
        return None

    def wait(self):
        pass

    def save(self, *a, **k):
        pass


def make_samples(n, seq, vocab, seed, packed, masked):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, seq + 1)
        sample = {"input_ids": ids[:-1], "labels": ids[1:].copy()}
        if masked:
            sample["labels"][: rng.integers(1, seq // 2)] = -100
        if packed:
            cut = int(rng.integers(2, seq - 2))
            sample["document_ids"] = np.array([0] * cut + [1] * (seq - cut))
        out.append(sample)
    return out


class HarnessTrainer(Trainer):
    def __init__(self, cfg, args):
        self.args = args
        super().__init__(cfg)

    def _build_data(self):
        samples = make_samples(64, self.cfg.seq_len, self.model_config.vocab_size, 0, self.args.packed,
                               self.args.masked)
        return FixedLoader(samples, self.cfg.micro_batch_size, self.meshes.coordinate("dp"), self.dims.dp), None

    def _build_checkpointing(self):
        return NoCheckpoints()

    def _load_initial_state(self):
        if self.args.weights == "none":  # keep the trainer's own (layout-independent) random initialisation
            return
        full = torch.load(self.args.weights, weights_only=True)
        for part in self.pm.parts:
            mine = {k: v for k, v in full.items() if k in part.state_dict()}
            set_model_state_dict(part, mine, options=StateDictOptions(full_state_dict=True, strict=False))
        if hasattr(self.optimizer, "sync_from_params"):
            self.optimizer.sync_from_params()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="JSON TrainConfig")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--masked", action="store_true")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    cfg = TrainConfig.from_dict(json.loads(args.config))
    trainer = HarnessTrainer(cfg, args)
    results = []
    for _ in range(args.steps):
        micro = [trainer.train_loader.next_batch() for _ in range(trainer.grad_accum)]
        r = trainer.train_step(micro)
        results.append({"loss": r.loss, "grad_norm": r.grad_norm})
    if trainer.rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's data sources: Megatron idxmap (pretraining or SFT), raw JSON SFT, or synthetic tokens for
benchmarks. Each data-parallel rank reads its own micro-batches of every global batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moonforge.config import ConfigError
from moonforge.parallel.mesh import Meshes
from moonforge.train.config import TrainConfig


def build_loaders(cfg: TrainConfig, meshes: Meshes, train_iters: int, vocab_size: int):
    dp_rank, dp_size = meshes.coordinate("dp"), meshes.dims.dp
    num_samples = train_iters * cfg.global_batch_size
    if cfg.data.type == "idxmap" and cfg.data.train == ["synthetic"]:
        train = SyntheticDataset(cfg.seq_len, cfg.seed, vocab_size)
        valid = SyntheticDataset(cfg.seq_len, cfg.seed + 1, vocab_size)
    else:
        train, valid = _real_datasets(cfg, num_samples)
    from moonforge.data.loader import DataLoader

    make = lambda ds: DataLoader(ds, micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank,  # noqa: E731
                                 dp_size=dp_size) if ds is not None else None
    return make(train), make(valid)


def _real_datasets(cfg: TrainConfig, num_samples: int):
    from moonforge.data.loader import build_dataset
    from moonforge.tokenizer import load_tokenizer

    tok_dir = cfg.data.tokenizer or cfg.init_from
    if not tok_dir:
        raise ConfigError("data.tokenizer is not set and there is no init_from directory to take the tokenizer from")
    tokenizer = load_tokenizer(Path(tok_dir))
    common = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, seed=cfg.seed, cache_dir=cfg.data.cache_dir)
    eval_samples = max(cfg.eval_iters * cfg.global_batch_size, 1)
    if cfg.data.type == "raw":
        pad_len = cfg.pad_len or cfg.seq_len
        train = build_dataset("raw", list(cfg.data.train), split="train", pad_len=pad_len, num_samples=num_samples,
                              **common)
        valid = (build_dataset("raw", list(cfg.data.valid), split="valid", pad_len=pad_len,
                               num_samples=eval_samples, **common) if cfg.data.valid else None)
        return train, valid
    kind = "sft" if cfg.sft else "pretrain"
    paths = [tuple(p) if isinstance(p, (list, tuple)) else p for p in cfg.data.train]
    extra = {"split_spec": cfg.data.split}
    if kind == "pretrain":
        extra["document_mask"] = cfg.data.document_mask
    train = build_dataset(kind, paths, split="train", num_samples=num_samples, **extra, **common)
    valid = None
    if cfg.eval_interval and not cfg.data.valid:  # the seed's idxmap validation: the split's second share
        valid = build_dataset(kind, paths, split="valid", num_samples=eval_samples, **extra, **common)
    elif cfg.data.valid and cfg.eval_interval:
        valid_paths = [tuple(p) if isinstance(p, (list, tuple)) else p for p in cfg.data.valid]
        valid = build_dataset(kind, valid_paths, split="train", split_spec="100,0,0", num_samples=eval_samples,
                              **common)
    return train, valid


class SyntheticDataset:
    """Deterministic random tokens (benchmarks): sample i depends only on (seed, i)."""

    def __init__(self, seq_len: int, seed: int, vocab_size: int = 4096):
        self.seq_len, self.seed, self.vocab_size = seq_len, seed, vocab_size
        self.fingerprint = f"synthetic-{seq_len}-{seed}-{vocab_size}"

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, i))
        tokens = rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}

"""From datasets to micro-batches: ``build_dataset`` (pretrain / sft / raw) and a resumable ``DataLoader``.

Every rank walks the same global sample order; in step t, micro-batch m, data-parallel rank r reads global
samples ``t*GBS + m*MBS*DP + r*MBS + [0, MBS)``. The loader's whole position is ``consumed_samples`` (the
datasets' shuffles are pure functions of seed and epoch), so a run resumed from a checkpoint, even with a
different data-parallel size, sees the same global batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from moonforge.data.records import DataError
from moonforge.model import IGNORE_INDEX

logger = logging.getLogger(__name__)

KINDS = ("pretrain", "sft", "raw")


@dataclass
class Batch:
    """One micro-batch on one data-parallel rank (CPU tensors)."""

    input_ids: torch.LongTensor  # [B, S]
    labels: torch.LongTensor  # [B, S]; IGNORE_INDEX where no loss; labels[t] is the target of input_ids[t]
    document_ids: torch.LongTensor | None  # [B, S] packed-document ids, or None for one document per row

    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class SampleDataset(Protocol):
    """Random access, deterministic: item i is the same on every rank and every run."""

    fingerprint: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, np.ndarray]: ...


def build_dataset(kind: str, paths, *, tokenizer, seq_len: int, split: str, split_spec: str = "99,1,0",
                  seed: int = 1234, cache_dir: str | None = None, document_mask: bool = False,
                  pad_len: int | None = None, num_samples: int | None = None, **options) -> SampleDataset:
    """A dataset of training rows.

    kind "pretrain": Megatron idxmap prefixes (optionally a weighted blend) read by megatron-core's GPT dataset;
    "sft": moonforge SFT idxmap prefixes; "raw": one JSON/JSONL file of alpaca / messages / ShareGPT records,
    padded or truncated to ``pad_len`` (default ``seq_len``). ``num_samples``: how many samples the run draws
    (Megatron sizes its indices with it; "sft"/"raw" cycle epochs, reshuffled each, up to it). Options for
    "raw": ``fmt``, ``overlong``, ``skip_bad_lines``, ``progress``.
    """
    if kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(paths, str):
        paths = [paths]
    if kind == "pretrain":
        from moonforge.data.pretrain import PretrainDataset

        _no_options(kind, options)
        return PretrainDataset(paths, tokenizer, seq_len=seq_len, split=split, split_spec=split_spec, seed=seed,
                               cache_dir=cache_dir, document_mask=document_mask, num_samples=num_samples)
    if any(isinstance(p, (tuple, list)) for p in paths):
        raise DataError(f"weighted blends are for kind 'pretrain'; kind {kind!r} takes plain paths")
    if kind == "sft":
        from moonforge.data.sft import SFTIdxmapDataset

        _no_options(kind, options)
        return SFTIdxmapDataset(paths, seq_len=seq_len, split=split, split_spec=split_spec, seed=seed,
                                num_samples=num_samples, document_mask=document_mask)
    from moonforge.data.sft import RawSFTDataset

    if len(paths) != 1:
        raise DataError(f"kind 'raw' reads one JSON/JSONL file per split, got {len(paths)} paths")
    return RawSFTDataset(str(paths[0]), tokenizer, pad_len=pad_len or seq_len, seed=seed, num_samples=num_samples,
                         document_mask=document_mask, **options)


def _no_options(kind: str, options: dict) -> None:
    if options:
        raise DataError(f"kind {kind!r} takes no options {sorted(options)}")


class DataLoader:
    """Global batch order independent of the number of ranks: in step t, micro-batch m, rank r gets global
    samples t*GBS + m*MBS*DP + r*MBS + [0, MBS). State = consumed_samples, so a run resumed with a different
    data-parallel size still sees the same global batches."""

    def __init__(self, dataset: SampleDataset, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch_size >= 1 and 0 <= dp_rank < dp_size, got {micro_batch_size}, "
                             f"{dp_rank}, {dp_size}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = int(consumed_samples)

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank."""
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        last = self.consumed_samples + self.micro_batch_size * self.dp_size
        if last > len(self.dataset):
            raise DataError(f"the dataset has {len(self.dataset)} samples and this step needs samples up to {last}; "
                            "build it with a larger num_samples (train iterations x global batch size)")
        items = [self.dataset[i] for i in range(first, first + self.micro_batch_size)]
        self.consumed_samples = last
        return collate(items)

    def state_dict(self) -> dict:
        state = {"consumed_samples": self.consumed_samples, "micro_batch_size": self.micro_batch_size,
                 "dp_size": self.dp_size, "dataset_fingerprint": self.dataset.fingerprint,
                 "dataset_len": len(self.dataset)}
        per_epoch = getattr(self.dataset, "rows_per_epoch", None)
        if per_epoch:  # for people reading the checkpoint; the position itself is consumed_samples
            state["epoch"], state["index_in_epoch"] = divmod(self.consumed_samples, per_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("dataset_fingerprint") != self.dataset.fingerprint:
            raise DataError("the checkpoint's data loader was saved for another dataset (fingerprint "
                            f"{state.get('dataset_fingerprint')} != {self.dataset.fingerprint}): same data paths, "
                            "split, seed, seq_len and sample count are needed to resume exactly")
        self.consumed_samples = int(state["consumed_samples"])
        if state.get("dp_size") not in (None, self.dp_size):
            logger.info("resuming data at sample %d with %d data-parallel ranks (saved with %d)",
                        self.consumed_samples, self.dp_size, state["dp_size"])


def collate(items: list[dict[str, np.ndarray]]) -> Batch:
    has_docs = {"document_ids" in item for item in items}
    if len(has_docs) != 1:
        raise ValueError("some samples carry document_ids and others do not")

    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([item[key] for item in items]).astype(np.int64))

    return Batch(stack("input_ids"), stack("labels"), stack("document_ids") if has_docs.pop() else None)

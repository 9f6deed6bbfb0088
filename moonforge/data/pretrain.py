"""Pretraining samples at train time: Megatron's GPT dataset over indexed-dataset prefixes.

Sample semantics are megatron-core's own (``GPTDataset`` / ``BlendedDataset`` built by
``BlendedMegatronDatasetBuilder``): documents shuffled per epoch and cut into windows of ``seq_len + 1``
tokens, a ``--split 99,1,0``-style contiguous train/valid/test division of the documents, weighted blends of
several prefixes, and index files cached on disk (``cache_dir``, by default ``<data dir>/cache``). The same
seed, prefixes, split and sample count give the same samples as a Megatron-LM / Pai-Megatron-Patch run.

With ``document_mask`` each sample also carries per-token document ids: the EOD token ends its document and
the next token starts a new one, which is Megatron's ``--reset-position-ids --reset-attention-mask``.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence
from unittest import mock

import numpy as np

from moonforge.data.indexed import check_prefix
from moonforge.data.records import DataError
from moonforge.data.sft import META_SUFFIX, split_range
from moonforge.model import IGNORE_INDEX

logger = logging.getLogger(__name__)

_SPLITS = ("train", "valid", "test")


class MegatronTokenizerView:
    """What megatron-core's GPT dataset reads from a tokenizer: the vocabulary size and the EOD id. No ``pad``:
    Megatron then pads partial validation samples with -1, which no real token can equal."""

    def __init__(self, tokenizer):
        self.vocab_size = int(tokenizer.n_vocab)
        self.eod = int(tokenizer.eod_id)
        # Megatron hashes this into its index-cache names.
        self.unique_identifiers = {"class": "moonforge", "vocab_size": self.vocab_size, "eod": self.eod}


def parse_blend(paths: Sequence[str] | Sequence[tuple[float, str]]) -> tuple[list[str], list[float] | None]:
    """Prefixes and optional weights from ``[(w, prefix), ...]``, ``[prefix, ...]`` or Megatron's flat
    ``["30", "a", "70", "b"]``."""
    if not paths:
        raise DataError("no data prefixes given")
    if all(isinstance(p, (tuple, list)) for p in paths):
        weights = [float(w) for w, _ in paths]
        prefixes = [str(p) for _, p in paths]
    else:
        from megatron.core.datasets.utils import get_blend_from_list

        prefixes, weights = get_blend_from_list([str(p) for p in paths])
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise DataError(f"blend weights must be non-negative with a positive sum, got {weights}")
    return prefixes, weights


def check_helpers() -> None:
    """megatron-core's C++ index builders ship compiled in its wheel; say so clearly when they are missing."""
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as e:
        raise DataError("megatron-core's compiled dataset helpers (megatron/core/datasets/helpers_cpp*.so) are "
                        f"missing ({e}); install the megatron-core==0.16.1 wheel for this platform, or build it "
                        "from source with a C++ compiler (pip install --no-binary megatron-core megatron-core)"
                        ) from None


class PretrainDataset:
    """Megatron GPT samples of ``seq_len + 1`` tokens as ``input_ids``/``labels`` (and ``document_ids``)."""

    def __init__(self, paths, tokenizer, *, seq_len: int, split: str = "train", split_spec: str = "99,1,0",
                 seed: int = 1234, cache_dir: str | None = None, document_mask: bool = False,
                 num_samples: int | None = None):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        check_helpers()
        prefixes, weights = parse_blend(paths)
        for prefix in prefixes:
            check_prefix(prefix)
            if Path(prefix + META_SUFFIX).exists():
                raise DataError(f"{prefix}: this is an SFT idxmap (it has {prefix + META_SUFFIX}); read it with "
                                "kind 'sft'")
        split_range(1, split_spec, split)  # validates split and spec with a clear message
        if weights is not None and num_samples is None:
            raise DataError("a weighted blend needs num_samples (how many samples the run draws) to size each part")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.tokenizer_view = MegatronTokenizerView(tokenizer)
        self.eod = self.tokenizer_view.eod
        self.document_mask = document_mask
        self.seq_len = seq_len
        config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_len, blend=(prefixes, weights),
                                  split=split_spec, path_to_cache=cache_dir, tokenizer=self.tokenizer_view,
                                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                                  create_attention_mask=False)
        index = _SPLITS.index(split)
        # Build only the requested split; the others get no indices (sizes must be non-None for weighted blends).
        config.split_matrix = [b if i == index else None for i, b in enumerate(config.split_matrix)]
        sizes = [num_samples if i == index else 0 for i in range(3)]
        try:
            with _single_process_rank():
                self.dataset = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[index]
        except Exception as e:
            if not isinstance(e, OSError) and not isinstance(e.__cause__, OSError):
                raise
            where = cache_dir or f"{prefixes[0]}/cache (Megatron's default)"
            raise DataError(f"cannot write the sample-index cache in {where} ({e.__cause__ or e}); pass a writable "
                            "cache_dir") from None
        if self.dataset is None or len(self.dataset) == 0:
            raise DataError(f"the {split} split of {prefixes} has no samples of {seq_len + 1} tokens; use more data, "
                            "a shorter seq_len or another split spec")
        self.length = len(self.dataset) if num_samples is None else min(int(num_samples), len(self.dataset))
        self.fingerprint = hashlib.sha256(repr((getattr(self.dataset, "unique_description_hash", None),
                                                prefixes, weights, seq_len, split, split_spec, seed,
                                                self.length)).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} is outside this dataset of {self.length} samples; build it with a larger "
                             "num_samples")
        item = self.dataset[i]
        input_ids = item["tokens"].numpy().astype(np.int64)
        labels = item["labels"].numpy().astype(np.int64)
        target = item["loss_mask"].numpy() > 0
        labels[~target] = IGNORE_INDEX
        out = {"input_ids": input_ids, "labels": labels}
        if self.document_mask:
            out["document_ids"] = eod_document_ids(input_ids, target, self.eod)
        return out


@contextmanager
def _single_process_rank():
    """megatron-core 0.16.1's BlendedDataset asks ``torch.distributed.get_rank()`` on an index-cache miss even
    when no process group exists (GPTDataset checks ``is_initialized`` first); answer rank 0 in that case."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    with mock.patch.object(dist, "get_rank", return_value=0):
        yield


def eod_document_ids(input_ids: np.ndarray, target: np.ndarray, eod: int) -> np.ndarray:
    """Per-token document ids: an EOD token closes its document; padding (a partial last validation sample,
    where Megatron masks the loss) is one more document."""
    ids = np.zeros(len(input_ids), dtype=np.int64)
    ids[1:] = np.cumsum(input_ids[:-1] == eod)
    # Token t is padding when label t-1 was (Megatron masks exactly the padded labels here).
    pad = np.zeros(len(input_ids), dtype=bool)
    pad[1:] = ~target[:-1]
    if pad.any():
        start = int(np.argmax(pad))
        ids[start:] = ids[start - 1] + 1
    return ids

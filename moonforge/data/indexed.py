"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``): atomic writing and checked opening.

Files are written by megatron-core's ``IndexedDatasetBuilder`` under temporary names and renamed only when
every output of a run is complete, ``.idx`` last: a failed or interrupted run leaves no pair of files that
Megatron, Pai-Megatron-Patch or moonforge would take for a dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moonforge.data.records import DataError
from moonforge.utils import atomic_write_text


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice for token ids: uint16 below 65500 ids, else int32 (``DType.optimal_dtype``)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


class IndexedWriter:
    """One indexed dataset being written under temporary names; ``commit`` publishes it."""

    def __init__(self, prefix: str | Path, dtype: type[np.number]):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.prefix.parent / f".{self.prefix.name}.partial-{os.getpid()}"
        self.tmp_bin, self.tmp_idx = Path(f"{tmp}-bin"), Path(f"{tmp}-idx")
        self.builder = IndexedDatasetBuilder(str(self.tmp_bin), dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add_document(self, tokens: np.ndarray, lengths: list[int]) -> None:
        """One document made of ``len(lengths)`` sequences (Megatron's ``add_document``)."""
        self.builder.add_document(tokens, lengths)
        self.documents += 1
        self.tokens += int(tokens.size)

    def finalize(self) -> None:
        self.builder.finalize(str(self.tmp_idx))
        for path in (self.tmp_bin, self.tmp_idx):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())

    def commit(self) -> None:
        idx, bin_ = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        idx.unlink(missing_ok=True)  # an old .idx must never pair with the new .bin
        os.replace(self.tmp_bin, bin_)
        os.replace(self.tmp_idx, idx)

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        finally:
            self.tmp_bin.unlink(missing_ok=True)
            self.tmp_idx.unlink(missing_ok=True)


def publish(writers: list[IndexedWriter], sidecars: dict[Path, str] | None = None) -> None:
    """Finalize all writers, then rename them in order, writing ``sidecars`` (path -> text) just before the
    last one: the last writer's ``.idx`` is the commit point of the whole output."""
    for writer in writers:
        writer.finalize()
    for i, writer in enumerate(writers):
        if i == len(writers) - 1:
            for path, text in (sidecars or {}).items():
                atomic_write_text(path, text)
                os.chmod(path, 0o666 & ~_umask())  # the temporary file was private; give it the usual mode
        writer.commit()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_prefix(prefix: str | Path) -> str:
    """The prefix as a string, if ``PREFIX.bin`` and ``PREFIX.idx`` exist; else an error with a likely fix."""
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix) and Path(prefix).exists():
            raise DataError(f"{prefix}: pass the dataset prefix without {suffix!r} ({prefix[:-len(suffix)]})")
    missing = [s for s in (".bin", ".idx") if not Path(prefix + s).exists()]
    if missing:
        hint = ""
        for guess in (f"{prefix}_text_document", f"{prefix}_document"):
            if Path(guess + ".idx").exists():
                hint = f"; did you mean {guess}?"
        raise DataError(f"{prefix}: no indexed dataset here (missing {', '.join(prefix + s for s in missing)})"
                        f"{hint}")
    return prefix


def open_indexed(prefix: str | Path):
    """megatron-core's ``IndexedDataset`` for a checked prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(check_prefix(prefix))

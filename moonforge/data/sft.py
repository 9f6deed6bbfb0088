"""Supervised fine-tuning data: the SFT idxmap (``moonforge data sft``), and the datasets that read it or raw JSON.

On-disk layout of an SFT idxmap with dataset prefix ``P`` (``--output-prefix X`` gives ``P = X_text_document``):

- ``P.bin`` / ``P.idx``: a Megatron indexed dataset of token ids (uint16 below 65500 ids, else int32). One
  *document* per training row; within it, one *sequence* per SFT sample, unpadded, in packing order. Without
  ``--packing`` every row holds one sample.
- ``P_loss_mask.bin`` / ``P_loss_mask.idx``: the same structure in uint8, 1 where the token is a loss target
  (assistant content and its closing ``<|im_end|>``), else 0.
- ``P.sft.json``: ``{"format": "moonforge-sft", "version": 1, "seq_len", "packing", "pad_id", "vocab_size",
  "rows", "samples", "tokens", "target_tokens", ...}``.

Both indexed datasets read with megatron-core's ``IndexedDataset``. At train time a row becomes ``seq_len``
positions: the samples' tokens back to back, then padding; ``labels[t]`` is the next token of the same
sample where that token is a target, else -100 (so no sample predicts the next one's first token), and
``document_ids`` number the samples 0, 1, ... with padding as one more document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from moonforge.data.chat import FORMATS, Encoded, encode_messages, to_messages
from moonforge.data.indexed import IndexedWriter, check_prefix, open_indexed, publish, token_dtype
from moonforge.data.pool import ordered_map
from moonforge.data.preprocess import Chunk, iter_chunks
from moonforge.data.records import (DEFAULT_MAX_LINE_BYTES, BadRecord, DataError, Location, SkipReport,
                                    bad_record_error, check_output_prefix, expand_inputs, parse_payload)
from moonforge.model import IGNORE_INDEX

logger = logging.getLogger(__name__)

SFT_FORMAT = "moonforge-sft"
SFT_VERSION = 1
OVERLONG = ("truncate", "drop")
LOSS_MASK_SUFFIX = "_loss_mask"
SFT_CHUNK_RECORDS = 64
META_SUFFIX = ".sft.json"


def fit_to_length(sample: Encoded, seq_len: int, overlong: str) -> tuple[Encoded | None, str]:
    """The sample within ``seq_len`` tokens, and what happened: "fits", "truncated", "dropped_overlong"
    (``overlong="drop"``) or "dropped_no_target" (truncation left no token to learn)."""
    if len(sample.tokens) <= seq_len:
        return sample, "fits"
    if overlong == "drop":
        return None, "dropped_overlong"
    cut = Encoded(sample.tokens[:seq_len], sample.target[:seq_len])
    if not cut.target[1:].any():
        return None, "dropped_no_target"
    return cut, "truncated"


def build_row(samples: Sequence[Encoded], seq_len: int, pad_id: int, with_document_ids: bool) -> dict[str, np.ndarray]:
    """One training row from samples that fit in ``seq_len``: see the module docstring."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    document_ids = np.full(seq_len, len(samples), dtype=np.int64)
    pos = 0
    for k, (tokens, target) in enumerate(samples):
        n = len(tokens)
        if pos + n > seq_len:
            raise ValueError(f"samples of {pos + n} tokens do not fit in a row of {seq_len}")
        input_ids[pos:pos + n] = tokens
        labels[pos:pos + n - 1] = np.where(target[1:], tokens[1:], IGNORE_INDEX)
        document_ids[pos:pos + n] = k
        pos += n
    row = {"input_ids": input_ids, "labels": labels}
    if with_document_ids:
        row["document_ids"] = document_ids
    return row


# ------------------------------------------------------------------------------------------------ building
@dataclass
class SFTSummary:
    output: str
    seq_len: int
    packing: bool
    records: int = 0
    samples: int = 0
    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    seconds: float = 0.0
    skipped: SkipReport = field(default_factory=SkipReport)

    def as_dict(self) -> dict:
        fill = self.tokens / max(self.rows * self.seq_len, 1)
        return {"output": self.output, "seq_len": self.seq_len, "packing": self.packing, "records": self.records,
                "samples": self.samples, "rows": self.rows, "tokens": self.tokens,
                "target_tokens": self.target_tokens, "row_fill": round(fill, 4), "truncated": self.truncated,
                "dropped_overlong": self.dropped_overlong, "dropped_no_target": self.dropped_no_target,
                "seconds": round(self.seconds, 3), "skipped": self.skipped.as_dict()}

    def log(self) -> None:
        d = self.as_dict()
        logger.info("wrote %s.{bin,idx} (+%s, %s): %d samples in %d rows of %d (%.1f%% filled), %d tokens, %d loss "
                    "targets, in %.1f s", self.output, LOSS_MASK_SUFFIX, META_SUFFIX, self.samples, self.rows,
                    self.seq_len, 100 * d["row_fill"], self.tokens, self.target_tokens, self.seconds)
        if self.truncated or self.dropped_overlong or self.dropped_no_target:
            logger.warning("over-long samples: %d truncated to %d tokens, %d dropped (--overlong drop), %d dropped "
                           "because truncation left no assistant token", self.truncated, self.seq_len,
                           self.dropped_overlong, self.dropped_no_target)
        if self.skipped.total:
            logger.warning("skipped %d record(s):\n%s", self.skipped.total, "\n".join(self.skipped.lines()))


_worker: dict = {}


def _init_worker(tokenizer_dir: str, fmt: str, seq_len: int, overlong: str) -> None:
    from moonforge.tokenizer import load_tokenizer

    _worker.update(tokenizer=load_tokenizer(tokenizer_dir), fmt=fmt, seq_len=seq_len, overlong=overlong)


class EncodedSFTChunk(NamedTuple):
    path: str
    items: list  # per record: (line, Encoded | None, outcome | BadRecord)
    n_bytes: int


def encode_record(tokenizer, payload, fmt: str, seq_len: int, overlong: str) -> tuple[Encoded | None, str | BadRecord]:
    """One SFT record to a sample that fits ``seq_len`` (or None) and its outcome (see ``fit_to_length``)."""
    record = parse_payload(payload)
    if isinstance(record, BadRecord):
        return None, record
    messages = to_messages(record, fmt)
    if isinstance(messages, BadRecord):
        return None, messages
    return fit_to_length(encode_messages(tokenizer, messages, max_tokens=seq_len), seq_len, overlong)


def _encode_chunk(chunk: Chunk) -> EncodedSFTChunk:
    w = _worker
    items = [(line, *encode_record(w["tokenizer"], p, w["fmt"], w["seq_len"], w["overlong"]))
             for line, p in zip(chunk.lines, chunk.payloads)]
    return EncodedSFTChunk(chunk.path, items, chunk.n_bytes)


def check_options(seq_len: int, fmt: str, overlong: str) -> None:
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise DataError(f"unknown --overlong {overlong!r}; choose one of {', '.join(OVERLONG)}")


def build_sft_idxmap(inputs: Sequence[str] | str, tokenizer_dir: str | Path, output_prefix: str | Path, seq_len: int,
                     *, packing: bool = False, fmt: str = "auto", overlong: str = "truncate", workers: int = 1,
                     skip_bad_lines: bool = False, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                     progress: bool = True) -> SFTSummary:
    """Tokenize SFT records into the SFT idxmap ``OUTPUT_PREFIX_text_document`` (layout in the module docstring).

    With ``packing``, consecutive samples share a row while they fit (next-fit, input order kept).
    """
    from moonforge.tokenizer import load_tokenizer

    check_options(seq_len, fmt, overlong)
    files = expand_inputs(inputs)
    check_output_prefix(output_prefix)
    tokenizer = load_tokenizer(tokenizer_dir)
    if not tokenizer.chat_template:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no chat_template (tokenizer_config.json); SFT samples "
                        "are rendered with it")
    pad_id = pad_token_id(tokenizer)
    prefix = f"{output_prefix}_text_document"
    summary = SFTSummary(prefix, seq_len, packing)
    start = time.perf_counter()
    writers: list[IndexedWriter] = []
    try:
        mask_writer = IndexedWriter(prefix + LOSS_MASK_SUFFIX, np.uint8)
        writers.append(mask_writer)
        token_writer = IndexedWriter(prefix, token_dtype(tokenizer.n_vocab))
        writers.append(token_writer)
        row: list[Encoded] = []

        def flush() -> None:
            token_writer.add_document(np.concatenate([s.tokens for s in row]), [len(s.tokens) for s in row])
            mask_writer.add_document(np.concatenate([s.target for s in row]).astype(np.uint8),
                                     [len(s.tokens) for s in row])
            summary.rows += 1
            row.clear()

        # Conversations cost far more per byte than plain text: small chunks keep every worker busy.
        chunks = iter_chunks(files, max_line_bytes, chunk_records=SFT_CHUNK_RECORDS)
        results = ordered_map(_encode_chunk, chunks, workers, _init_worker,
                              (str(tokenizer_dir), fmt, seq_len, overlong))
        total = sum(f.stat().st_size for f in files)
        with closing(results), tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="sft data",
                                    disable=not progress, mininterval=1.0) as bar:
            for chunk in results:
                for line, sample, outcome in chunk.items:
                    summary.records += 1
                    if isinstance(outcome, BadRecord):
                        if not skip_bad_lines:
                            raise bad_record_error(Location(chunk.path, line), outcome)
                        summary.skipped.add(outcome.reason, Location(chunk.path, line), outcome.detail)
                        continue
                    if sample is None:
                        setattr(summary, outcome, getattr(summary, outcome) + 1)
                        continue
                    summary.truncated += outcome == "truncated"
                    if row and (not packing or sum(len(s.tokens) for s in row) + len(sample.tokens) > seq_len):
                        flush()
                    row.append(sample)
                    summary.samples += 1
                    summary.tokens += len(sample.tokens)
                    summary.target_tokens += int(sample.target.sum())
                bar.update(chunk.n_bytes)
        if row:
            flush()
        if summary.samples == 0:
            raise DataError(f"{', '.join(map(str, files))}: no usable SFT samples ({summary.records} records; "
                            f"{summary.skipped.total} skipped, {summary.dropped_overlong + summary.dropped_no_target} "
                            "dropped as over-long)")
        summary.seconds = time.perf_counter() - start
        meta = {"format": SFT_FORMAT, "version": SFT_VERSION, "seq_len": seq_len, "packing": packing,
                "pad_id": pad_id, "vocab_size": tokenizer.n_vocab, "tokenizer": str(tokenizer_dir),
                "sources": [str(f) for f in files], **{k: v for k, v in summary.as_dict().items()
                                                      if k not in ("output", "seq_len", "packing", "seconds")}}
        publish(writers, {Path(prefix + META_SUFFIX): json.dumps(meta, indent=2, ensure_ascii=False) + "\n"})
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return summary


def pad_token_id(tokenizer) -> int:
    """The id that fills row padding (never a loss target, never attended to by real tokens)."""
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ------------------------------------------------------------------------------------------------ datasets
def split_range(n: int, split_spec: str, split: str) -> tuple[int, int]:
    """Megatron's contiguous train/valid/test ranges of ``n`` items for a spec such as "99,1,0"."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    names = ("train", "valid", "test")
    if split not in names:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(names)}")
    try:
        weights = [float(w) for w in split_spec.replace("/", ",").split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise DataError(f"bad split spec {split_spec!r}; use up to three non-negative weights such as '99,1,0'")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split_spec))
    bounds = matrix[names.index(split)]
    if bounds is None:
        raise DataError(f"split {split!r} is empty under split spec {split_spec!r}")
    return int(round(bounds[0] * n)), int(round(bounds[1] * n))


class EpochShuffle:
    """Index ``i`` -> row: epoch ``i // n`` visits all ``n`` rows in a permutation drawn from (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise DataError("the dataset split has no rows; use more data or another --split")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[j])


class _RowDataset:
    """Rows read by index, cycling epochs with a fresh shuffle each; ``len`` is ``num_samples`` or one epoch."""

    rows_per_epoch: int
    fingerprint: str

    def __init__(self, n_rows: int, seed: int, num_samples: int | None):
        self.rows_per_epoch = n_rows
        self.shuffle = EpochShuffle(n_rows, seed)
        self.length = n_rows if num_samples is None else int(num_samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} is outside this dataset of {self.length} samples")
        return self.row(self.shuffle(i))

    def row(self, r: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


def read_sft_meta(prefix: str) -> dict:
    path = Path(prefix + META_SUFFIX)
    if not path.exists():
        raise DataError(f"{prefix}: not a moonforge SFT idxmap (no {path.name}); build one with `moonforge data sft`. "
                        "Pai-Megatron-Patch's SFT idxmaps ([tokens | labels] rows of 2*seq_len) are not read: "
                        "rebuild them from the JSON source")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != SFT_FORMAT or meta.get("version") != SFT_VERSION:
        raise DataError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                        f"{SFT_FORMAT!r} version {SFT_VERSION}")
    return meta


class SFTIdxmapDataset(_RowDataset):
    """Rows of one or more SFT idxmaps (the ``split`` range of each, concatenated)."""

    def __init__(self, prefixes: Sequence[str], *, seq_len: int, split: str = "train", split_spec: str = "99,1,0",
                 seed: int = 1234, num_samples: int | None = None, document_mask: bool = False):
        self.seq_len = seq_len
        self.parts = []
        ident = []
        for prefix in prefixes:
            prefix = check_prefix(prefix)
            meta = read_sft_meta(prefix)
            if meta["seq_len"] != seq_len:
                raise DataError(f"{prefix}: built for seq_len {meta['seq_len']}, but training uses {seq_len}; rebuild "
                                f"with --seq-len {seq_len} or train with seq_len {meta['seq_len']}")
            tokens, masks = open_indexed(prefix), open_indexed(prefix + LOSS_MASK_SUFFIX)
            n_rows = len(tokens.document_indices) - 1
            if len(masks.document_indices) - 1 != n_rows or len(masks) != len(tokens):
                raise DataError(f"{prefix}: {prefix + LOSS_MASK_SUFFIX} does not match the token file; rebuild both")
            beg, end = split_range(n_rows, split_spec, split)
            self.parts.append((tokens, masks, meta, beg, end))
            ident.append((str(Path(prefix).resolve()), n_rows, meta["tokens"]))
        self.pad_id = self.parts[0][2]["pad_id"]
        self.with_document_ids = document_mask or any(p[2]["packing"] for p in self.parts)
        self.offsets = np.cumsum([0] + [end - beg for *_, beg, end in self.parts])
        super().__init__(int(self.offsets[-1]), seed, num_samples)
        self.fingerprint = _fingerprint("sft", ident, seq_len, split, split_spec, seed, self.length)

    def row(self, r: int) -> dict[str, np.ndarray]:
        part = int(np.searchsorted(self.offsets, r, side="right")) - 1
        tokens, masks, _, beg, _ = self.parts[part]
        doc = beg + r - int(self.offsets[part])
        first, last = tokens.document_indices[doc], tokens.document_indices[doc + 1]
        samples = [Encoded(tokens[i].astype(np.int64), masks[i].astype(bool)) for i in range(first, last)]
        return build_row(samples, self.seq_len, self.pad_id, self.with_document_ids)


class RawSFTDataset(_RowDataset):
    """A JSON / JSONL file of alpaca, messages or ShareGPT records read at train time (Pai's ``raw`` mode):
    one sample per row, truncated or dropped past ``pad_len`` and padded to it. The whole file is the split,
    as with Pai's separate ``--train-data-path`` / ``--valid-data-path`` files."""

    def __init__(self, path: str, tokenizer, *, pad_len: int, seed: int = 1234, num_samples: int | None = None,
                 document_mask: bool = False, fmt: str = "auto", overlong: str = "truncate",
                 skip_bad_lines: bool = False, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, progress: bool = True):
        check_options(pad_len, fmt, overlong)
        files = expand_inputs([path])
        self.pad_len = pad_len
        self.pad_id = pad_token_id(tokenizer)
        self.with_document_ids = document_mask
        self.summary = SFTSummary(str(path), pad_len, False)
        self.samples: list[Encoded] = []
        for chunk in tqdm(list(iter_chunks(files, max_line_bytes)), desc="raw sft data", disable=not progress):
            for line, payload in zip(chunk.lines, chunk.payloads):
                sample, outcome = encode_record(tokenizer, payload, fmt, pad_len, overlong)
                self.summary.records += 1
                if isinstance(outcome, BadRecord):
                    if not skip_bad_lines:
                        raise bad_record_error(Location(chunk.path, line), outcome)
                    self.summary.skipped.add(outcome.reason, Location(chunk.path, line), outcome.detail)
                elif sample is None:
                    setattr(self.summary, outcome, getattr(self.summary, outcome) + 1)
                else:
                    self.summary.truncated += outcome == "truncated"
                    self.samples.append(sample)
        self.summary.samples = self.summary.rows = len(self.samples)
        self.summary.tokens = sum(len(s.tokens) for s in self.samples)
        self.summary.target_tokens = sum(int(s.target.sum()) for s in self.samples)
        self.summary.log()
        super().__init__(len(self.samples), seed, num_samples)
        self.fingerprint = _fingerprint("raw", str(Path(path).resolve()), files[0].stat().st_size, pad_len, seed,
                                        self.length, self.summary.tokens)

    def row(self, r: int) -> dict[str, np.ndarray]:
        return build_row([self.samples[r]], self.pad_len, self.pad_id, self.with_document_ids)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

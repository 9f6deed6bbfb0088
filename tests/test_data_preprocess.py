"""Pretraining preprocessing: the bytes Megatron-LM's tools/preprocess_data.py writes, read back by megatron-core."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_data


def megatron_preprocess(jsonl: Path, tokenizer, output_prefix: str, key: str = "text", append_eod: bool = True):
    """The reference: Megatron-LM's tools/preprocess_data.py loop (without sentence splitting), driving
    megatron-core's IndexedDatasetBuilder the same way: one document per JSON line, the tokenizer's ids,
    ``add_document(ids, [len])``, dtype from ``DType.optimal_dtype(vocab size)``, EOD appended."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{output_prefix}_{key}_document.bin",
                                    dtype=DType.optimal_dtype(tokenizer.n_vocab))
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer.encode(json.loads(line)[key])
            lens = [len(ids)] if ids else []
            if ids and append_eod:
                ids.append(tokenizer.eod_id)
                lens[-1] += 1
            builder.add_document(ids, lens)
    builder.finalize(f"{output_prefix}_{key}_document.idx")


@pytest.mark.parametrize("name", ["clue_small_zh.jsonl", "c4_demo_en.jsonl"])
def test_bytes_identical_to_megatron_and_decode_to_source(name, tokenizer, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moonforge.data.preprocess import preprocess_pretrain

    src = shared_data("pretrain", name)
    megatron_preprocess(src, tokenizer, str(tmp_path / "ref"))
    summary = preprocess_pretrain([str(src)], tokenizer_dir, tmp_path / "ours", append_eod=True, workers=2,
                                  progress=False)
    for suffix in (".bin", ".idx"):
        ours = (tmp_path / f"ours_text_document{suffix}").read_bytes()
        assert ours == (tmp_path / f"ref_text_document{suffix}").read_bytes(), suffix

    texts = [json.loads(line)["text"] for line in src.read_text(encoding="utf-8").splitlines()]
    ds = IndexedDataset(str(tmp_path / "ours_text_document"))
    assert ds.index.dtype == np.uint16  # 4098 ids < 65500, Megatron's choice
    assert len(ds) == len(texts) == summary.documents
    assert summary.tokens == int(ds.sequence_lengths.sum())
    for i in range(0, len(texts), 7):
        assert ds[i][-1] == tokenizer.eod_id
        assert tokenizer.decode(ds[i][:-1].tolist()) == texts[i]


def test_several_files_globs_json_arrays_and_keys(tokenizer, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moonforge.data.preprocess import preprocess_pretrain

    records = [{"text": f"第{i}篇 document number {i}", "title": f"title {i}"} for i in range(30)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:10]),
                                            encoding="utf-8")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[10:20]) + "\n\n",
                                            encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(records[20:], indent=2), encoding="utf-8")
    summary = preprocess_pretrain([str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "c.json")], tokenizer_dir,
                                  tmp_path / "out" / "mix", json_keys=["text", "title"], append_eod=False,
                                  workers=0, progress=False)
    assert summary.documents == 30 and summary.files == 3
    for key in ("text", "title"):
        ds = IndexedDataset(str(tmp_path / "out" / f"mix_{key}_document"))
        assert [tokenizer.decode(ds[i].tolist()) for i in range(30)] == [r[key] for r in records]


def test_special_token_text_parsed_or_kept_as_text(tokenizer, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moonforge.data.preprocess import preprocess_pretrain

    text = "before <|im_end|> after"
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    im_end = tokenizer.special_tokens["<|im_end|>"]
    for mode, parse in (("parse", True), ("text", False)):
        preprocess_pretrain([str(src)], tokenizer_dir, tmp_path / mode, parse_special_tokens=parse, workers=0,
                            progress=False)
        ds = IndexedDataset(str(tmp_path / f"{mode}_text_document"))  # keep it open: items view its mmap
        ids = ds[0].tolist()
        assert (im_end in ids) is parse
        assert tokenizer.decode(ids) == text


def test_moonlight_size_vocab_gets_int32(tmp_path):
    from megatron.core.datasets.indexed_dataset import DType

    from moonforge.data.indexed import token_dtype

    assert token_dtype(163842) is np.int32 is DType.optimal_dtype(163840)
    assert token_dtype(4098) is np.uint16


def test_cli_writes_summary(tokenizer, tokenizer_dir, tmp_path):
    from moonforge.cli import main

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    rc = main(["data", "pretrain", "--input", str(src), "--tokenizer", str(tokenizer_dir), "--output-prefix",
               str(tmp_path / "o"), "--append-eod", "--workers", "0", "--summary-json", str(tmp_path / "s.json"),
               "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["documents"] == 5 and summary["skipped"]["total"] == 0
    assert summary["tokens"] == sum(len(tokenizer.encode(f"doc {i}")) + 1 for i in range(5))
    assert summary["documents_per_s"] > 0 and summary["mb_per_s"] > 0 and summary["tokens_per_s"] > 0


def test_document_encoder_fast_path_gives_the_same_ids(tokenizer):
    from moonforge.data.preprocess import document_encoder

    parse, plain = document_encoder(tokenizer, True), document_encoder(tokenizer, False)
    texts = ["plain text 中文", "ends with [EOS]", "<|im_end|><|im_user|>", "[not special] <| nor this",
             "[PAD][UNK]", "x" * 30_000]
    for text in texts:
        assert parse(text) == tokenizer.encode(text, allowed_special="all")
        assert plain(text) == tokenizer.encode(text, allowed_special=set())
    assert parse("a[EOS]") != plain("a[EOS]")

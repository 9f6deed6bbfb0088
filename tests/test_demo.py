"""``moonforge demo``: its generated data, and a shortened demo run end to end with its outputs checked against
independent readers (megatron-core for the idxmap, transformers for the export, a direct scoring of the exam)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from moonforge.demo_data import LETTERS, QUICK, generate, practice_questions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- data
def test_demo_data_is_deterministic_balanced_and_in_the_benchmark_layouts(tmp_path):
    from moonforge.eval.tasks import BENCHMARKS, read_subject_csv, upstream_subjects

    a, b = generate(tmp_path / "a", QUICK, seed=3), generate(tmp_path / "b", QUICK, seed=3)
    for rel in ("corpus.jsonl", "sft.json", "lexicon.txt", "eval/cmmlu/test/elementary_commonsense.csv",
                "eval/ceval/val/high_school_geography_val.csv"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert generate(tmp_path / "c", QUICK, seed=4).exam != a.exam

    benchmarks = {"cmmlu": (BENCHMARKS["cmmlu"], "cmmlu/test/{}.csv"),
                  "ceval": (BENCHMARKS["ceval-valid"], "ceval/val/{}_val.csv")}
    for topic in a.topics:
        bench, pattern = benchmarks[topic.benchmark]
        assert topic.subject in upstream_subjects(bench)  # lm-eval's own task definition applies
        rows = read_subject_csv(a.eval_dir / pattern.format(topic.subject), bench, topic.subject)
        assert len(rows) == QUICK.facts
        # every answer letter equally often: a constant guess scores exactly 25%
        assert Counter(r[bench.answer_column] for r in rows) == {letter: QUICK.facts // 4 for letter in LETTERS}
        for row in rows:
            assert [row[c] for c in LETTERS] == list(topic.values)


def test_exam_phrasing_is_held_out_and_every_fact_is_taught(tmp_path):
    data = generate(tmp_path, QUICK, seed=0)
    corpus = data.corpus.read_text(encoding="utf-8")
    sft = json.loads(data.sft.read_text(encoding="utf-8"))
    sft_prompts = {r["instruction"] for r in sft}
    assert len(sft) == len(practice_questions(data.topics)) == 2 * len(data.exam)
    for q in data.exam:
        assert q.text not in corpus and q.prompt() not in sft_prompts
        assert q.topic.statements[0].format(e=q.entity, v=q.value) in corpus
        drilled = [r for r in sft if q.entity in r["instruction"]]
        assert drilled and all(r["output"] == q.answer for r in drilled)


def test_demo_tokenizer_keeps_entities_and_answers_as_the_same_tokens_everywhere(tmp_path):
    from moonforge.tokenizer import load_tokenizer, train_moonlight_tokenizer

    data = generate(tmp_path, QUICK, seed=0)
    tok = load_tokenizer(train_moonlight_tokenizer([data.lexicon], tmp_path / "tok", vocab_size=1024))
    q = data.exam[0]
    entity, value = tok.encode(q.entity), tok.encode(q.value)

    def contains(ids: list[int], part: list[int]) -> bool:
        return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))

    statement = tok.encode(q.topic.statements[0].format(e=q.entity, v=q.value))
    prompt = tok.encode(q.prompt())
    assert contains(statement, entity) and contains(prompt, entity)
    assert contains(statement, value) and contains(prompt, value)


def test_demo_refuses_a_workdir_that_holds_other_files(tmp_path, capsys):
    from moonforge.cli import main

    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo", "--workdir", str(tmp_path), "--quick"]) == 1
    assert "not a previous demo's" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """One shortened demo run (about 1.5 minutes on 2 cores; one test, so that test distribution never runs it
    twice), then its outputs checked part by part."""
    from moonforge.cli import main

    work = tmp_path / "work"
    saved = dict(os.environ)
    try:
        assert main(["demo", "--workdir", str(work), "--quick"]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    summary = json.loads((work / "summary.json").read_text())
    check_every_output_exists(work, summary)
    check_idxmap_reads_back_with_megatron(work)
    check_losses_fall(work, summary)
    check_conversions_are_exact(work, summary)
    check_accuracy_by_transformers_scoring(work, summary)


def check_every_output_exists(work: Path, summary: dict) -> None:
    assert summary["quick"] and len(summary["steps"]) == 17
    assert all(s["command"] for s in summary["steps"])
    for rel in ("tokenizer/tiktoken.model", "hf/base/config.json", "hf/base/model.safetensors.index.json",
                "ckpt/base/latest", "idxmap/demo_text_document.bin", "idxmap/demo_sft_text_document_loss_mask.idx",
                "hf/sft/tokenizer.json", "eval/sft-export.md", "summary.md"):
        assert (work / rel).is_file(), rel
    for run in ("pretrain", "sft-idxmap", "sft-raw"):
        assert (work / "runs" / run / "checkpoint" / "latest").is_file()
        assert (work / "runs" / run / "training.png").read_bytes()[:8] == PNG_MAGIC
        assert list((work / "runs" / run / "tensorboard").glob("events.out.tfevents.*"))
    assert (work / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC
    text = (work / "summary.md").read_text()
    assert "moonforge convert hf-to-native" in text and "hf2mcore_moonlight_convertor.sh" in text


def check_idxmap_reads_back_with_megatron(work: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moonforge.tokenizer import load_tokenizer

    tok = load_tokenizer(work / "tokenizer")
    docs = [json.loads(line)["text"] for line in (work / "data" / "corpus.jsonl").read_text().splitlines()]
    ds = IndexedDataset(str(work / "idxmap" / "demo_text_document"))
    assert len(ds) == len(docs)
    for i in (0, len(docs) - 1):
        assert ds[i].tolist() == tok.encode(docs[i]) + [tok.eod_id]
    sft_meta = json.loads((work / "idxmap" / "demo_sft_text_document.sft.json").read_text())
    assert sft_meta["samples"] == len(json.loads((work / "data" / "sft.json").read_text()))


def check_losses_fall(work: Path, summary: dict) -> None:
    from moonforge.train.metrics import read_metrics

    for run, factor in (("pretrain", 0.3), ("sft-idxmap", 0.1), ("sft-raw", 0.5)):
        losses = [r["loss"] for r in read_metrics(work / "runs" / run / "metrics.jsonl") if r["split"] == "train"]
        assert len(losses) == summary["losses"][run]["iterations"] > 10
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < factor * first, (run, first, last)
    valid = summary["losses"]["pretrain"]["valid"]
    assert len(valid) >= 2 and valid[-1] < valid[0]


def check_conversions_are_exact(work: Path, summary: dict) -> None:
    from moonforge.loading import load_model

    base_hf, base_native = load_model(work / "hf" / "base"), load_model(work / "ckpt" / "base")
    for name, tensor in base_hf.state_dict().items():
        assert torch.equal(tensor, base_native.state_dict()[name]), name
    sft_native = load_model(work / "runs" / "sft-idxmap" / "checkpoint")
    sft_hf = load_model(work / "hf" / "sft")
    for name, tensor in sft_native.state_dict().items():
        assert torch.equal(tensor, sft_hf.state_dict()[name]), name
    assert not torch.equal(sft_native.model.embed_tokens.weight, base_native.model.embed_tokens.weight)
    for name in ("base", "sft"):
        assert summary["verify"][name]["max_abs_diff"] < 1e-4
        assert summary["verify"][name]["top1_agreement"] == 1.0


def check_accuracy_by_transformers_scoring(work: Path, summary: dict) -> None:
    """Score the exam with transformers alone (its model and the export's tokenizer.json), as a check of both
    the fine-tuning and lm-eval's numbers."""
    import csv

    import transformers

    from moonforge.demo import lm_eval_descriptions
    from moonforge.tokenizer import load_tokenizer

    hf_dir = work / "hf" / "sft"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ours = load_tokenizer(hf_dir)
    descriptions = lm_eval_descriptions()
    letters = [hf_tok.convert_tokens_to_ids(letter) for letter in LETTERS]
    files = {"cmmlu": sorted((work / "data" / "eval" / "cmmlu" / "test").glob("*.csv")),
             "ceval-valid": sorted((work / "data" / "eval" / "ceval" / "val").glob("*.csv"))}
    correct = total = 0
    for group, paths in files.items():
        for path in paths:
            subject = path.stem.removesuffix("_val")
            system = descriptions[f"{group}_{subject}"]
            with open(path, encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    question = row.get("Question") or row["question"]
                    answer = row.get("Answer") or row["answer"]
                    user = "\n".join([question] + [f"{c}. {row[c]}" for c in LETTERS]) + "\n答案："
                    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
                    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
                    assert ids == ours.apply_chat_template(messages, add_generation_prompt=True)
                    with torch.no_grad():
                        logits = model(torch.tensor([ids])).logits[0, -1]
                    correct += LETTERS[int(logits[letters].argmax())] == answer
                    total += 1
    accuracy = summary["accuracy"]
    assert total == accuracy["sft-export"]["questions"] == 4 * QUICK.facts
    assert accuracy["sft-export"]["overall"] == pytest.approx(correct / total)
    assert accuracy["sft-idxmap"]["overall"] == accuracy["sft-export"]["overall"]
    assert correct / total > 0.6, f"{correct}/{total} after fine-tuning; chance is 25%"
    assert accuracy["pretrain"]["overall"] < 0.45

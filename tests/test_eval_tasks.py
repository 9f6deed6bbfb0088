"""Local CMMLU / C-Eval data for lm-eval: discovery, validation errors, and the prompts lm-eval builds from it.

The prompts are checked against strings assembled by hand from the raw CSV rows and the upstream task
definition (description + question + options + "答案：", few-shot answers joined by blank lines).
"""

from __future__ import annotations

import csv
import shutil

import pytest

from moonforge.eval.tasks import EvalDataError, load_subject, prepare_tasks
from tests.conftest import shared_data


def _raw_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _prompt(row, question_key):
    return f"{row[question_key].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："


def _build(plan, num_fewshot):
    loaded = plan.task_manager().load(plan.tasks)
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=2)
    return loaded


def test_groups_cover_the_subjects_present(tmp_path):
    data = shared_data()
    plan = prepare_tasks(["cmmlu", "ceval-valid"], data, tmp_path)
    assert plan.coverage["cmmlu"].describe() == "12 of 67 subjects"
    assert plan.coverage["ceval-valid"].describe() == "12 of 52 subjects"
    assert "logical" in plan.coverage["cmmlu"].present and "agronomy" in plan.coverage["cmmlu"].missing
    assert not plan.include_defaults  # only local tasks: lm-eval's 14k-entry index is not scanned
    loaded = plan.task_manager().load(plan.tasks)
    assert sorted(loaded["groups"]) == ["ceval-valid", "cmmlu"]
    assert len(loaded["tasks"]) == 24
    assert sorted(loaded["group_map"]["cmmlu"]) == sorted(f"cmmlu_{s}" for s in plan.coverage["cmmlu"].present)


def test_rows_are_the_csv_strings(tmp_path):
    """Every field arrives as the file's text (C-Eval fields with quoted line breaks included)."""
    data = shared_data()
    for bench, subject, files in [
        ("cmmlu", "logical", {"test": data / "cmmlu/test/logical.csv", "dev": data / "cmmlu/dev/logical.csv"}),
        ("ceval-valid", "physician", {"val": data / "ceval/val/physician_val.csv",
                                      "dev": data / "ceval/dev/physician_dev.csv"}),
    ]:
        ds = load_subject(moonforge_benchmark=bench, moonforge_subject=subject,
                          moonforge_files={k: str(v) for k, v in files.items()}, version=1.0)
        for split, path in files.items():
            raw = _raw_rows(path)
            assert len(ds[split]) == len(raw)
            for got, want in zip(ds[split], raw):
                for key, value in got.items():
                    assert str(value) == want[key], (path, key)
    multiline = [r for f in (data / "ceval").glob("*/*.csv") for r in _raw_rows(f)
                 if any("\n" in v for v in r.values())]
    assert multiline, "the shared C-Eval files should include fields with line breaks"


@pytest.mark.parametrize("num_fewshot", [0, 5])
def test_prompts_match_hand_built_strings(tmp_path, num_fewshot):
    import yaml

    from moonforge.eval.tasks import lm_eval_tasks_dir

    data = shared_data()
    plan = prepare_tasks(["cmmlu_logical", "ceval-valid_physician"], data, tmp_path)
    loaded = _build(plan, num_fewshot)
    cases = [("cmmlu_logical", "cmmlu", data / "cmmlu/test/logical.csv", data / "cmmlu/dev/logical.csv",
              "Question", "Answer"),
             ("ceval-valid_physician", "ceval", data / "ceval/val/physician_val.csv",
              data / "ceval/dev/physician_dev.csv", "question", "answer")]
    for task_name, folder, eval_file, dev_file, q, a in cases:
        description = yaml.safe_load((lm_eval_tasks_dir() / folder / f"{task_name}.yaml").read_text())["description"]
        shots = "".join(_prompt(r, q) + f" {r[a]}\n\n" for r in _raw_rows(dev_file)[:num_fewshot])
        instances = sorted(loaded["tasks"][task_name].instances, key=lambda i: (i.doc_id, i.idx))
        assert len(instances) == 2 * 4
        for inst in instances:
            row = _raw_rows(eval_file)[inst.doc_id]
            assert inst.args[0] == description + shots + _prompt(row, q)
            assert inst.args[1] == " " + "ABCD"[inst.idx]


def _copy_subject(data, tmp_path, splits=("test", "dev"), subject="logical"):
    root = tmp_path / "data" / "cmmlu"
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "cmmlu" / split / f"{subject}.csv", root / split / f"{subject}.csv")
    return tmp_path / "data"


def test_missing_subject_file_names_subject_and_file(tmp_path):
    data_dir = _copy_subject(shared_data(), tmp_path, splits=("test",))
    for tasks in (["cmmlu_logical"], ["cmmlu"]):
        with pytest.raises(EvalDataError) as err:
            prepare_tasks(tasks, data_dir, tmp_path / "work")
        assert "'logical'" in str(err.value) and str(data_dir / "cmmlu/dev/logical.csv") in str(err.value)
        assert "file not found" in str(err.value)
    with pytest.raises(EvalDataError, match=r"cmmlu subject 'virology'.*cmmlu/test/virology.csv: file not found"):
        prepare_tasks(["cmmlu_virology"], data_dir, tmp_path / "work")


@pytest.mark.parametrize("damage, message", [
    (lambda text: text.replace("\n", "\n0,extra,", 2).replace("\n0,extra,", "\n", 1), r":3: \d+ fields where"),
    (lambda text: text.replace(",A\n", ",E\n", 1), r"answer 'E' is not one of A/B/C/D"),
    (lambda text: text.replace(",Answer", ",Solution", 1), r":1: header .* lacks column\(s\) \['Answer'\]"),
    (lambda text: text.rstrip("\n") + ',"unterminated\n', r"malformed CSV"),
    (lambda text: text.split("\n")[0] + "\n", r"no questions after the header"),
])
def test_malformed_csv_names_subject_file_and_line(tmp_path, damage, message):
    data_dir = _copy_subject(shared_data(), tmp_path)
    path = data_dir / "cmmlu/test/logical.csv"
    path.write_text(damage(path.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(EvalDataError, match=message) as err:
        prepare_tasks(["cmmlu"], data_dir, tmp_path / "work")
    assert f"cmmlu subject 'logical': {path}" in str(err.value)


def test_bad_requests(tmp_path):
    data = shared_data()
    with pytest.raises(EvalDataError, match="lm-eval has no such CMMLU subject"):
        prepare_tasks(["cmmlu_not_a_subject"], data, tmp_path)
    with pytest.raises(EvalDataError, match=r"no C-Eval data under .*expected .*ceval/val/<subject>_val.csv"):
        prepare_tasks(["ceval-valid"], data / "cmmlu", tmp_path)
    with pytest.raises(EvalDataError, match="not a directory"):
        prepare_tasks(["cmmlu"], tmp_path / "nowhere", tmp_path)
    # Any other lm-eval task passes through to lm-eval's own definitions.
    plan = prepare_tasks(["cmmlu_logical", "hellaswag"], data, tmp_path)
    assert plan.include_defaults and plan.tasks == ["cmmlu_logical", "hellaswag"]

"""lm-eval tasks with their data read from local directories: CMMLU and C-Eval in their original CSV layouts.

The task definitions (prompt, few-shot split, metrics, group averages) stay lm-eval's own: for each subject
found on disk we write a same-named YAML that ``include``s lm-eval's file and replaces only where the rows come
from (``custom_dataset``). The groups ``cmmlu`` and ``ceval-valid`` are rewritten to list the subjects present,
so a partial copy is averaged over what it holds (``coverage`` records "12 of 67 subjects").

Layouts under ``--data-dir DIR``::

    DIR/cmmlu/dev/<subject>.csv         DIR/cmmlu/test/<subject>.csv         (,Question,A,B,C,D,Answer)
    DIR/ceval/dev/<subject>_dev.csv     DIR/ceval/val/<subject>_val.csv      (id,question,A,B,C,D,answer[,explanation])
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moonforge.utils import atomic_write_text

logger = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """Local task data is missing or malformed."""


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark's local files map onto lm-eval's tasks."""

    group: str  # lm-eval group name, also what users pass to --tasks
    title: str
    lm_eval_dir: str  # folder under lm_eval/tasks holding the upstream YAMLs
    group_yaml: str
    data_dirs: tuple[str, ...]  # accepted folder names under --data-dir
    splits: tuple[str, ...]  # lm-eval split names; the folders have the same names
    file_pattern: str  # file name of one subject's split
    columns: tuple[str, ...]  # columns the task's templates read
    answer_column: str

    @property
    def task_prefix(self) -> str:
        return f"{self.group}_"

    def file_name(self, subject: str, split: str) -> str:
        return self.file_pattern.format(subject=subject, split=split)

    def subject_of(self, file_name: str, split: str) -> str | None:
        suffix = self.file_pattern.format(subject="", split=split)
        return file_name[:-len(suffix)] if file_name.endswith(suffix) and len(file_name) > len(suffix) else None


BENCHMARKS = {
    "cmmlu": Benchmark(group="cmmlu", title="CMMLU", lm_eval_dir="cmmlu", group_yaml="_cmmlu.yaml",
                       data_dirs=("cmmlu",), splits=("test", "dev"), file_pattern="{subject}.csv",
                       columns=("Question", "A", "B", "C", "D", "Answer"), answer_column="Answer"),
    "ceval-valid": Benchmark(group="ceval-valid", title="C-Eval", lm_eval_dir="ceval",
                             group_yaml="_ceval-valid.yaml", data_dirs=("ceval", "ceval-exam"),
                             splits=("val", "dev"), file_pattern="{subject}_{split}.csv",
                             columns=("question", "A", "B", "C", "D", "answer"), answer_column="answer"),
}
CHOICES = ("A", "B", "C", "D")


@dataclass
class Coverage:
    """Which subjects of a group were found under --data-dir."""

    present: list[str]
    total: int
    missing: list[str]

    def describe(self) -> str:
        return f"{len(self.present)} of {self.total} subjects"


@dataclass
class TaskPlan:
    """What to hand lm-eval: task names, a TaskManager include directory, and the subject coverage of groups."""

    tasks: list[str]
    include_dir: Path
    include_defaults: bool
    coverage: dict[str, Coverage] = field(default_factory=dict)

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.include_dir), include_defaults=self.include_defaults)


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def upstream_group(bench: Benchmark) -> dict:
    """lm-eval's own group definition (task list, aggregation, metadata)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / bench.lm_eval_dir / bench.group_yaml, resolve_func=False)


def upstream_subjects(bench: Benchmark) -> list[str]:
    return [name[len(bench.task_prefix):] for name in upstream_group(bench)["task"]]


def find_benchmark_dir(bench: Benchmark, data_dir: Path) -> Path:
    for name in bench.data_dirs:
        if (data_dir / name).is_dir():
            return data_dir / name
    layout = ", ".join(f"{data_dir / name}/{split}/{bench.file_name('<subject>', split)}"
                       for name in bench.data_dirs[:1] for split in bench.splits)
    raise EvalDataError(f"{bench.group}: no {bench.title} data under {data_dir}; expected {layout}")


def read_subject_csv(path: Path, bench: Benchmark, subject: str) -> list[dict]:
    """Rows of one subject's CSV as strings (``id`` as int), validated; errors name the subject, file and line."""
    where = f"{bench.group} subject {subject!r}: {path}"
    if not path.is_file():
        raise EvalDataError(f"{where}: file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None:
                raise EvalDataError(f"{where}: empty file")
            missing = [c for c in bench.columns if c not in header]
            if missing:
                raise EvalDataError(f"{where}:1: header {header} lacks column(s) {missing}; the original files "
                                    f"have {', '.join(bench.columns)}")
            keep = [(i, name) for i, name in enumerate(header) if name and name in bench.columns + ("id",)]
            rows, line = [], reader.line_num + 1
            for fields in reader:
                if len(fields) != len(header):
                    raise EvalDataError(f"{where}:{line}: {len(fields)} fields where the header has {len(header)} "
                                        "(a stray comma or an unquoted line break?)")
                row = {name: fields[i] for i, name in keep}
                if row[bench.answer_column] not in CHOICES:
                    raise EvalDataError(f"{where}:{line}: answer {row[bench.answer_column]!r} is not one of "
                                        f"{'/'.join(CHOICES)}")
                if "id" in row:
                    row["id"] = _int_id(row["id"], f"{where}:{line}")
                rows.append(row)
                line = reader.line_num + 1
    except csv.Error as e:
        raise EvalDataError(f"{where}:{reader.line_num}: malformed CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{where}: not UTF-8 ({e})") from None
    if not rows:
        raise EvalDataError(f"{where}: no questions after the header")
    return rows


def _int_id(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise EvalDataError(f"{where}: id {value!r} is not an integer") from None


def load_subject(moonforge_benchmark: str, moonforge_subject: str, moonforge_files: dict[str, str], **_):
    """``custom_dataset`` hook for lm-eval: the subject's splits as a ``datasets.DatasetDict``.

    lm-eval calls it with the task's metadata as extra keyword arguments, which are ignored.
    """
    import datasets

    bench = BENCHMARKS[moonforge_benchmark]
    splits = {}
    for split, path in moonforge_files.items():
        rows = read_subject_csv(Path(path), bench, moonforge_subject)
        columns = list(rows[0])
        features = datasets.Features({c: datasets.Value("int64" if c == "id" else "string") for c in columns})
        splits[split] = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns}, features=features)
    return datasets.DatasetDict(splits)


def subject_files(bench: Benchmark, root: Path, subject: str) -> dict[str, Path]:
    return {split: root / split / bench.file_name(subject, split) for split in bench.splits}


def subjects_on_disk(bench: Benchmark, root: Path, known: list[str]) -> list[str]:
    """Subjects with at least one split file, in lm-eval's order; unknown files are reported and skipped."""
    found: set[str] = set()
    for split in bench.splits:
        folder = root / split
        if not folder.is_dir():
            continue
        for file in folder.iterdir():
            subject = bench.subject_of(file.name, split)
            if subject is None:
                continue
            if subject not in known:
                logger.warning("ignoring %s: lm-eval has no task %s%s", file, bench.task_prefix, subject)
                continue
            found.add(subject)
    return [s for s in known if s in found]


def prepare_tasks(task_names: list[str], data_dir: str | Path | None, work_dir: str | Path) -> TaskPlan:
    """Resolve ``--tasks`` against ``--data-dir``: validate the local files and write override YAMLs.

    Groups ``cmmlu`` / ``ceval-valid`` cover the subjects present; an explicitly named subject must be present.
    Other task names pass through to lm-eval unchanged (their data must be reachable, e.g. in the HF cache).
    """
    include_dir = Path(work_dir)
    include_dir.mkdir(parents=True, exist_ok=True)
    plan = TaskPlan(tasks=list(task_names), include_dir=include_dir, include_defaults=False)
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise EvalDataError(f"--data-dir {data_dir}: not a directory")
    written: set[str] = set()
    for name in task_names:
        bench, subject = _match(name)
        if bench is None or data_dir is None:
            plan.include_defaults = True
            continue
        root = find_benchmark_dir(bench, data_dir)
        known = upstream_subjects(bench)
        if subject is None:
            present = subjects_on_disk(bench, root, known)
            if not present:
                raise EvalDataError(f"{bench.group}: no subject files under {root} (expected "
                                    f"{'/ and '.join(bench.splits)}/ holding {bench.file_name('<subject>', 'split')})")
            plan.coverage[bench.group] = Coverage(present, len(known), [s for s in known if s not in present])
            subjects = present
            _write_group(bench, present, include_dir)
        elif subject not in known:
            raise EvalDataError(f"{name}: lm-eval has no such {bench.title} subject; known: {', '.join(known)}")
        else:
            subjects = [subject]
        for s in subjects:
            if s not in written:
                _write_subject(bench, s, subject_files(bench, root, s), include_dir)
                written.add(s)
    for group, cov in plan.coverage.items():
        if cov.missing:
            logger.warning("%s: evaluating %s found under --data-dir (the group average covers these only)",
                           group, cov.describe())
    return plan


def _match(name: str) -> tuple[Benchmark | None, str | None]:
    for bench in BENCHMARKS.values():
        if name == bench.group:
            return bench, None
        if name.startswith(bench.task_prefix):
            return bench, name[len(bench.task_prefix):]
    return None, None


def _write_subject(bench: Benchmark, subject: str, files: dict[str, Path], include_dir: Path) -> None:
    for path in files.values():
        read_subject_csv(path, bench, subject)  # fail now, naming the file, rather than inside lm-eval
    task = f"{bench.task_prefix}{subject}"
    upstream = lm_eval_tasks_dir() / bench.lm_eval_dir / f"{task}.yaml"
    override = {
        "include": str(upstream),
        "task": task,
        "dataset_path": str(files[bench.splits[0]].parent.parent),
        "dataset_name": subject,
        "dataset_kwargs": {"moonforge_benchmark": bench.group, "moonforge_subject": subject,
                           "moonforge_files": {split: str(path) for split, path in files.items()}},
    }
    text = ("custom_dataset: !function moonforge.eval.tasks.load_subject\n"
            + yaml.safe_dump(override, allow_unicode=True, sort_keys=False))
    atomic_write_text(include_dir / f"{task}.yaml", text)


def _write_group(bench: Benchmark, subjects: list[str], include_dir: Path) -> None:
    group = upstream_group(bench)
    group["task"] = [f"{bench.task_prefix}{s}" for s in subjects]
    atomic_write_text(include_dir / bench.group_yaml, yaml.safe_dump(group, allow_unicode=True, sort_keys=False))

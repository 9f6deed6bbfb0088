"""Run lm-eval tasks on a model and report: lm-eval's results JSON plus a readable table.

``evaluate`` works with any lm-eval model object (moonforge's own ``MoonforgeLM`` or lm-eval's ``HFLM``), so
the same task set-up serves both sides of a comparison.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moonforge.eval.tasks import TaskPlan, prepare_tasks
from moonforge.utils import atomic_write_text

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_mode() -> None:
    """No hub access during evaluation (unless the user set the variables to 0 explicitly).

    The libraries read these variables at import time, so already-imported ones are told directly too.
    """
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    offline = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = offline
    if "datasets" in sys.modules:
        config = sys.modules["datasets"].config
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = offline


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval logs a hint for every task with a ``custom_dataset``; ours are the local CSV readers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_CUSTOM_DATASET_NOTICE = _DropCustomDatasetNotice()


@contextmanager
def prepared_tasks(tasks: list[str], data_dir: str | Path | None = None) -> Iterator[TaskPlan]:
    """Validate local task data and write lm-eval overrides for it, in a directory that lives for the block."""
    offline_mode()
    logging.getLogger("lm_eval.api.task").addFilter(_CUSTOM_DATASET_NOTICE)  # added once
    with tempfile.TemporaryDirectory(prefix="moonforge-eval-tasks-") as work_dir:
        yield prepare_tasks(tasks, data_dir, work_dir)


def run_tasks(lm, plan: TaskPlan, num_fewshot: int | None = None, limit: int | float | None = None,
              log_samples: bool = False, **kwargs) -> dict | None:
    """lm-eval's ``simple_evaluate`` on a prepared plan; the results dict on rank 0, else None.

    The results gain ``data_coverage`` (per group, the subjects found and missing under --data-dir) and
    ``requested_tasks``. Extra keyword arguments go to ``simple_evaluate``.
    """
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=plan.tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=plan.task_manager(), log_samples=log_samples,
                                      batch_size=getattr(lm, "batch_size", None), **kwargs)
    if results is not None:
        results["data_coverage"] = {group: dataclasses.asdict(c) for group, c in plan.coverage.items()}
        results["requested_tasks"] = list(plan.tasks)
    return results


def evaluate(lm, tasks: list[str], data_dir: str | Path | None = None, **kwargs) -> dict | None:
    """Evaluate an lm-eval model object (``MoonforgeLM``, or lm-eval's ``HFLM``) on ``tasks`` with data from
    ``data_dir``; keyword arguments as for ``run_tasks``."""
    with prepared_tasks(tasks, data_dir) as plan:
        return run_tasks(lm, plan, **kwargs)


# ---------------------------------------------------------------------------------------------------- report
def format_table(results: dict) -> str:
    """A markdown table: each group's average (with its subject coverage), then its subjects; acc and acc_norm
    first, then any other metric the tasks report."""
    rows = _table_rows(results)
    metrics = _metric_columns(results, [name for name, _ in rows])
    header = ["Task", "n-shot", "Samples"] + [metric_label(m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, label in rows:
        r = results["results"][name]
        samples = r.get("sample_len") or results.get("n-samples", {}).get(name, {}).get("effective", "")
        cells = [label, str(results.get("n-shot", {}).get(name, "")), str(samples)]
        cells += [_metric_cell(r, m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table_rows(results: dict) -> list[tuple[str, str]]:
    """(result key, label) in display order: requested items, each group followed by its members."""
    subtasks = results.get("group_subtasks", {})
    coverage = results.get("data_coverage", {})
    rows, seen = [], set()

    def add(name: str, depth: int) -> None:
        if name in seen or name not in results["results"]:
            return
        seen.add(name)
        label = ("  " * depth + "- " if depth else "") + name
        if name in coverage:
            c = coverage[name]
            label += f" ({len(c['present'])} of {c['total']} subjects)"
        rows.append((name, label))
        for child in subtasks.get(name, []):
            add(child, depth + 1)

    top = [n for n in results.get("requested_tasks", []) if n in results["results"]]
    for name in top + [n for n in subtasks if n not in top] + list(results["results"]):
        add(name, 0)
    return rows


def _metric_columns(results: dict, names: list[str]) -> list[str]:
    found = []
    for name in names:
        for key in results["results"][name]:
            if "," in key and "_stderr," not in key and key not in found:
                found.append(key)
    order = {"acc,none": 0, "acc_norm,none": 1}
    return sorted(found, key=lambda k: (order.get(k, 2), found.index(k)))


def _metric_cell(result: dict, key: str) -> str:
    value = result.get(key)
    if value is None or isinstance(value, str):
        return "" if value is None else value
    metric, filt = key.split(",", 1)
    stderr = result.get(f"{metric}_stderr,{filt}")
    text = f"{value:.4f}"
    if isinstance(stderr, (int, float)) and math.isfinite(stderr):
        text += f" ± {stderr:.4f}"
    return text


def metric_label(key: str) -> str:
    metric, filt = key.split(",", 1)
    return metric if filt == "none" else f"{metric} ({filt})"


def write_results(results: dict, output: str | Path) -> tuple[Path, Path]:
    """lm-eval's results JSON at ``output`` and the table next to it (``.md``), both written atomically."""
    from lm_eval.utils import handle_non_serializable

    output = Path(output)
    table_path = output.with_suffix(".md")
    if table_path == output:
        raise ValueError(f"--output {output}: give a .json file name; the table goes next to it as .md")
    payload = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_text(output, json.dumps(payload, indent=2, default=handle_non_serializable, ensure_ascii=False))
    atomic_write_text(table_path, format_table(results))
    return output, table_path


def write_samples(results: dict, path: str | Path) -> Path:
    """Per-request records (arguments, model responses, metrics), one JSON line per sample."""
    from lm_eval.utils import handle_non_serializable

    lines = []
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            lines.append(json.dumps({"task": task, **sample}, default=handle_non_serializable, ensure_ascii=False))
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)

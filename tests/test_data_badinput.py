"""Bad input: every case ends in its documented outcome within seconds, with no half-written output.

Default: stop with ``file:line`` and the reason, and no output files. ``--skip-bad-lines``: the good records are
written and the bad ones counted by reason.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moonforge.data.records import DataError

GOOD = b'{"text": "a good document"}\n'

# name -> (file bytes, bad line, reason); every other line is GOOD.
PRETRAIN_CASES = {
    "malformed_json": (GOOD + b'{"text": "unterminated\n' + GOOD, 2, "malformed_json"),
    "truncated_last_line": (GOOD + b'{"text": "cut o', 2, "malformed_json"),
    "nul_byte": (GOOD + b'{"text": "a\x00b"}\n', 2, "malformed_json"),
    "deep_nesting": (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n" + GOOD, 1, "malformed_json"),
    "array_line": (GOOD + b"[1, 2]\n", 2, "not_an_object"),
    "string_line": (GOOD + b'"just a string"\n' + GOOD, 2, "not_an_object"),
    "missing_key": (GOOD + GOOD + b'{"body": "x"}\n', 3, "missing_key"),
    "number_value": (b'{"text": 42}\n' + GOOD, 1, "not_a_string"),
    "list_value": (GOOD + b'{"text": ["a", "b"]}\n', 2, "not_a_string"),
    "null_value": (GOOD + b'{"text": null}\n', 2, "not_a_string"),
    "empty_text": (GOOD + b'{"text": ""}\n', 2, "empty_text"),
    "whitespace_text": (GOOD + b'{"text": " \\n\\t "}\n', 2, "empty_text"),
    "invalid_utf8": (GOOD + b'{"text": "\xff\xfe bad"}\n', 2, "invalid_utf8"),
    "lone_surrogate": (GOOD + b'{"text": "a\\ud800b"}\n', 2, "invalid_unicode"),
    "huge_line": (GOOD + b'{"text": "' + b"x" * 3_000_000 + b'"}\n' + GOOD, 2, "line_too_long"),
    "array_missing_key": (b'[\n  {"text": "a"},\n  {"body": "b"}\n]\n', 3, "missing_key"),
}
MAX_LINE = 1_000_000


def _run(tokenizer_dir, src: Path, out: Path, **kw):
    from moonforge.data.preprocess import preprocess_pretrain

    return preprocess_pretrain([str(src)], tokenizer_dir, out / "o", append_eod=True, progress=False,
                               max_line_bytes=MAX_LINE, **kw)


@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_pretrain_bad_input_stops_or_skips(case, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data, line, reason = PRETRAIN_CASES[case]
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        _run(tokenizer_dir, src, out, workers=0)
    assert str(err.value).startswith(f"{src}:{line}: ") and f"[{reason}]" in str(err.value)
    assert not out.exists() or list(out.iterdir()) == []

    summary = _run(tokenizer_dir, src, out, workers=0, skip_bad_lines=True)
    assert dict(summary.skipped.counts) == {reason: 1}
    assert summary.skipped.examples[reason][0].startswith(f"{src}:{line}: ")
    good = data.count(GOOD) + (case == "array_missing_key")
    ds = IndexedDataset(str(out / "o_text_document"))
    assert len(ds) == summary.documents == good
    assert sorted(p.name for p in out.iterdir()) == ["o_text_document.bin", "o_text_document.idx"]
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("data, message", [
    (b"", "no usable documents"),
    (b"\n\n  \n", "no usable documents"),
    (b'[{"text": "a"}, {"text": }]', "malformed JSON array"),
    (b'[{"text": "a"}] trailing', "unexpected data after the end of the JSON array"),
    (b'[{"text": "a\xff"}]', "invalid UTF-8 in a JSON array file"),
])
def test_pretrain_unusable_files(data, message, tokenizer_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    for skip in (False, True):
        with pytest.raises(DataError, match=message):
            _run(tokenizer_dir, src, tmp_path / "out", workers=0, skip_bad_lines=skip)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_all_lines_bad_with_skip_writes_nothing(tokenizer_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"x": 1}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"no usable documents \(2 skipped\)"):
        _run(tokenizer_dir, src, tmp_path / "out", workers=1, skip_bad_lines=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_paths_and_options(tokenizer_dir, tmp_path):
    from moonforge.data.preprocess import preprocess_pretrain
    from moonforge.tokenizer import TokenizerError

    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD)
    cases = [
        (dict(inputs=[str(tmp_path / "nope.jsonl")]), "no such file"),
        (dict(inputs=[str(tmp_path / "*.parquet")]), "no file matches this pattern"),
        (dict(inputs=[str(tmp_path)]), "is a directory"),
        (dict(output_prefix=tmp_path), "--output-prefix is a directory"),
        (dict(json_keys=["text", "text"]), "distinct keys"),
    ]
    for kw, message in cases:
        args = dict(inputs=[str(src)], tokenizer_dir=tokenizer_dir, output_prefix=tmp_path / "o") | kw
        with pytest.raises(DataError, match=message):
            preprocess_pretrain(**args, progress=False)
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        preprocess_pretrain([str(src)], tmp_path, tmp_path / "o", progress=False)


def test_random_corruption_never_crashes(tokenizer, tokenizer_dir, tmp_path):
    """Randomly damaged JSONL: skipped records + written documents account for every non-blank line, and the
    written documents are exactly the lines that are valid by the documented rules."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = random.Random(1234)
    lines = [json.dumps({"text": f"document {i} 文档 {'x' * rng.randrange(1, 40)}"}, ensure_ascii=False).encode()
             for i in range(300)]
    damaged = []
    for line in lines:
        line = bytearray(line)
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            op, at = rng.randrange(4), rng.randrange(len(line) + 1)
            if op == 0 and line:
                line[min(at, len(line) - 1)] = rng.randrange(256)
            elif op == 1:
                line[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
            elif op == 2:
                del line[at:at + rng.randrange(1, 6)]
            else:
                line[at:at] = rng.choice([b'"', b"\\", b"{", b"}", b"\\ud800", b"\\u0000", b"\r"])
        damaged.append(bytes(line))
    data = b"\n".join(damaged) + b"\n"
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)

    expected = []
    records = [r for r in data.split(b"\n") if r.strip()]
    for raw in records:
        try:
            value = json.loads(raw.decode("utf-8"))
            text = value["text"]
            text.encode("utf-8")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
            continue
        if isinstance(text, str) and text.strip():
            expected.append(text)

    summary = _run(tokenizer_dir, src, tmp_path / "out", workers=2, skip_bad_lines=True)
    assert summary.documents + summary.skipped.total == len(records)
    ds = IndexedDataset(str(tmp_path / "out" / "o_text_document"))
    assert [tokenizer.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == expected
    assert 0 < len(expected) < len(records)


SFT_CASES = {
    "messages_not_list": ({"messages": "hi"}, "'messages' must be a list"),
    "bad_role": ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    "content_not_string": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
                           "non-string content"),
    "no_assistant": ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    "starts_with_assistant": ({"messages": [{"role": "assistant", "content": "a"}]}, "starts with an assistant"),
    "late_system": ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                                  {"role": "assistant", "content": "a"}]}, "only the first message"),
    "alpaca_no_output": ({"instruction": "q", "input": ""}, "alpaca record needs"),
    "alpaca_list_input": ({"instruction": "q", "input": ["x"], "output": "a"}, "'input' must be a string"),
    "sharegpt_unknown_speaker": ({"conversations": [{"from": "tool", "value": "x"}]}, "from 'tool'"),
    "unknown_format": ({"text": "plain"}, "not an alpaca"),
}


@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_sft_bad_records(case, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moonforge.data.sft import build_sft_idxmap

    record, message = SFT_CASES[case]
    good = {"instruction": "say hi", "input": "", "output": "hi"}
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in (good, record, good)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as err:
        build_sft_idxmap([str(src)], tokenizer_dir, out / "s", 64, workers=0, progress=False)
    assert str(err.value).startswith(f"{src}:2: ")
    assert not out.exists() or list(out.iterdir()) == []
    summary = build_sft_idxmap([str(src)], tokenizer_dir, out / "s", 64, workers=0, skip_bad_lines=True,
                               progress=False)
    assert summary.samples == 2 and summary.skipped.total == 1
    assert len(IndexedDataset(str(out / "s_text_document"))) == 2


@pytest.mark.slow  # a subprocess
def test_interrupted_run_leaves_no_output(tokenizer_dir, tmp_path):
    """SIGTERM in the middle of a run: the temporary files are removed and nothing looks like a dataset."""
    src = tmp_path / "big.jsonl"
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 200}) + "\n"
    src.write_text(line * 1500, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "moonforge.cli", "data", "pretrain", "--input", str(src),
                             "--tokenizer", str(tokenizer_dir), "--output-prefix", str(out / "o"), "--append-eod",
                             "--workers", "1", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "stderr.txt", "wb"))
    deadline = time.time() + 60
    while not any(p.name.startswith(".o_text_document.partial") for p in out.iterdir()):
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert list(out.iterdir()) == []


def test_error_in_a_worker_run_stops_the_workers(tokenizer_dir, tmp_path):
    import multiprocessing

    src = tmp_path / "in.jsonl"
    src.write_bytes(GOOD * 5000 + b"{broken\n" + GOOD * 5000)
    with pytest.raises(DataError, match=f"{src}:5001: .*malformed_json"):
        _run(tokenizer_dir, src, tmp_path / "out", workers=2)
    assert multiprocessing.active_children() == []
    assert list((tmp_path / "out").iterdir()) == []

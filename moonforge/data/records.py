"""Reading JSON input records with their file and line, and the rules for bad input.

Inputs are JSONL (one JSON object per line) or a JSON array of objects; the first non-blank byte decides,
whatever the extension (Pai's ``SlimPajama.json`` is JSONL). A record that cannot be used is a ``BadRecord``
with a reason from ``BAD_REASONS``. The caller's policy decides: stop with ``file:line`` and the reason
(default), or skip it and count it by reason (``--skip-bad-lines``). Nothing is dropped silently.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

# reason -> what it means; the summary and the docs list these.
BAD_REASONS = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the JSON value is not an object",
    "missing_key": "a required key is absent",
    "not_a_string": "a value that must be a string is not one",
    "empty_text": "the text is empty or only whitespace",
    "invalid_utf8": "the bytes are not valid UTF-8",
    "invalid_unicode": "the text holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode",
    "line_too_long": "the line is longer than --max-line-bytes",
    "bad_conversation": "the record is not a usable alpaca / messages / ShareGPT conversation",
}

DEFAULT_MAX_LINE_BYTES = 128 * 2**20
_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Unusable input or options; the message names the file (and line) and how to fix it."""


class BadRecord(NamedTuple):
    reason: str  # a key of BAD_REASONS
    detail: str


@dataclass(frozen=True)
class Location:
    path: str
    line: int  # 1-based; for an element of a JSON array, the line where the element starts

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def expand_inputs(patterns: list[str] | str) -> list[Path]:
    """Files named by paths and glob patterns, in the order given (each glob sorted); errors name the pattern."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"{pattern}: no file matches this pattern")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise DataError(f"{path}: is a directory; pass files or a glob such as '{path}/*.jsonl'")
            if not path.exists():
                raise DataError(f"{path}: no such file")
            files.append(path)
    seen: set[Path] = set()
    unique = []
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def check_output_prefix(prefix: str | Path) -> None:
    """An output prefix names files (``DIR/name``), not a directory."""
    if str(prefix).endswith(("/", os.sep)) or Path(prefix).is_dir():
        raise DataError(f"{prefix}: --output-prefix is a directory; give a file prefix such as "
                        f"{Path(prefix) / 'mmap_dataset'}")


def iter_payloads(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
                  ) -> Iterator[tuple[int, bytes | object, int]]:
    """Yield ``(line, payload, size)`` for each record of a file.

    A payload is the raw bytes of a JSONL line (parsed later, possibly in a worker), an already parsed element
    of a JSON array, or a ``BadRecord`` found while reading (line too long); ``size`` is its length in the file
    (characters for array elements). Blank lines are not records and yield nothing.
    """
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(_UTF8_BOM).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            yield from _iter_array(path, f.read())
        else:
            yield from _iter_lines(f, max_line_bytes)


def _iter_lines(f, max_line_bytes: int) -> Iterator[tuple[int, bytes | BadRecord, int]]:
    lineno = 0
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        lineno += 1
        if lineno == 1:
            line = line.removeprefix(_UTF8_BOM)
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            size = len(line)
            while not line.endswith(b"\n"):  # skip the rest of the line without holding it in memory
                line = f.readline(1 << 20)
                size += len(line)
                if not line:
                    break
            yield lineno, BadRecord("line_too_long", f"line is {size} bytes, above --max-line-bytes "
                                                     f"{max_line_bytes}"), size
            continue
        if line.strip():
            yield lineno, line, len(line)


def _iter_array(path: Path, raw: bytes) -> Iterator[tuple[int, object, int]]:
    """Elements of a JSON array with their starting line. A malformed array cannot be resynchronised."""
    try:
        text = raw.removeprefix(_UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 in a JSON array file (byte {e.start}); a JSON array "
                        "cannot be read past bad bytes, so fix or re-encode the file") from None
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = _skip_ws(text, pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            where = line_at(getattr(e, "pos", pos))
            msg = getattr(e, "msg", "nesting too deep")
            raise DataError(f"{path}:{where}: malformed JSON array ({msg}); a JSON array cannot be resynchronised "
                            "after an error, so fix the file (or convert it to JSONL to skip bad lines)") from None
        yield line_at(pos), value, end - pos
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if _skip_ws(text, pos + 1) != len(text):
                raise DataError(f"{path}:{line_at(pos)}: unexpected data after the end of the JSON array")
            return
        raise DataError(f"{path}:{line_at(pos)}: malformed JSON array (expected ',' or ']'); fix the file")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def parse_payload(payload: bytes | object) -> object | BadRecord:
    """The JSON object of a payload, or why it is unusable."""
    if isinstance(payload, BadRecord):
        return payload
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            return BadRecord("malformed_json", f"malformed JSON ({e.msg} at column {e.colno})")
        except RecursionError:
            return BadRecord("malformed_json", "malformed JSON (nesting too deep)")
    if not isinstance(payload, dict):
        return BadRecord("not_an_object", f"expected a JSON object, got {_json_type(payload)}")
    return payload


def text_field(record: dict, key: str) -> str | BadRecord:
    """A non-empty, valid-Unicode string field of a record."""
    if key not in record:
        keys = ", ".join(sorted(record)[:8]) or "none"
        return BadRecord("missing_key", f"missing key {key!r} (keys present: {keys}); choose the key with "
                                        "--json-keys")
    value = record[key]
    if not isinstance(value, str):
        return BadRecord("not_a_string", f"key {key!r} holds {_json_type(value)}, expected a string")
    if not value.strip():
        return BadRecord("empty_text", f"key {key!r} is empty" if not value else f"key {key!r} is only whitespace")
    bad = unicode_problem(value)
    if bad:
        return BadRecord("invalid_unicode", f"key {key!r}: {bad}")
    return value


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded (lone surrogates from JSON escapes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate {text[e.start]!r} at character {e.start}"
    return None


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@dataclass
class SkipReport:
    """Counts of skipped records by reason, with the first few locations of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, where: Location | str, detail: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}

    def lines(self) -> list[str]:
        return [f"  {reason}: {n} (e.g. {self.examples[reason][0]})" for reason, n in self.counts.most_common()]


def bad_record_error(where: Location, bad: BadRecord) -> DataError:
    return DataError(f"{where}: {bad.detail} [{bad.reason}]; fix the input, or pass --skip-bad-lines to skip "
                     "such records (they are counted and reported)")

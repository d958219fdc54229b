"""Input formats: read JSON / JSONL (optionally gzipped) Q/A files into validated `Sample`s.

Three record shapes, detected per file: the seed's `{"id", "paragraph": [{"q", "a"}]}`, alpaca
`{"instruction", "input", "output", "system"?, "history"?}` and chat `{"messages": [{"role", "content"}]}`.
Every problem names `file:line`; with a `SkipReport` bad records are skipped and counted per reason instead.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError

FORMATS = ("seed", "alpaca", "chat")
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Sample:
    """One training example: answer `answer` to `query` after the earlier turns `history`."""

    query: str
    answer: str
    history: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    where: str = ""


class BadRecord(Exception):
    """A record-level problem: `reason` is the counting key, the message says what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class SkipReport:
    """Bad records skipped under `--skip-invalid`: counts per reason and the first places of each."""

    valid: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str, message: str) -> None:
        self.counts[reason] += 1
        places = self.examples.setdefault(reason, [])
        if len(places) < 3:
            places.append(f"{where}: {message}")

    @property
    def invalid(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason, e.g. `empty_field: 3 (data.jsonl:7: paragraph[0].a is empty, ...)`."""
        return "\n".join(
            f"  {reason}: {n} (e.g. {'; '.join(self.examples[reason])})"
            for reason, n in sorted(self.counts.items())
        )

    def check(self, max_fraction: float) -> None:
        """Fail when more than `max_fraction` of the records were bad (a wrong file, not a few typos)."""
        total = self.valid + self.invalid
        if self.invalid and self.invalid > max_fraction * total:
            raise InvalidInputError(
                f"{self.invalid} of {total} records are invalid ({self.invalid / total:.1%} > "
                f"{max_fraction:.1%} allowed):\n{self.summary()}"
            )


def _opener(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _first_char(path: Path) -> str:
    """The first non-blank character of the file ('' for an empty one), read without loading it all."""
    with _opener(path) as handle:
        while block := handle.read(4096):
            text = block.lstrip(b"\xef\xbb\xbf \t\r\n")
            if text:
                return chr(text[0])
    return ""


def _check_unicode(value: Any, path: str = "") -> None:
    """Reject lone surrogates: bytes that were not UTF-8 (decoded with surrogateescape) or bad escapes."""
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise BadRecord("not_utf8", f"{path or 'record'} contains bytes that are not valid UTF-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}[{i}]")


def iter_json_records(
    path: str | Path, display: str | None = None, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[int, Any]]:
    """Yield (line, object-or-BadRecord) for each record of a JSON array, JSONL or concatenated-JSON file.

    JSONL streams line by line; arrays and pretty-printed object streams are read whole. Damage that makes
    the rest of the file unreadable (broken JSON inside an array, an empty file) raises InvalidInputError.
    """
    path = Path(path)
    name = display or str(path)
    first = _first_char(path)
    if not first:
        raise InvalidInputError("empty file: no records", where=f"{name}:1")
    if first not in "[{":
        raise InvalidInputError(
            f"not JSON or JSONL: starts with {first!r}, expected '[' or '{{'", where=f"{name}:1"
        )
    if first == "{" and _first_line_is_object(path):
        yield from _iter_jsonl(path, name, max_line_bytes)
    else:
        yield from _iter_document(path, name, max_line_bytes, array=first == "[")


def _first_line_is_object(path: Path) -> bool:
    with _opener(path) as handle:
        for raw in handle:
            if raw.strip(b"\xef\xbb\xbf \t\r\n"):
                try:
                    return isinstance(json.loads(raw.decode("utf-8-sig", "surrogateescape")), dict)
                except ValueError:
                    return False
    return False


def _iter_jsonl(path: Path, name: str, limit: int) -> Iterator[tuple[int, Any]]:
    with _opener(path) as handle:
        line = 0
        while True:
            raw = handle.readline(limit + 1)
            if not raw:
                return
            line += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                while (rest := handle.readline(limit)) and not rest.endswith(b"\n"):
                    pass
                yield line, BadRecord("line_too_long", f"line is longer than the limit of {limit} bytes")
                continue
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    line,
                    BadRecord(
                        "not_utf8", f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8"
                    ),
                )
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as exc:
                yield line, BadRecord("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})")


def _iter_document(path: Path, name: str, limit: int, array: bool) -> Iterator[tuple[int, Any]]:
    with _opener(path) as handle:
        text = handle.read().decode("utf-8-sig", "surrogateescape")
    decoder = json.JSONDecoder()
    pos, line, counted = 0, 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def broken(i: int, message: str) -> InvalidInputError:
        hint = " (a broken JSON document cannot be skipped; fix it or convert the file to JSONL)"
        return InvalidInputError(f"invalid JSON: {message}{hint}", where=f"{name}:{line_of(i)}")

    pos = skip_ws(pos)
    if array:
        pos = skip_ws(pos + 1)
        if pos < len(text) and text[pos] == "]":
            raise InvalidInputError("empty JSON array: no records", where=f"{name}:{line_of(pos)}")
    while pos < len(text):
        start = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise broken(exc.pos, exc.msg) from None
        where_line = line_of(start)
        if pos - start > limit:
            yield where_line, BadRecord("line_too_long", f"record is longer than the limit of {limit} bytes")
        else:
            yield where_line, obj
        pos = skip_ws(pos)
        if array:
            if pos < len(text) and text[pos] == ",":
                pos = skip_ws(pos + 1)
            elif pos < len(text) and text[pos] == "]":
                if skip_ws(pos + 1) < len(text):
                    raise broken(skip_ws(pos + 1), "extra data after the closing ']'")
                return
            else:
                raise broken(pos, "expected ',' or ']' after a record")
    if array:
        raise broken(pos, "the array is not closed with ']'")


def detect_format(record: Any) -> str | None:
    """The format a record's keys point to, or None when they fit none."""
    if not isinstance(record, dict):
        return None
    if "paragraph" in record:
        return "seed"
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _text(record: dict, key: str, field_path: str, required: bool = True, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord("missing_field", f"missing field '{field_path}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"'{field_path}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord("empty_field", f"'{field_path}' is empty")
    return value


def _list(record: dict, key: str, field_path: str) -> list:
    if key not in record:
        raise BadRecord("missing_field", f"missing field '{field_path}'")
    value = record[key]
    if not isinstance(value, list):
        raise BadRecord("wrong_type", f"'{field_path}' must be a list, got {type(value).__name__}")
    if not value:
        raise BadRecord("empty_field", f"'{field_path}' is empty")
    return value


def _dialogue(turns: list[tuple[str, str]], system: str | None, where: str) -> list[Sample]:
    """A dialogue of N turns gives N samples; turn i sees turns < i as history."""
    return [Sample(q, a, tuple(turns[:i]), system, where) for i, (q, a) in enumerate(turns)]


def _seed_samples(record: dict, where: str) -> list[Sample]:
    turns = []
    for i, item in enumerate(_list(record, "paragraph", "paragraph")):
        if not isinstance(item, dict):
            raise BadRecord("wrong_type", f"'paragraph[{i}]' must be an object with q and a")
        query = _text(item, "q", f"paragraph[{i}].q")
        answer = item.get("a")
        if isinstance(answer, list):
            if not all(isinstance(part, str) for part in answer):
                raise BadRecord("wrong_type", f"'paragraph[{i}].a' must be a string or a list of strings")
            answer = "\n".join(answer)
        elif "a" not in item or answer is None:
            raise BadRecord("missing_field", f"missing field 'paragraph[{i}].a'")
        elif not isinstance(answer, str):
            raise BadRecord(
                "wrong_type",
                f"'paragraph[{i}].a' must be a string or a list of strings, got {type(answer).__name__}",
            )
        if not answer.strip():
            raise BadRecord("empty_field", f"'paragraph[{i}].a' is empty")
        turns.append((query, answer))
    return _dialogue(turns, None, where)


def _alpaca_samples(record: dict, where: str) -> list[Sample]:
    instruction = _text(record, "instruction", "instruction", allow_empty=True)
    extra = _text(record, "input", "input", required=False, allow_empty=True)
    query = "\n".join(part for part in (instruction, extra) if part.strip())
    if not query:
        raise BadRecord("empty_field", "'instruction' and 'input' are both empty")
    answer = _text(record, "output", "output")
    system = _text(record, "system", "system", required=False, allow_empty=True) or None
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(
            "wrong_type", f"'history' must be a list of [q, a] pairs, got {type(history).__name__}"
        )
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord("wrong_type", f"'history[{i}]' must be a [question, answer] pair of strings")
        if not pair[0].strip() or not pair[1].strip():
            raise BadRecord("empty_field", f"'history[{i}]' has an empty question or answer")
        turns.append((pair[0], pair[1]))
    return [Sample(query, answer, tuple(turns), system, where)]


def _chat_samples(record: dict, where: str) -> list[Sample]:
    messages = _list(record, "messages", "messages")
    system, turns, pending = None, [], None
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRecord("wrong_type", f"'{path}' must be an object with role and content")
        role = _text(message, "role", f"{path}.role")
        if role not in ROLES:
            raise BadRecord("wrong_type", f"'{path}.role' must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system":
            if i != 0:
                raise BadRecord("bad_dialogue", f"'{path}': a system message may only come first")
            system = _text(message, "content", f"{path}.content", allow_empty=True) or None
        elif role == "user":
            if pending is not None:
                raise BadRecord("bad_dialogue", f"'{path}': two user messages in a row")
            pending = _text(message, "content", f"{path}.content")
        else:
            if pending is None:
                raise BadRecord("bad_dialogue", f"'{path}': an assistant message must answer a user message")
            turns.append((pending, _text(message, "content", f"{path}.content")))
            pending = None
    if pending is not None or not turns:
        raise BadRecord("bad_dialogue", "'messages' must end with an assistant reply to a user message")
    return _dialogue(turns, system, where)


_PARSERS = {"seed": _seed_samples, "alpaca": _alpaca_samples, "chat": _chat_samples}


def samples_from_record(record: Any, fmt: str | None, where: str) -> list[Sample]:
    """Validate one record of format `fmt` (None: whatever it looks like); raises BadRecord naming the field."""
    if not isinstance(record, dict):
        raise BadRecord("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    shape = detect_format(record)
    if shape is None:
        keys = ", ".join(sorted(map(str, record))[:6]) or "none"
        raise BadRecord(
            "unknown_format",
            f"record fits no known format (keys: {keys}); expected seed "
            "{paragraph}, alpaca {instruction, output} or chat {messages}",
        )
    if fmt is not None and shape != fmt:
        raise BadRecord("unknown_format", f"record looks like {shape} but the file is {fmt}")
    _check_unicode(record)
    return _PARSERS[shape](record, where)


def read_samples(
    path: str | Path,
    display: str | None = None,
    fmt: str = "auto",
    skip: SkipReport | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Sample]:
    """All samples of one file, in order. Without `skip` the first bad record raises InvalidInputError."""
    name = display or str(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise InvalidInputError(f"unknown format {fmt!r}; use auto, {', '.join(FORMATS)}")
    detected = None if fmt == "auto" else fmt
    for line, record in iter_json_records(path, name, max_line_bytes):
        where = f"{name}:{line}"
        try:
            if isinstance(record, BadRecord):
                raise record
            if detected is None:
                detected = detect_format(record)  # stays None for an unknown shape, which is then reported
            samples = samples_from_record(record, detected, where)
        except BadRecord as exc:
            if skip is None:
                raise InvalidInputError(str(exc), where=where) from None
            skip.add(exc.reason, where, str(exc))
            continue
        if skip is not None:
            skip.valid += 1
        yield from samples

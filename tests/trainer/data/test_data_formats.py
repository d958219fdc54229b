"""Input formats: detection, validation, file:line in every error, --skip-invalid, and no crash on any JSON."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from glmtune_trainer.data.formats import Sample, SkipReport, read_samples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtune.errors import InvalidInputError

# The seed README's own examples (single answer, list answer, multi-turn), verbatim in structure.
ROUTE = "你好，南京到上海的路线如下：1. 南京到上海，可以乘坐南京地铁1号线，在南京站乘坐轨道交通1号线。"
SEED_SINGLE = {"id": 0, "paragraph": [{"q": "从南京到上海的路线", "a": ROUTE}]}
SEED_LIST = {
    "id": 0,
    "paragraph": [
        {
            "q": "从南京到上海的路线",
            "a": ["你好，南京到上海的路线如下：", "1. 南京到上海，可以乘坐南京地铁1号线。"],
        }
    ],
}
SEED_MULTI = {
    "id": 0,
    "paragraph": [
        {"q": "你好", "a": "我是机器人，有什么可以帮助你的？"},
        {"q": "从南京到上海的路线", "a": ROUTE},
    ],
}


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _jsonl(path: Path, records: list) -> Path:
    return _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(InvalidInputError) as info:
        list(read_samples(path, **kwargs))
    return str(info.value)


def test_seed_readme_examples_parse_with_list_answers_joined_and_turns_as_history(tmp_path: Path) -> None:
    # The README prints each example pretty-printed, one after another: a stream of multi-line objects.
    text = "\n".join(
        json.dumps(r, ensure_ascii=False, indent=4) for r in (SEED_SINGLE, SEED_LIST, SEED_MULTI)
    )
    path = _write(tmp_path / "seed.json", text)
    samples = list(read_samples(path))
    assert [s.query for s in samples] == [
        "从南京到上海的路线",
        "从南京到上海的路线",
        "你好",
        "从南京到上海的路线",
    ]
    assert samples[1].answer == "你好，南京到上海的路线如下：\n1. 南京到上海，可以乘坐南京地铁1号线。"
    assert samples[2].history == () and samples[3].history == (("你好", "我是机器人，有什么可以帮助你的？"),)
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "{"]
    assert [s.where for s in samples] == [
        f"{path}:{starts[0]}",
        f"{path}:{starts[1]}",
        f"{path}:{starts[2]}",
        f"{path}:{starts[2]}",
    ]


def test_jsonl_array_and_gzip_give_the_same_samples(tmp_path: Path) -> None:
    records = [SEED_SINGLE, SEED_MULTI]
    jsonl = _jsonl(tmp_path / "a.jsonl", records)
    array = _write(tmp_path / "a.json", json.dumps(records, ensure_ascii=False, indent=2))
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    strip = [(s.query, s.answer, s.history) for s in read_samples(jsonl)]
    assert strip == [(s.query, s.answer, s.history) for s in read_samples(array)]
    assert strip == [(s.query, s.answer, s.history) for s in read_samples(gz)]
    assert [s.where for s in read_samples(jsonl)] == [f"{jsonl}:1", f"{jsonl}:2", f"{jsonl}:2"]


def test_alpaca_real_file_with_system_and_history(shared: Path) -> None:
    samples = list(read_samples(shared / "data" / "coig_cqia_sample.json"))
    assert len(samples) == 2 and samples[0].system is None and samples[0].history == ()
    path = shared / "data" / "alpaca_zh_0-3252.json"
    report = SkipReport()
    real = list(read_samples(path, skip=report))
    assert len(real) == 3243 and report.counts == {"empty_field": 4}
    with_input = next(s for s in real if "\n" in s.query)
    assert with_input.query.split("\n")[0] and with_input.answer


def test_alpaca_history_and_system_and_chat_messages(tmp_path: Path) -> None:
    alpaca = {
        "instruction": "再来",
        "input": "",
        "output": "好",
        "system": "你是助手",
        "history": [["一", "1"], ["二", "2"]],
    }
    (sample,) = read_samples(_jsonl(tmp_path / "al.jsonl", [alpaca]))
    assert sample == Sample("再来", "好", (("一", "1"), ("二", "2")), "你是助手", f"{tmp_path}/al.jsonl:1")
    chat = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    first, second = read_samples(_jsonl(tmp_path / "chat.jsonl", [chat]))
    assert (first.query, first.answer, first.history, first.system) == ("q1", "a1", (), "S")
    assert (second.query, second.history) == ("q2", (("q1", "a1"),))


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ('{"paragraph": [{"q": "a", "a": "b"}]}\n{"paragraph": [{"q": "a", "a": "b"}\n', 2, "invalid JSON"),
        ('{"paragraph": [{"q": "a", "a": "b"}]}\n\n{"paragraph": [{"a": "b"}]}\n', 3, "paragraph[0].q"),
        ('{"paragraph": [{"q": "a", "a": "b"}]}\n{"paragraph": [{"q": "x", "a": ""}]}\n', 2, "empty"),
        ('{"paragraph": [{"q": "a", "a": "b"}]}\n{"paragraph": [{"q": "x", "a": 5}]}\n', 2, "got int"),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "x", "output": ["y"]}\n',
            2,
            "must be a string",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "history": [["x"]]}\n',
            2,
            "history[0]",
        ),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n', 1, "role"),
        ('{"instruction": "a", "output": "b"}\n[1, 2]\n', 2, "JSON object"),
        ('{"instruction": "a", "output": "b"}\n{"text": "hello"}\n', 2, "no known format"),
        (
            '[{"instruction": "a", "output": "b"},\n {"instruction": "a", "output": "b"}\n {"x": 1}]',
            3,
            "invalid JSON",
        ),
        ("\n\n", 1, "empty file"),
        ("[]", 1, "empty JSON array"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path: Path, content: str, line: int, words: str) -> None:
    path = _write(tmp_path / "bad.jsonl", content)
    message = _error(path)
    assert f"{path}:{line}:" in message and words in message


def test_non_utf8_bytes_name_file_and_line(tmp_path: Path) -> None:
    good = b'{"paragraph": [{"q": "a", "a": "b"}]}\n'
    path = _write(
        tmp_path / "latin1.jsonl", good + '{"paragraph": [{"q": "caf\xe9", "a": "b"}]}\n'.encode("latin-1")
    )
    message = _error(path)
    assert f"{path}:2:" in message and "UTF-8" in message
    array = _write(
        tmp_path / "latin1.json",
        b"[\n" + good.strip() + b",\n" + '{"instruction": "\xe9", "output": "b"}]'.encode("latin-1"),
    )
    assert f"{array}:3:" in _error(array)


def test_line_over_the_size_limit_names_file_and_line(tmp_path: Path) -> None:
    big = json.dumps({"instruction": "x" * 5000, "output": "y"})
    path = _jsonl(tmp_path / "big.jsonl", [{"instruction": "a", "output": "b"}, json.loads(big)])
    message = _error(path, max_line_bytes=1000)
    assert f"{path}:2:" in message and "limit" in message
    report = SkipReport()
    assert len(list(read_samples(path, skip=report, max_line_bytes=1000))) == 1
    assert report.counts == {"line_too_long": 1}


def test_skip_invalid_counts_per_reason_and_fails_over_the_fraction(tmp_path: Path) -> None:
    lines = [json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(8)]
    lines += ['{"instruction": "q", "output": ""}', "not json", '{"instruction": "q", "output": 3}']
    path = _write(tmp_path / "mixed.jsonl", "\n".join(lines) + "\n")
    report = SkipReport()
    samples = list(read_samples(path, skip=report))
    assert len(samples) == 8 and report.valid == 8
    assert report.counts == {"empty_field": 1, "invalid_json": 1, "wrong_type": 1}
    assert f"{path}:10" in report.summary()
    report.check(0.5)
    with pytest.raises(InvalidInputError, match="3 of 11 records are invalid"):
        report.check(0.1)


def test_a_file_of_another_shape_than_its_first_record_is_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, SEED_SINGLE])
    assert "looks like seed but the file is alpaca" in _error(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "q",
                    "a",
                    "paragraph",
                    "instruction",
                    "input",
                    "output",
                    "history",
                    "system",
                    "messages",
                    "role",
                    "content",
                    "id",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(JSON, min_size=0, max_size=4), as_array=st.booleans(), garbage=st.binary(max_size=12))
def test_random_json_never_crashes_the_parser(
    tmp_path: Path, records: list, as_array: bool, garbage: bytes
) -> None:
    body = json.dumps(records).encode() if as_array else b"\n".join(json.dumps(r).encode() for r in records)
    for content in (body, body + garbage):
        path = _write(tmp_path / "random.json", content)
        try:
            samples = list(read_samples(path))
        except InvalidInputError as exc:
            assert str(path) in str(exc)
        else:
            assert all(s.query.strip() and s.answer.strip() for s in samples)
        report = SkipReport()
        try:
            list(read_samples(path, skip=report))
        except InvalidInputError as exc:
            assert str(path) in str(exc)

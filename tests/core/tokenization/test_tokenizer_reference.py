"""Both SentencePiece tokenizers reproduce the original code on the real tokenizer files, case for case
(v1: ChatGLM-6B's ice_text.model; v2: ChatGLM2's tokenizer.model); family-specific behaviour is in
test_tokenizer_v1.py / test_tokenizer_v2.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testkit import reference_mismatches, require_shared

from glmtune.modeling.families import family
from glmtune.tokenization import load_tokenizer

PUBLISHED = {"v1": ("chatglm6b", "ChatGLMTokenizer"), "v2": ("chatglm2", "ChatGLM2Tokenizer")}


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def published(request: pytest.FixtureRequest) -> tuple[str, Path, dict, object]:
    """(family, real tokenizer folder, its reference cases, the loaded tokenizer)."""
    real_dir = require_shared("reference", "vectors", "tokenizers", PUBLISHED[request.param][0])
    reference = json.loads((real_dir / "tokenizer_cases.json").read_text(encoding="utf-8"))
    return request.param, real_dir, reference, load_tokenizer(real_dir)


def test_the_real_folder_is_detected_and_loaded_as_its_family(published) -> None:
    name, real_dir, _, tok = published
    assert family(real_dir) == name
    assert type(tok).__name__ == PUBLISHED[name][1] and tok.family == name


def test_encode_adds_gmask_and_sop_where_the_original_does(published) -> None:
    _, _, reference, tok = published
    assert reference_mismatches(reference, "ids", lambda c: tok.encode(c["text"])) == []


def test_encode_without_special_tokens_matches_the_original(published) -> None:
    _, _, reference, tok = published
    produce = lambda c: tok.encode(c["text"], add_special_tokens=False)  # noqa: E731
    assert reference_mismatches(reference, "ids_no_special_tokens", produce) == []


def test_tokens_match_the_original(published) -> None:
    _, _, reference, tok = published
    assert reference_mismatches(reference, "tokens", lambda c: tok.tokenize(c["text"])) == []


def test_decode_matches_the_original_and_exact_cases_round_trip(published) -> None:
    _, _, reference, tok = published
    plain = lambda c: tok.decode(c["ids_no_special_tokens"])  # noqa: E731
    assert reference_mismatches(reference, "decode(ids_no_special_tokens)", plain) == []
    assert reference_mismatches(reference, "decode(ids)", lambda c: tok.decode(c["ids"])) == []
    exact = [c for c in reference["cases"] if c["roundtrip_exact"]]
    assert len(exact) >= 5
    assert [c["kind"] for c in exact if tok.decode(tok.encode(c["text"])) != c["text"]] == []

"""Tiny tokenizers trained in-process: published layout, any text round-trips, deterministic and fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmtune.errors import InvalidInputError
from glmtune.tokenization import load_tokenizer
from glmtune.tokenization.tiny import train_tiny_tokenizer

FAMILIES = ("v1", "v2", "v3")
MODEL_FILE = {"v1": "ice_text.model", "v2": "tokenizer.model", "v3": "tokenizer.model"}
# '<' and '[' start special-token spellings ("<sop>", "[MASK]", "<|user|>", "<n>"), which are not plain text
PLAIN_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<["), max_size=60)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {family: load_tokenizer(train_tiny_tokenizer(family, root / family)) for family in FAMILIES}


def _normalised(text: str) -> str:
    # SentencePiece writes spaces as U+2581, so a literal U+2581 comes back as a space
    return text.replace("\u2581", " ")


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_the_published_layout_of_its_family(tiny: dict, family: str, tmp_path: Path) -> None:
    out = train_tiny_tokenizer(family, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE[family], "tokenizer_config.json"])
    assert tiny[family].family == family
    assert type(tiny[family]).__name__ == ("ChatGLMTokenizer" if family == "v1" else "ChatGLM2Tokenizer")


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=120, deadline=None)
@given(text=PLAIN_TEXT)
def test_any_text_round_trips(tiny: dict, family: str, text: str) -> None:
    tok = tiny[family]
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == _normalised(text)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_any_text_encodes_and_decodes_without_error(tiny: dict, family: str, text: str) -> None:
    tok = tiny[family]
    assert isinstance(tok.decode(tok.encode(text)), str)


def test_whitespace_and_mixed_text_round_trip_exactly(tiny: dict) -> None:
    text = "从南京到上海的路线\n\n  def f(x):\n\treturn x  # 平方   \nHello, world! 😀 " + " " * 100 + "end"
    for family, tok in tiny.items():
        assert tok.decode(tok.encode(text)) == text, family


def test_v1_special_pieces_sit_where_the_real_file_has_them(tiny: dict) -> None:
    tok = tiny["v1"]
    assert [tok.convert_tokens_to_ids(p) for p in ("<unk>", "<s>", "</s>", "<pad>", "<n>")] == [0, 1, 2, 3, 4]
    mask = tok.mask_token_id
    assert (tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (mask + 1, mask + 4, mask + 5)
    assert tok.convert_tokens_to_ids("<|tab|>") == mask + 8
    assert tok.convert_tokens_to_ids("<|blank_80|>") == mask + 87 == tok.vocab_size - 257
    assert tok.convert_tokens_to_ids("<0xFF>") == tok.vocab_size - 1


@pytest.mark.parametrize("family", ("v2", "v3"))
def test_v2_special_ids_follow_the_pieces(tiny: dict, family: str) -> None:
    tok = tiny[family]
    pieces = tok.sp_model.get_piece_size()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    if family == "v3":
        names += ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [tok.get_command(n) for n in names] == list(range(pieces, pieces + len(names)))
    assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (2, 0, pieces + len(names))


def test_special_tokens_encode_as_single_ids(tiny: dict) -> None:
    v1 = tiny["v1"]
    assert v1.encode("[MASK] <sop><eop>", add_special_tokens=False) == [
        v1.mask_token_id, v1.bos_token_id, v1.eos_token_id]
    v3 = tiny["v3"]
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert v3.encode("".join(roles), add_special_tokens=False) == [v3.get_command(r) for r in roles]
    for tok in tiny.values():
        assert tok.convert_tokens_to_ids("[gMASK]") == tok.gmask_token_id
        assert tok.decode([tok.gmask_token_id, tok.sop_token_id]) == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_training_is_deterministic(family: str, tmp_path: Path) -> None:
    texts = ["一二三四五六七八九十", "alpha beta gamma delta", "你好，世界！Hello, world!"] * 3
    first = train_tiny_tokenizer(family, tmp_path / "a")
    second = train_tiny_tokenizer(family, tmp_path / "b")
    for name in (MODEL_FILE[family], "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    custom_a = train_tiny_tokenizer(family, tmp_path / "c", texts=texts, vocab_size=600)
    custom_b = train_tiny_tokenizer(family, tmp_path / "d", texts=iter(texts), vocab_size=600)
    assert (custom_a / MODEL_FILE[family]).read_bytes() == (custom_b / MODEL_FILE[family]).read_bytes()
    assert (custom_a / MODEL_FILE[family]).read_bytes() != (first / MODEL_FILE[family]).read_bytes()


def test_texts_with_more_characters_than_the_vocabulary_still_train(tmp_path: Path) -> None:
    texts = ["".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(30)) for i in range(200)]
    for family in ("v1", "v2"):
        tok = load_tokenizer(train_tiny_tokenizer(family, tmp_path / family, texts=texts, vocab_size=800))
        assert tok.decode(tok.encode(texts[3], add_special_tokens=False)) == texts[3]


def test_bad_arguments_are_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="family must be one of"):
        train_tiny_tokenizer("v4", tmp_path / "x")
    with pytest.raises(InvalidInputError, match="vocab_size"):
        train_tiny_tokenizer("v1", tmp_path / "x", vocab_size=300)
    with pytest.raises(InvalidInputError, match="no non-empty training text"):
        train_tiny_tokenizer("v2", tmp_path / "x", texts=["", "\n"])

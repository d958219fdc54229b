"""GLM-4 tokenizer (tiktoken-style ranks file) and the GLM-4 chat template's token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import regex
from testkit import shared_dir
from transformers import PreTrainedTokenizerFast

from glmtune.errors import InvalidInputError
from glmtune.modeling.glm4 import is_glm4_dir, looks_like_ranks_file, special_token_ids
from glmtune.templates import (
    GLM4_CHAT_TEMPLATE,
    Message,
    decode_answer,
    encode_answer,
    encode_messages,
    encode_prompt,
    encode_tool_call,
    glm4_render_messages,
    read_tool_call,
    render_prompt,
    stop_token_ids,
    tools_system_text,
)
from glmtune.tokenization.glm4 import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    load_glm4_tokenizer,
    read_ranks,
    train_tiny_glm4_tokenizer,
)
from glmtune.tokenization.tiny import BUILTIN_CORPUS

TEXTS = [
    "你好👋！我是人工智能助手 GLM-4，很高兴见到你。",
    "Hello, world!  How's it going? I'll see you'LL there.",
    "def add(a, b):\n\treturn a + b\n\n\n",
    "   leading and trailing spaces   ",
    "Numbers 1234567 and 3.14159, emails a@b.c",
    "unseen: Ωμέγα ßtraße ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \r\n windows line",
    "\n\n\nthree newlines first",
    "",
]
# glm-4-9b-chat's chat_template, its function-tool branch (the python/browser/cogview tools are left out)
PUBLISHED_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{% set tools = item['tools'] %}"
    "{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_glm4_tokenizer(tmp_path_factory.mktemp("glm4-tokenizer"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_glm4_tokenizer(tok_dir)


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm, written out: per regex piece, a whole-piece token, else merge the adjacent pair whose
    concatenation ranks lowest (leftmost on ties) until none is a token."""
    ids = []
    for piece in regex.findall(SPLIT_PATTERN, text):
        data = piece.encode()
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while len(parts) > 1:
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def test_encoding_is_tiktokens_algorithm_on_the_ranks_file(tok) -> None:
    for text in TEXTS + list(BUILTIN_CORPUS):
        assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == tiktoken_encode(tok.ranks, text)


def test_decode_of_encode_gives_the_text_back(tok) -> None:
    for text in TEXTS + list(BUILTIN_CORPUS):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_special_tokens_follow_the_ranks_and_encode_as_single_ids(tok) -> None:
    n = len(tok.ranks)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    assert special_token_ids(n)["<|observation|>"] == tok.get_command("<|observation|>") == n + 9
    assert tok.get_command("sop") == tok.sop_token_id == n + 4 and tok.gmask_token_id == n + 2
    assert tok.eos_token_id == tok.pad_token_id == n and len(tok) == tok.vocab_size == n + len(SPECIAL_TOKENS)
    assert tok.encode("hi") == [n + 2, n + 4] + tok.encode("hi", add_special_tokens=False)
    assert tok("a", "b")["input_ids"] == [n + 2, n + 4, ord("a"), ord("b")]  # as the -hf tokenizer.json: no end
    assert tok.encode("a<|user|>b", add_special_tokens=False) == [ord("a"), n + 7, ord("b")]
    as_text = tok.encode("a<|user|>b", add_special_tokens=False, split_special_tokens=True)
    assert n + 7 not in as_text and tok.decode(as_text) == "a<|user|>b"
    assert tok.decode([n + 7, ord("x"), n]) == "<|user|>x<|endoftext|>"
    assert tok.decode([n + 7, ord("x"), n], skip_special_tokens=True) == "x"


def test_batches_pad_on_the_left_with_endoftext(tok) -> None:
    batch = tok(["hi", "a much longer text"], padding=True)
    n = len(tok.ranks)
    short = batch["input_ids"][0]
    pads = batch["attention_mask"][0].count(0)
    assert pads > 0 and short[:pads] == [n] * pads and short[pads:pads + 2] == [n + 2, n + 4]


def test_saved_files_reload_identically_and_tokenizer_json_serves_the_hf_layout(tok, tok_dir: Path,
                                                                                  tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    first = (tmp_path / "tokenizer.model").read_text().splitlines()[0].split()
    assert len(first) == 2 and first[1] == "0"
    assert read_ranks(tmp_path / "tokenizer.model") == tok.ranks
    plain = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        assert plain.encode(text) == tok.encode(text)


def test_a_broken_ranks_file_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(InvalidInputError, match=r"tokenizer.model:2"):
        load_glm4_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(InvalidInputError, match="ranks must be 0..n-1"):
        load_glm4_tokenizer(tmp_path)


def test_a_glm4_directory_is_told_apart_from_chatglm2s_tokenizer_model(tok_dir: Path) -> None:
    assert looks_like_ranks_file(tok_dir / "tokenizer.model") and is_glm4_dir(tok_dir)
    chatglm2 = shared_dir() / "reference" / "vectors" / "tokenizers" / "chatglm2" / "tokenizer.model"
    if chatglm2.is_file():  # the real SentencePiece file of the same name
        assert not looks_like_ranks_file(chatglm2)


def test_two_turn_chat_with_a_system_message_has_the_published_ids(tok) -> None:
    n = len(tok.ranks)
    gmask, sop, system, user, assistant = n + 2, n + 4, n + 6, n + 7, n + 8

    def text(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    prompt = encode_prompt(tok, "glm4", "从南京到上海的路线", history=[("你好", "你好！有什么可以帮你的吗？")],
                           system="你是一个乐于助人的助手。")
    assert prompt.prefix_ids == [gmask, sop] and prompt.suffix_ids == [assistant]
    assert prompt.ids == ([gmask, sop, system] + text("\n你是一个乐于助人的助手。") + [user] + text("\n你好")
                          + [assistant] + text("\n你好！有什么可以帮你的吗？") + [user]
                          + text("\n从南京到上海的路线") + [assistant])
    rendered = "[gMASK]<sop>" + render_prompt("glm4", "从南京到上海的路线", [("你好", "你好！有什么可以帮你的吗？")],
                                              "你是一个乐于助人的助手。")
    assert prompt.ids == text(rendered)  # what the published tokenizer gives on the rendered text
    messages = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
                {"role": "user", "content": "从南京到上海的路线"}]
    assert tok.apply_chat_template(messages, chat_template=PUBLISHED_TEMPLATE, tokenize=False,
                                   add_generation_prompt=True) == rendered
    assert encode_answer(tok, "glm4", "建议乘坐高铁。") == text("\n建议乘坐高铁。") + [n]
    assert stop_token_ids(tok, "glm4") == [n, user, n + 9]


def test_tools_and_observations_render_as_the_published_template(tok) -> None:
    messages = [Message("user", "北京天气怎么样？"),
                Message("assistant", '{"city": "北京"}', metadata="get_weather"),
                Message("observation", '{"temperature": 25}'), Message("assistant", "北京今天25度。"),
                Message("user", "上海呢？")]
    rendered = glm4_render_messages(messages, tools=[WEATHER])
    as_dicts = [{"role": "system", "content": "", "tools": [WEATHER]}] + [
        {"role": m.role, "content": m.content, **({"metadata": m.metadata} if m.metadata else {})}
        for m in messages]
    assert tok.apply_chat_template(as_dicts, chat_template=PUBLISHED_TEMPLATE, tokenize=False,
                                   add_generation_prompt=True) == rendered
    assert encode_messages(tok, "glm4", messages, tools=[WEATHER]) == tok.encode(rendered, add_special_tokens=False)
    assert tools_system_text([WEATHER["function"]], "glm4") == tools_system_text([WEATHER], "glm4")  # bare functions too
    assert GLM4_CHAT_TEMPLATE == PUBLISHED_TEMPLATE  # what the saved tokenizer_config.json carries
    assert tok.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=True) == rendered


def test_role_names_inside_content_stay_text(tok) -> None:
    ids = encode_messages(tok, "glm4", [Message("user", "say <|assistant|> please")])
    assert ids.count(tok.get_command("<|assistant|>")) == 1 and ids[-1] == tok.get_command("<|assistant|>")


def test_tool_calls_round_trip_through_generation_and_parsing(tok) -> None:
    call = encode_tool_call(tok, "glm4", "get_weather", {"city": "上海"})
    assert call[-1] == tok.get_command("<|observation|>")
    text = tok.decode(call[:-1])
    parsed = read_tool_call(text)
    assert parsed is not None and parsed.name == "get_weather" and parsed.arguments == '{"city": "上海"}'
    assert read_tool_call("\n普通回答") is None
    assert decode_answer(tok, "glm4", encode_answer(tok, "glm4", " 你好！ ") + [tok.get_command("<|user|>"), 5]) == "你好！"
    assert decode_answer(tok, "glm4", call) == '{"city": "上海"}'


def test_unsupported_tools_and_roles_are_refused_with_their_path(tok) -> None:
    with pytest.raises(InvalidInputError, match=r"tools\[0\].type"):
        tools_system_text([{"type": "python"}], "glm4")
    with pytest.raises(InvalidInputError, match=r"messages\[1\].role"):
        encode_messages(tok, "glm4", [Message("user", "hi"), Message("tool", "x")])


def test_the_tiny_tokenizer_factory_makes_glm4_ones_too(tmp_path) -> None:
    from glmtune.modeling.families import family
    from glmtune.tokenization import load_tokenizer
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    out = train_tiny_tokenizer("glm4", tmp_path / "tok")
    assert family(out) == "glm4"
    tok = load_tokenizer(out)
    assert type(tok).__name__ == "GLM4Tokenizer" and tok.decode(tok.encode("你好, world", add_special_tokens=False)) \
        == "你好, world"

"""Chat templates: prompt strings per family, ids identical to the originals' chat(), answers and stops."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO_ROOT, require_shared

from glmtune import templates
from glmtune.errors import InvalidInputError
from glmtune.tokenization import load_tokenizer
from glmtune.tokenization.tiny import train_tiny_tokenizer

QUERY = "从南京到上海的路线"
HISTORY = [("你好", "你好！我是人工智能助手。")]
CASES = [  # (query, history, system)
    (QUERY, [], None),
    (QUERY, HISTORY, None),
    (QUERY, HISTORY + [("谢谢", "不客气")], "你是一个乐于助人的助手。"),
    ("Hello, world!", [], "Be brief."),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny-templates")
    from glmtune.tokenization.glm4 import train_tiny_glm4_tokenizer

    return {family: load_tokenizer(train_tiny_glm4_tokenizer(root / family) if family == "glm4"
                                   else train_tiny_tokenizer(family, root / family)) for family in templates.TEMPLATES}


def _cases(name: str) -> dict:
    path = require_shared("reference", "vectors", "tokenizers", name, "tokenizer_cases.json")
    return json.loads(path.read_text(encoding="utf-8"))


def test_v1_prompt_strings() -> None:
    assert templates.render_prompt("v1", QUERY) == QUERY
    assert templates.render_prompt("v1", QUERY, HISTORY) == (
        "[Round 0]\n问：你好\n答：你好！我是人工智能助手。\n[Round 1]\n问：从南京到上海的路线\n答：")
    assert templates.render_prompt("v1", QUERY, system="你是助手") == "你是助手\n从南京到上海的路线"


def test_v2_prompt_strings() -> None:
    assert templates.render_prompt("v2", QUERY) == "[Round 1]\n\n问：从南京到上海的路线\n\n答："
    assert templates.render_prompt("v2", QUERY, HISTORY) == (
        "[Round 1]\n\n问：你好\n\n答：你好！我是人工智能助手。\n\n[Round 2]\n\n问：从南京到上海的路线\n\n答：")
    assert templates.render_prompt("v2", QUERY, system="你是助手") == (
        "你是助手\n\n[Round 1]\n\n问：从南京到上海的路线\n\n答：")


def test_v3_prompt_strings() -> None:
    assert templates.render_prompt("v3", QUERY) == "<|user|>\n 从南京到上海的路线<|assistant|>"
    assert templates.render_prompt("v3", QUERY, HISTORY, system="你是助手") == (
        "<|system|>\n 你是助手<|user|>\n 你好<|assistant|>\n 你好！我是人工智能助手。"
        "<|user|>\n 从南京到上海的路线<|assistant|>")


def test_v1_chat_prompt_ids_equal_the_original_chat() -> None:
    reference = _cases("chatglm6b")
    tok = load_tokenizer(require_shared("reference", "vectors", "tokenizers", "chatglm6b"))
    case = reference["chat_prompt"]
    assert templates.render_prompt("v1", case["query"], case["history"]) == case["prompt_string_expected"]
    encoded = templates.encode_prompt(tok, "v1", case["query"], case["history"])
    assert encoded.ids == case["captured_generate_inputs"]["input_ids"][0]
    assert encoded.prefix_ids == [] and encoded.suffix_ids == [130001, 130004]
    assert tok.decode(encoded.ids) == case["decoded"]
    no_history = reference["chat_prompt_no_history"]
    assert templates.encode_prompt(tok, "v1", no_history["query"]).ids == (
        no_history["captured_generate_inputs"]["input_ids"][0])


def test_v2_chat_prompt_ids_equal_the_original_chat() -> None:
    case = _cases("chatglm2")["chat_prompt"]
    tok = load_tokenizer(require_shared("reference", "vectors", "tokenizers", "chatglm2"))
    assert templates.render_prompt("v2", case["query"], case["history"]) == case["build_prompt"]
    assert templates.render_prompt("v2", case["query"]) == case["build_prompt_no_history"]
    encoded = templates.encode_prompt(tok, "v2", case["query"], case["history"])
    assert encoded.ids == case["model.build_inputs (used by chat)"]["input_ids"][0]
    assert encoded.prefix_ids == [64790, 64792] and encoded.suffix_ids == []
    assert templates.encode_prompt(tok, "v2", case["query"]).ids == (
        case["model.build_inputs with empty history"]["input_ids"][0])


def test_v3_prompt_follows_chatglm3_build_chat_input(tmp_path: Path) -> None:
    real = require_shared("reference", "vectors", "tokenizers", "chatglm2")
    (tmp_path / "v3").mkdir()
    shutil.copy(real / "tokenizer.model", tmp_path / "v3" / "tokenizer.model")
    (tmp_path / "v3" / "tokenizer_config.json").write_text('{"family": "v3"}')
    tok = load_tokenizer(tmp_path / "v3")
    encoded = templates.encode_prompt(tok, "v3", QUERY, HISTORY, system="你是助手")
    newline = tok.encode("\n", add_special_tokens=False)

    def message(role: str, text: str) -> list[int]:
        return [tok.get_command(f"<|{role}|>")] + newline + tok.encode(text, add_special_tokens=False)

    expected_body = (message("system", "你是助手") + message("user", "你好") + message("assistant", HISTORY[0][1])
                     + message("user", QUERY))
    assert newline == [30910, 13]
    assert encoded.prefix_ids == [64790, 64792] and encoded.suffix_ids == [64796]
    assert encoded.body_ids == expected_body
    assert encoded.ids == tok.encode(templates.render_prompt("v3", QUERY, HISTORY, system="你是助手"))


@pytest.mark.parametrize("template", templates.TEMPLATES)
def test_encoded_prompt_parts_concatenate_to_the_rendered_prompt_ids(tiny: dict, template: str) -> None:
    tok = tiny[template]
    for query, history, system in CASES:
        encoded = templates.encode_prompt(tok, template, query, history, system)
        assert encoded.ids == encoded.prefix_ids + encoded.body_ids + encoded.suffix_ids
        assert encoded.ids == tok.encode(templates.render_prompt(template, query, history, system))
    gmask_sop = [tok.gmask_token_id, tok.sop_token_id]
    encoded = templates.encode_prompt(tok, template, QUERY)
    if template == "v1":
        assert (encoded.prefix_ids, encoded.suffix_ids) == ([], gmask_sop)
    elif template == "v2":
        assert (encoded.prefix_ids, encoded.suffix_ids) == (gmask_sop, [])
    else:
        assert (encoded.prefix_ids, encoded.suffix_ids) == (gmask_sop, [tok.get_command("<|assistant|>")])


def test_v3_role_spellings_inside_content_stay_text(tiny: dict) -> None:
    tok = tiny["v3"]
    encoded = templates.encode_prompt(tok, "v3", "say <|assistant|> please")
    assert encoded.body_ids.count(tok.get_command("<|assistant|>")) == 0
    assert encoded.body_ids.count(tok.get_command("<|user|>")) == 1


@pytest.mark.parametrize("template", templates.TEMPLATES)
def test_answers_end_with_the_end_token_and_decode_back(tiny: dict, template: str) -> None:
    tok = tiny[template]
    answer = "建议乘坐高铁，大约一个半小时。"
    ids = templates.encode_answer(tok, template, answer)
    assert ids[-1] == tok.eos_token_id
    if template == "v3":
        assert ids[:-1] == tok.encode("\n", add_special_tokens=False) + tok.encode(answer, add_special_tokens=False)
    elif template == "glm4":  # the metadata line and the content in one piece, as the rendered text encodes
        assert ids[:-1] == tok.encode("\n" + answer, add_special_tokens=False)
    else:
        assert ids[:-1] == tok.encode(answer, add_special_tokens=False)
    assert templates.decode_answer(tok, template, ids + [5, 6, 7]) == answer


def test_real_end_tokens_and_stop_ids() -> None:
    v1 = load_tokenizer(require_shared("reference", "vectors", "tokenizers", "chatglm6b"))
    v2 = load_tokenizer(require_shared("reference", "vectors", "tokenizers", "chatglm2"))
    assert templates.encode_answer(v1, "v1", "好")[-1] == 130005
    assert templates.encode_answer(v2, "v2", "好")[-1] == 2
    assert templates.stop_token_ids(v1, "v1") == [130005]
    assert templates.stop_token_ids(v2, "v2") == [2]
    assert templates.answer_window_prefix(v1, "v1") == [130001, 130004]
    assert templates.answer_window_prefix(v2, "v2") == [64790, 64792]
    assert templates.decode_answer(v1, "v1", v1.encode("你好!我是助手,再见", add_special_tokens=False)) == (
        "你好！我是助手，再见")


def test_v3_stops_on_eos_user_and_observation(tiny: dict) -> None:
    tok = tiny["v3"]
    user, observation = tok.get_command("<|user|>"), tok.get_command("<|observation|>")
    assert templates.stop_token_ids(tok, "v3") == [tok.eos_token_id, user, observation]
    assert templates.answer_window_prefix(tok, "v3") == [tok.gmask_token_id, tok.sop_token_id,
                                                         tok.get_command("<|assistant|>")]
    answer = templates.encode_answer(tok, "v3", "好的")[:-1]
    assert templates.decode_answer(tok, "v3", answer + [user] + tok.encode("more", add_special_tokens=False)) == "好的"


def test_template_for_family_and_unknown_names() -> None:
    assert [templates.template_for_family(f) for f in ("v1", "v2", "v3", "glm4")] == ["v1", "v2", "v3", "glm4"]
    with pytest.raises(InvalidInputError, match="unknown model family"):
        templates.template_for_family("glm5")
    with pytest.raises(InvalidInputError, match="unknown chat template"):
        templates.render_prompt("chatml", QUERY)


def test_templates_and_the_tokenization_package_import_without_heavy_libraries() -> None:
    code = ("import sys, glmtune.templates, glmtune.tokenization; "
            "bad = [m for m in ('torch', 'transformers', 'sentencepiece') if m in sys.modules]; "
            "print(*bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_v3_tool_conversation_follows_chatglm3_build_single_message(tmp_path: Path) -> None:
    """ChatGLM3's own rules: each message is <|role|> + encode(f"{metadata}\\n") + encode(content); the tools go
    into a system message as indented JSON after its preamble; a call's metadata is the tool's name."""
    real = require_shared("reference", "vectors", "tokenizers", "chatglm2")
    (tmp_path / "v3").mkdir()
    shutil.copy(real / "tokenizer.model", tmp_path / "v3" / "tokenizer.model")
    (tmp_path / "v3" / "tokenizer_config.json").write_text('{"family": "v3"}')
    tok = load_tokenizer(tmp_path / "v3")
    tool = {"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}
    system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
              + json.dumps([tool], indent=4, ensure_ascii=False))
    call = "```python\ntool_call(city='北京', days=2)\n```"
    messages = [templates.Message("system", templates.tools_system_text([tool])),
                templates.Message("user", "北京天气"),
                templates.Message("assistant", templates.tool_call_text({"city": "北京", "days": 2}),
                                  metadata="get_weather"),
                templates.Message("observation", '{"temperature": 20}')]

    def message(role: str, metadata: str, text: str) -> list[int]:
        return ([tok.get_command(f"<|{role}|>")] + tok.encode(f"{metadata}\n", add_special_tokens=False)
                + tok.encode(text, add_special_tokens=False))

    expected = ([64790, 64792] + message("system", "", system) + message("user", "", "北京天气")
                + message("assistant", "get_weather", call) + message("observation", "", '{"temperature": 20}')
                + [tok.get_command("<|assistant|>")])
    assert templates.encode_messages(tok, "v3", messages) == expected
    forced = templates.encode_messages(tok, "v3", messages[:2], answer_metadata="get_weather")
    assert forced[-len(tok.encode("get_weather\n", add_special_tokens=False)) - 1:] == (
        [tok.get_command("<|assistant|>")] + tok.encode("get_weather\n", add_special_tokens=False))


def test_a_tool_call_is_written_and_read_back(tiny: dict) -> None:
    arguments = {"city": "北京", "days": 2, "units": None, "tags": ["a", "b"]}
    text = templates.tool_call_text(arguments)
    call = templates.parse_tool_call("get_weather", text)
    assert call.name == "get_weather" and json.loads(call.arguments) == arguments
    tok = tiny["v3"]
    ids = templates.encode_tool_call(tok, "v3", "get_weather", arguments)
    assert ids[-1] == tok.get_command("<|observation|>")
    metadata, content = templates.split_v3_answer(tok.decode(ids[:-1], skip_special_tokens=True))
    assert metadata == "get_weather" and templates.parse_tool_call(metadata, content) == call


@pytest.mark.parametrize(("content", "arguments"), [
    ('{"city": "北京"}', '{"city": "北京"}'),
    ('```json\n{"city": "北京"}\n```', '{"city": "北京"}'),
    ("```python\ntool_call(city=__import__('os').getcwd())\n```", "tool_call(city=__import__('os').getcwd())"),
    ("```python\nprint('hi')\n```", "print('hi')"),
    ("tool_call('positional')", "tool_call('positional')"),
    ("not code at all", "not code at all"),
])
def test_tool_call_arguments_are_parsed_never_evaluated(content: str, arguments: str) -> None:
    """Literals only: anything else is handed on as the arguments text (as OpenAI does with arguments a model
    got wrong), never run."""
    assert templates.parse_tool_call("f", content).arguments == arguments


def test_split_v3_answer_waits_for_the_metadata_line() -> None:
    assert templates.split_v3_answer("get_wea") is None
    assert templates.split_v3_answer("\n 你好") == ("", "你好")
    assert templates.split_v3_answer("get_weather\n```python") == ("get_weather", "```python")


@pytest.mark.parametrize("template", templates.TEMPLATES)
def test_raw_prompts_get_the_generation_tokens_where_the_family_wants_them(tiny: dict, template: str) -> None:
    tok = tiny[template]
    gmask_sop = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    body = tok.encode("Hello", add_special_tokens=False)
    expected = body + gmask_sop if template == "v1" else gmask_sop + body
    assert templates.encode_raw(tok, template, "Hello") == expected
    if template != "v3":  # v1/v2 chat prompts are raw prompts of the rendered text
        assert templates.encode_raw(tok, template, templates.render_prompt(template, QUERY)) == (
            templates.encode_prompt(tok, template, QUERY).ids)


@pytest.mark.parametrize("template", ["v1", "v2"])
def test_tool_messages_need_the_v3_template(tiny: dict, template: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        templates.encode_messages(tiny[template], template, [templates.Message("user", "hi")])
    assert err.value.where == "template"

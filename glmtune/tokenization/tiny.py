"""Tiny ChatGLM tokenizers trained in-process, for tests, the demo and ``glmtune model init``.

`train_tiny_tokenizer` trains a small SentencePiece model (byte fallback, so any text encodes) on a built-in
Chinese/English corpus or on given texts, and writes the published layout of its family so the normal
tokenizer classes load it unchanged:
  * v1: ``ice_text.model`` (unigram, like the original) whose pieces are laid out as in the real file:
    ``<unk> <s> </s> <pad> <n>``, learned pieces, ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC>
    <dBLOCK>``, ``<|tab|> <|blank_2|>..<|blank_80|>``, then the 256 byte pieces;
  * v2/v3: ``tokenizer.model`` (BPE, like the original): ``<unk> <s> </s>``, byte pieces, learned pieces; the
    special tokens follow the pieces (added by the tokenizer class, as for the real file).
Unlike the real files the normaliser is the identity and whitespace is kept, so decode(encode(s)) == s up to
the documented pre-processing. Deterministic: one thread, fixed seed, no shuffling, same inputs -> same bytes.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from glmtune.errors import InvalidInputError
from glmtune.storage import atomic_write_bytes, atomic_write_json
from glmtune.tokenization import CONFIG_FILE, FAMILIES, V1_MODEL_FILE, V2_MODEL_FILE

_SEED = 20230314

BUILTIN_CORPUS = (
    "你好",
    "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。",
    "你好！我是人工智能助手，很高兴为你服务。",
    "您好，请问有什么可以帮您？",
    "早上好！今天过得怎么样？",
    "晚上好，祝你做个好梦。",
    "谢谢你的帮助，再见！",
    "不客气，有问题随时来问我。",
    "从南京到上海的路线",
    "从南京到上海可以坐高铁，大约一个半小时就能到达上海虹桥站。",
    "你也可以沿着沪宁高速公路开车，全程大约三百公里。",
    "从北京到广州的路线怎么走？",
    "请介绍一下你自己。",
    "我是一个开源的中英双语对话语言模型，基于 General Language Model (GLM) 架构。",
    "今天天气怎么样？",
    "今天是晴天，气温二十五度，适合出去散步。",
    "请帮我写一首关于春天的诗。",
    "春风吹绿了江南的岸，桃花开满了山坡。",
    "如何学习编程？",
    "学习编程可以从 Python 开始，多写代码，多看文档，多做练习。",
    "什么是机器学习？",
    "机器学习是人工智能的一个分支，让计算机从数据中学习规律。",
    "请把这句话翻译成英文：我喜欢读书。",
    "I like reading books.",
    "中国的首都是北京，上海是最大的城市之一。",
    "一年有十二个月，一周有七天，一天有二十四小时。",
    "问题：三加五等于几？答案：八。",
    "我们明天下午三点在图书馆见面吧。",
    "这个问题很有意思，让我想一想。",
    "请用简单的语言解释一下量子计算。",
    "健康的生活方式包括均衡饮食、规律作息和适量运动。",
    "[Round 0]\n问：你好\n答：你好！有什么可以帮你的吗？",
    "[Round 1]\n\n问：从南京到上海的路线\n\n答：建议乘坐高铁。",
    "Hello!",
    "Hello, world! How are you doing today?",
    "Good morning! How can I help you today?",
    "Thank you very much. See you tomorrow!",
    "What is the best route from Nanjing to Shanghai?",
    "You can take the high-speed train; it takes about ninety minutes.",
    "Please introduce yourself.",
    "I am a helpful assistant trained to answer questions in Chinese and English.",
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models learn patterns from data.",
    "Fine-tuning adapts a pretrained model to a new task with a small data set.",
    "LoRA adds low-rank adapters to the attention layers.",
    "Write a short poem about the sea.",
    "The weather is sunny and warm, about 25 degrees.",
    "There are 12 months in a year and 7 days in a week.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n\tprint(i * 2)",
    "import json\ndata = json.loads('{\"q\": \"你好\", \"a\": \"你好！\"}')",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2023 3.14",
    "Email me at demo@example.com or visit https://example.com/docs.",
    "用户：帮我订一张明天去上海的火车票。",
    "助手：好的，请问您希望几点出发？",
    "系统：你是一个乐于助人的助手。",
    "总结：本文介绍了模型的训练、评估和部署流程。",
)


def _lines(texts: Iterable[str], family: str) -> list[str]:
    """Training sentences: one per line (so no piece spans a newline), v1 text pre-processed as it is encoded."""
    from glmtune.tokenization.chatglm6b import encode_whitespace

    lines = []
    for text in texts:
        if not isinstance(text, str):
            raise InvalidInputError(f"training texts must be strings, got {type(text).__name__}", where="texts")
        if family == "v1":
            lines.append(encode_whitespace(text))
        else:
            lines.extend(line for line in text.split("\n") if line)
    return [line for line in lines if line.strip()]


def _frequent_fragments(lines: list[str], slots: int) -> list[str]:
    """Lines cut at characters outside the `slots` most frequent ones (those encode as bytes), so the
    characters SentencePiece must keep always fit in the vocabulary."""
    counts = Counter(char for line in lines for char in line)
    if len(counts) <= slots:
        return lines
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    keep = {char for char, _ in ranked[:slots]} | {" "}
    fragments = []
    for line in lines:
        start = 0
        for end, char in enumerate(line):
            if char not in keep:
                fragments.append(line[start:end])
                start = end + 1
        fragments.append(line[start:])
    return [fragment for fragment in fragments if fragment.strip()]


def _train(lines: list[str], family: str, vocab_size: int) -> bytes:
    from glmtune.tokenization.chatglm6b import GLM_CONTROL_PIECES, WHITESPACE_PIECES

    reserved = 256 + (4 + len(GLM_CONTROL_PIECES) + len(WHITESPACE_PIECES) if family == "v1" else 3)
    if vocab_size <= reserved + 16:
        raise InvalidInputError(f"must exceed {reserved + 16} for a {family} tokenizer (special and byte pieces "
                                f"take {reserved})", where="vocab_size")
    # at most half of the learned vocabulary is single characters, so merges still fit
    lines = _frequent_fragments(lines, (vocab_size - reserved) // 2)
    options = dict(
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2,
    )
    if family == "v1":
        options.update(model_type="unigram", pad_id=3, control_symbols=list(GLM_CONTROL_PIECES),
                       user_defined_symbols=list(WHITESPACE_PIECES))
    else:
        options.update(model_type="bpe", pad_id=-1, allow_whitespace_only_pieces=True)
    writer = io.BytesIO()
    spm.set_random_generator_seed(_SEED)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, **options)
    except RuntimeError as exc:
        raise InvalidInputError(f"SentencePiece training failed: {exc}", where="vocab_size") from None
    return writer.getvalue()


def _arrange(model_bytes: bytes, family: str) -> bytes:
    """v1: the published piece order; v2/v3: drop learned pieces spelled like a special token."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    from glmtune.tokenization.chatglm2 import GLM_SPECIAL_TOKENS, ROLE_TOKENS
    from glmtune.tokenization.chatglm6b import GLM_CONTROL_PIECES, WHITESPACE_PIECES

    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    pieces = list(proto.pieces)
    if family == "v1":
        by_name = {p.piece: p for p in pieces}
        fixed = {p.piece for p in pieces[:4]} | set(GLM_CONTROL_PIECES) | set(WHITESPACE_PIECES)
        byte_type = model_pb2.ModelProto.SentencePiece.BYTE
        learned = [p for p in pieces if p.piece not in fixed and p.type != byte_type]
        ordered = (pieces[:4] + [by_name["<n>"]] + learned + [by_name[n] for n in GLM_CONTROL_PIECES]
                   + [by_name[n] for n in WHITESPACE_PIECES[1:]] + [p for p in pieces if p.type == byte_type])
    else:
        reserved = set(GLM_SPECIAL_TOKENS) | set(ROLE_TOKENS)
        ordered = [p for p in pieces if p.piece not in reserved]
    copies = [model_pb2.ModelProto.SentencePiece() for _ in ordered]
    for copy, piece in zip(copies, ordered, strict=True):
        copy.CopyFrom(piece)
    del proto.pieces[:]
    proto.pieces.extend(copies)
    return proto.SerializeToString(deterministic=True)


def train_tiny_tokenizer(family: str, out_dir: str | os.PathLike, texts: Iterable[str] | None = None,
                         vocab_size: int = 1024) -> Path:
    """Train a tiny tokenizer of `family` ("v1" | "v2" | "v3" | "glm4") and write it to `out_dir`; returns
    `out_dir` (GLM-4's is a byte-level BPE in its tiktoken-style file, the others SentencePiece)."""
    if family not in FAMILIES:
        raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}", where="family")
    if family == "glm4":
        from glmtune.tokenization.glm4 import train_tiny_glm4_tokenizer

        return train_tiny_glm4_tokenizer(out_dir, texts, vocab_size)
    lines = _lines(BUILTIN_CORPUS if texts is None else texts, family)
    if not lines:
        raise InvalidInputError("no non-empty training text", where="texts")
    model_bytes = _arrange(_train(lines, family, vocab_size), family)
    out_dir = Path(out_dir)
    model_file = V1_MODEL_FILE if family == "v1" else V2_MODEL_FILE
    atomic_write_bytes(out_dir / model_file, model_bytes)
    if family == "v1":
        from glmtune.tokenization.chatglm6b import ChatGLMTokenizer

        tokenizer = ChatGLMTokenizer(vocab_file=str(out_dir / model_file))
    else:
        from glmtune.tokenization.chatglm2 import ChatGLM2Tokenizer

        tokenizer = ChatGLM2Tokenizer(vocab_file=str(out_dir / model_file), family=family)
    atomic_write_json(out_dir / CONFIG_FILE, tokenizer.tokenizer_config())
    return out_dir

"""GLM-4 tokenizer (THUDM/glm-4-9b-chat): a tiktoken-style byte-level BPE file plus 14 special tokens.

``tokenizer.model`` holds one ``base64(token bytes) rank`` line per token; tiktoken merges, inside each piece the
GLM-4 regex cuts, the adjacent pair whose concatenation has the lowest rank, and a piece that is itself a token
stays whole. The special tokens FOLLOW the ranks (n = rank count, 151329 in the published file):
``<|endoftext|>`` n, ``[MASK]`` n+1, ``[gMASK]`` n+2, ``[sMASK]`` n+3, ``<sop>`` n+4, ``<eop>`` n+5,
``<|system|>`` n+6, ``<|user|>`` n+7, ``<|assistant|>`` n+8, ``<|observation|>`` n+9, then the image/video marks.

Encoding runs in HF ``tokenizers`` (already a transformers dependency, no tiktoken needed): the ranks become a
BPE whose merges are every split of a token into two tokens, ranked by the token (what transformers'
TikTokenConverter builds for the published ``-hf`` tokenizer.json), with ``ignore_merges`` so whole-piece tokens
win as in tiktoken. ``add_special_tokens`` prepends ``[gMASK] <sop>``; eos and pad are ``<|endoftext|>``;
padding is on the left. Saving writes ``tokenizer.model`` (the remote-code layout) and ``tokenizer.json``
(the ``-hf`` layout, loadable by plain ``PreTrainedTokenizerFast``). `train_tiny_glm4_tokenizer` writes a small
such file from a byte-level BPE trained in-process, for tests and benchmarks.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from glmtune.errors import InvalidInputError
from glmtune.storage import atomic_write_bytes, atomic_write_json

MODEL_FILE = "tokenizer.model"
FAST_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_ALIASES = {"sop": "<sop>", "eop": "<eop>", "<eos>": "<|endoftext|>", "<pad>": "<|endoftext|>"}
_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
# fixed by the file; published configs repeat them (and the remote-code class ignores them)
_FIXED_KWARGS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "additional_special_tokens",
                 "extra_special_tokens", "added_tokens_decoder", "tokenizer_object", "tokenizer_file",
                 "remove_space", "do_lower_case", "encode_special_tokens")
_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {char: byte for byte, char in _BYTE_TO_CHAR.items()}


def read_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """token bytes -> rank from a ``base64 rank`` file; errors name the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, encoding="ascii", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
                if len(fields) != 2 or rank < 0:
                    raise ValueError
            except (ValueError, IndexError, binascii.Error):
                raise InvalidInputError("expected 'base64(token) rank'", where=f"{path}:{number}") from None
            if token in ranks:
                raise InvalidInputError(f"token {token!r} listed twice", where=f"{path}:{number}")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InvalidInputError("ranks must be 0..n-1, each once", where=str(path))
    return ranks


def ranks_file_bytes(ranks: dict[bytes, int]) -> bytes:
    """The ``tokenizer.model`` text of `ranks`, in rank order."""
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda x: x[1]))
    return "".join(lines).encode("ascii")


def ranks_from_tokenizer_json(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """token bytes -> rank from an ``-hf`` GLM-4 ``tokenizer.json`` (a byte-level BPE whose vocabulary ids are the
    tiktoken ranks; the special tokens are added tokens after them, so they are not part of it)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        if data["model"].get("type") != "BPE" or not isinstance(vocab, dict):
            raise ValueError
        ranks = {bytes(_CHAR_TO_BYTE[char] for char in text): int(rank) for text, rank in vocab.items()
                 if text not in SPECIAL_TOKENS}
    except (ValueError, KeyError, TypeError):
        raise InvalidInputError("not a GLM-4 byte-level BPE tokenizer.json", where=str(path)) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InvalidInputError("vocabulary ids must be 0..n-1, each once, before the special tokens",
                                where=str(path))
    return ranks


def _unicode(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def backend_from_ranks(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` pipeline that encodes as tiktoken does on `ranks`, special tokens added after them."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], _unicode(left), _unicode(right)))
    merges.sort()
    vocab = {_unicode(token): rank for token, rank in ranks.items()}
    backend = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # added in order, so their ids are len(ranks) + index as in the original
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    n = len(ranks)
    gmask, sop = n + SPECIAL_TOKENS.index("[gMASK]"), n + SPECIAL_TOKENS.index("<sop>")
    # as transformers' GLM-4 converter builds tokenizer.json for the -hf layout (pairs get no end token: the
    # remote code's pair branch asks for an "<eos>" it does not have)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="[gMASK]:0 <sop>:0 $A:0", pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
                                      special_tokens=[("[gMASK]", gmask), ("<sop>", sop)]),
    ])
    return backend


class GLM4Tokenizer(PreTrainedTokenizerFast):
    """The GLM-4 tokenizer from a ``tokenizer.model`` ranks file, or an ``-hf`` ``tokenizer.json`` (family
    ``glm4``); both encode the same, and both files are written on save."""

    vocab_files_names = {"vocab_file": MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = None

    def __init__(self, vocab_file: str | os.PathLike[str], padding_side: str = "left", **kwargs: Any) -> None:
        for key in _FIXED_KWARGS:
            kwargs.pop(key, None)
        is_json = Path(vocab_file).name == FAST_FILE
        self.ranks = ranks_from_tokenizer_json(vocab_file) if is_json else read_ranks(vocab_file)
        clashes = [name for name in SPECIAL_TOKENS if name.encode() in self.ranks]
        if clashes:
            raise InvalidInputError(f"ranked tokens {clashes} clash with the special tokens that follow them",
                                    where=str(vocab_file))
        self.family = "glm4"
        from glmtune.templates import GLM4_CHAT_TEMPLATE as CHAT_TEMPLATE

        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        super().__init__(tokenizer_object=backend_from_ranks(self.ranks), vocab_file=str(vocab_file),
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side=padding_side,
                         clean_up_tokenization_spaces=False, **kwargs)
        self.vocab_file = str(vocab_file)

    @property
    def vocab_size(self) -> int:
        """Ranked tokens plus the special tokens after them (151343 for the published file), as the original."""
        return len(self.ranks) + len(SPECIAL_TOKENS)

    def get_command(self, name: str) -> int:
        """The id of a special token by name (``[gMASK]``, ``<sop>``/``sop``, ``<|user|>``, ``<eos>``, ...)."""
        key = _ALIASES.get(name, name)
        if key not in SPECIAL_TOKENS:
            raise KeyError(f"{name!r} is not a special token of the GLM-4 tokenizer")
        return len(self.ranks) + SPECIAL_TOKENS.index(key)

    @property
    def gmask_token_id(self) -> int:
        """``[gMASK]`` (151331 in the published file)."""
        return self.get_command("[gMASK]")

    @property
    def sop_token_id(self) -> int:
        """``<sop>`` (151333 in the published file)."""
        return self.get_command("<sop>")

    def tokenizer_config(self, layout: str = "remote") -> dict[str, Any]:
        """``tokenizer_config.json`` plus ``family``: for the "remote" layout the published keys (THUDM's class in
        auto_map), for "hf" plain ``PreTrainedTokenizerFast`` over tokenizer.json; both with the chat template."""
        from glmtune.templates import GLM4_CHAT_TEMPLATE as CHAT_TEMPLATE

        config = {"padding_side": self.padding_side, "clean_up_tokenization_spaces": False,
                  "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                  "additional_special_tokens": list(SPECIAL_TOKENS), "chat_template": CHAT_TEMPLATE,
                  "family": self.family}
        if layout == "hf":
            return {**config, "tokenizer_class": "PreTrainedTokenizerFast"}
        if layout != "remote":
            raise InvalidInputError(f"layout must be 'remote' or 'hf', got {layout!r}", where="layout")
        return {**config, "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLM4Tokenizer",
                "auto_map": _AUTO_MAP}

    def save_pretrained(self, save_directory: str | os.PathLike[str], layout: str = "remote",
                        **kwargs: Any) -> tuple[str, ...]:
        """Write ``tokenizer.model`` and ``tokenizer.json``, then ``tokenizer_config.json`` of `layout` last (a
        reader never sees half a save)."""
        config = self.tokenizer_config(layout)
        directory = Path(save_directory)
        if directory.is_file():
            raise InvalidInputError("is a file; a tokenizer is saved into a directory", where=str(directory))
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / MODEL_FILE, ranks_file_bytes(self.ranks))
        atomic_write_bytes(directory / FAST_FILE, self.backend_tokenizer.to_str().encode())
        atomic_write_json(directory / CONFIG_FILE, config)
        return str(directory / CONFIG_FILE), str(directory / MODEL_FILE), str(directory / FAST_FILE)


def load_glm4_tokenizer(directory: str | os.PathLike[str]) -> GLM4Tokenizer:
    """The GLM-4 tokenizer of a directory holding ``tokenizer.model``, else (the ``-hf`` layout) ``tokenizer.json``
    (padding side from its config)."""
    import json

    directory = Path(directory)
    vocab = directory / MODEL_FILE if (directory / MODEL_FILE).is_file() else directory / FAST_FILE
    if not vocab.is_file():
        raise InvalidInputError(f"a GLM-4 tokenizer needs {MODEL_FILE} or {FAST_FILE}, both missing",
                                where=str(directory))
    config_path = directory / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    padding = {"padding_side": config["padding_side"]} if "padding_side" in config else {}
    return GLM4Tokenizer(vocab, name_or_path=str(directory), **padding)


def train_ranks(texts: Iterable[str], vocab_size: int = 1024) -> dict[bytes, int]:
    """Byte-level BPE ranks learned from `texts` with the GLM-4 split: the 256 bytes, then merges in the order
    learned (so every token's halves rank below it, as in a real tiktoken file)."""
    lines = [text for text in texts if isinstance(text, str) and text]
    if not lines:
        raise InvalidInputError("no non-empty training text", where="texts")
    if vocab_size <= 256:
        raise InvalidInputError("must exceed 256 (the byte tokens)", where="vocab_size")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda char: _CHAR_TO_BYTE[char])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    backend.train_from_iterator(lines, trainer=trainer)
    learned = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    ranks = {bytes([byte]): byte for byte in range(256)}
    for text, _ in learned:
        token = bytes(_CHAR_TO_BYTE[char] for char in text)
        if token not in ranks and token.decode("utf-8", errors="replace") not in SPECIAL_TOKENS:
            ranks[token] = len(ranks)
    return ranks


def train_tiny_glm4_tokenizer(out_dir: str | os.PathLike[str], texts: Iterable[str] | None = None,
                              vocab_size: int = 1024) -> Path:
    """Train a tiny GLM-4 tokenizer (on the built-in corpus or `texts`) and write it to `out_dir`."""
    from glmtune.tokenization.tiny import BUILTIN_CORPUS

    ranks = train_ranks(BUILTIN_CORPUS if texts is None else texts, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MODEL_FILE, ranks_file_bytes(ranks))
    load_glm4_tokenizer(out).save_pretrained(out)
    return out

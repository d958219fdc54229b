"""ChatGLM-6B ("v1") tokenizer: the published ``ice_text.model`` with the original pre-processing.

Behaves as THUDM's ``tokenization_chatglm.py`` (transformers 4.33) does, on transformers 5:
"\\n" -> ``<n>``, tab -> ``<|tab|>``, runs of 2..80 spaces -> ``<|blank_N|>`` before SentencePiece (the real
model normalises NFKC), decode reverses it; ``[gMASK] <sop>`` are APPENDED to a prompt
(``build_inputs_with_special_tokens``); padding is on the LEFT with ``<pad>``. Text spelling one of the
transformers special tokens (``<sop> <eop> [MASK] <unk> <pad>``) becomes that id and eats the whitespace
around it, as in 4.33; ``[gMASK]`` and ``</s>`` in text stay text. Every special token is a piece of the
SentencePiece model, so a tiny model with the same piece names works unchanged. Ids are SentencePiece ids
plus ``num_image_tokens`` (0 for the published slim vocabulary, 20000 for the old 150528 one).
"""

from __future__ import annotations

import os
import re
from typing import Any

import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer

from glmtune.errors import InvalidInputError
from glmtune.tokenization import V1_MODEL_FILE, save_tokenizer_files

MAX_BLANK_LENGTH = 80
GLM_CONTROL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
WHITESPACE_PIECES = ("<n>", "<|tab|>", *(f"<|blank_{n}|>" for n in range(2, MAX_BLANK_LENGTH + 1)))
# tokenizer_config.json keys this class reads (and writes back), as in the published file
CONFIG_KEYS = ("bos_token", "eos_token", "end_token", "gmask_token", "mask_token", "pad_token", "unk_token",
               "remove_space", "do_lower_case", "num_image_tokens", "padding_side")
_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
_ALIASES = {"sop": "<sop>", "eop": "<eop>", "<eos>": "<eop>", "<bos>": "<sop>"}
_BLANK_RUN = re.compile(f" {{2,{MAX_BLANK_LENGTH}}}")
_BLANK_TOKEN = re.compile(r"<\|blank_(\d+)\|>")
_IMAGE_TOKEN = re.compile(r"<image_(\d+)>")


def encode_whitespace(text: str) -> str:
    """The original pre-processing: newlines, tabs and runs of 2..80 spaces become pieces (longest first)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return _BLANK_RUN.sub(lambda match: f"<|blank_{len(match.group())}|>", text)


def decode_whitespace(text: str) -> str:
    """Inverse of `encode_whitespace` on decoded text."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")

    def spaces(match: re.Match) -> str:
        n = int(match.group(1))
        return " " * n if 2 <= n <= MAX_BLANK_LENGTH else match.group()

    return _BLANK_TOKEN.sub(spaces, text)


def load_sentencepiece(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A SentencePiece processor, or InvalidInputError naming the file."""
    if not os.path.isfile(path):
        raise InvalidInputError("SentencePiece model file is missing", where=str(path))
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise InvalidInputError(f"not a SentencePiece model: {exc}", where=str(path)) from None
    return processor


class SentencePieceFiles:
    """Saving shared by both tokenizer classes: the SentencePiece file + tokenizer_config.json, nothing else."""

    model_file: str

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the SentencePiece model file (optionally prefixed) into `save_directory`."""
        from glmtune.storage import atomic_write_bytes

        name = f"{filename_prefix}-{self.model_file}" if filename_prefix else self.model_file
        path = os.path.join(save_directory, name)
        atomic_write_bytes(path, self.sp_model.serialized_model_proto())
        return (path,)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write the SentencePiece model file + ``tokenizer_config.json``, the published layout (no other files)."""
        return save_tokenizer_files(save_directory, self.model_file, self.sp_model.serialized_model_proto(),
                                    self.tokenizer_config())


class ChatGLMTokenizer(SentencePieceFiles, PreTrainedTokenizer):
    """The ChatGLM-6B tokenizer (v1); ``family == "v1"``."""

    vocab_files_names = {"vocab_file": V1_MODEL_FILE}
    model_file = V1_MODEL_FILE
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    family = "v1"

    def __init__(self, vocab_file: str, do_lower_case: bool = False, remove_space: bool = False,
                 bos_token: str = "<sop>", eos_token: str = "<eop>", end_token: str = "</s>",
                 mask_token: str = "[MASK]", gmask_token: str = "[gMASK]", pad_token: str = "<pad>",
                 unk_token: str = "<unk>", num_image_tokens: int = 0, padding_side: str = "left",
                 **kwargs: Any) -> None:
        # transformers' from_pretrained moves unknown *_token keys here; for v1 they are plain text
        named = kwargs.pop("model_specific_special_tokens", None) or {}
        family = kwargs.pop("family", "v1")
        if family != "v1":
            raise InvalidInputError(f"ice_text.model is the v1 tokenizer, the config says family {family!r}",
                                    where=str(vocab_file))
        self.vocab_file = str(vocab_file)
        self.sp_model = load_sentencepiece(vocab_file)
        self.do_lower_case, self.remove_space = bool(do_lower_case), bool(remove_space)
        self.num_image_tokens = int(num_image_tokens)
        self.end_token = str(named.get("end_token", end_token))
        self.gmask_token = str(named.get("gmask_token", gmask_token))
        offset = self.num_image_tokens
        self._vocab = {f"<image_{i}>": i for i in range(offset)}
        pieces = self.sp_model.id_to_piece(list(range(self.sp_model.get_piece_size())))
        self._vocab.update({piece: i + offset for i, piece in enumerate(pieces)})
        specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token,
                    "pad_token": pad_token, "mask_token": mask_token}
        for piece in (*map(str, specials.values()), self.gmask_token):
            if piece not in self._vocab:
                raise InvalidInputError(f"special token {piece!r} is not a piece of the model", where=self.vocab_file)
        # special tokens eat surrounding whitespace, as transformers 4.33 did for string special tokens
        self._added_tokens_decoder = {
            self._vocab[str(tok)]: AddedToken(str(tok), lstrip=True, rstrip=True, special=True, normalized=False)
            for tok in specials.values()
        }
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=False, **specials, **kwargs)

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus image tokens (130344 for the published file)."""
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        """Piece -> id, including tokens added with `add_tokens`."""
        return {**self._vocab, **self._added_tokens_encoder}

    @property
    def gmask_token_id(self) -> int:
        """``[gMASK]`` (130001)."""
        return self._vocab[self.gmask_token]

    @property
    def sop_token_id(self) -> int:
        """``<sop>`` (130004), the bos token that starts the answer."""
        return self.bos_token_id

    def get_command(self, name: str) -> int:
        """The id of a special piece by name (``[gMASK]``, ``<sop>``/``sop``, ``<eop>``, ``[MASK]``, ``<pad>``...)."""
        piece = _ALIASES.get(name, name)
        if piece in GLM_CONTROL_PIECES or piece in ("<unk>", "<s>", "</s>", "<pad>", *WHITESPACE_PIECES):
            if piece in self._vocab:
                return self._vocab[piece]
        raise KeyError(f"{name!r} is not a special token of the v1 tokenizer")

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp_model.encode_as_pieces(encode_whitespace(text))

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._vocab:
            return self._vocab[token]
        return self.sp_model.unk_id() + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        # ids past the vocabulary (the model pads it to 130528) decode to nothing
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        index -= self.num_image_tokens
        return self.sp_model.id_to_piece(index) if index < self.sp_model.get_piece_size() else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decoding of the pieces, then the whitespace pieces back to whitespace."""
        pieces = [t for t in tokens if t and not _IMAGE_TOKEN.fullmatch(t)]
        return decode_whitespace(self.sp_model.decode_pieces(pieces))

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """``prompt + [gMASK, <sop>]`` (+ ``answer + [<eop>]`` for a pair), as the original appends them."""
        ids = token_ids_0 + [self.gmask_token_id, self.sop_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 where `build_inputs_with_special_tokens` put (or has put) a special token."""
        if already_has_special_tokens:
            special = {self._vocab[p] for p in GLM_CONTROL_PIECES if p in self._vocab}
            special.update(self.all_special_ids)
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def tokenizer_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` written by `save_pretrained`: the published keys plus ``family``."""
        return {
            "bos_token": self.bos_token, "eos_token": self.eos_token, "end_token": self.end_token,
            "gmask_token": self.gmask_token, "mask_token": self.mask_token, "pad_token": self.pad_token,
            "unk_token": self.unk_token, "remove_space": self.remove_space, "do_lower_case": self.do_lower_case,
            "num_image_tokens": self.num_image_tokens, "padding_side": self.padding_side,
            "tokenizer_class": "ChatGLMTokenizer", "auto_map": _AUTO_MAP, "family": self.family,
        }


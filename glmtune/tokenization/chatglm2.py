"""ChatGLM2-6B ("v2") and ChatGLM3-6B ("v3") tokenizer: plain SentencePiece ``tokenizer.model``.

Behaves as THUDM's ChatGLM2/ChatGLM3 ``tokenization_chatglm.py``: SentencePiece with byte fallback and its
dummy prefix, no pre-processing; special ids FOLLOW the SentencePiece pieces (n = piece count, 64789 in the
published file): ``[MASK]`` n, ``[gMASK]`` n+1, ``[sMASK]`` n+2, ``sop`` n+3, ``eop`` n+4, and for v3 the role
tokens ``<|system|>`` n+5, ``<|user|>`` n+6, ``<|assistant|>`` n+7, ``<|observation|>`` n+8.
``[gMASK] sop`` are PREPENDED (``build_inputs_with_special_tokens``); eos is ``</s>`` (2), pad is id 0;
padding is on the LEFT. None of these names is split out of text (``</s>``, ``sop``, ``[gMASK]`` in text stay
text) except the v3 role tokens, which encode as one id each. Decoding drops pad/bos/eos and the GLM
special ids, as the original does, and writes v3 role tokens as their names (``skip_special_tokens`` drops
them). The family ("v2" or "v3") is a constructor argument; `glmtune.tokenization.detect_family` decides it.
"""

from __future__ import annotations

from typing import Any

from transformers import AddedToken, PreTrainedTokenizer

from glmtune.errors import InvalidInputError
from glmtune.tokenization import V2_MODEL_FILE
from glmtune.tokenization.chatglm6b import SentencePieceFiles, load_sentencepiece

GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
_ALIASES = {"<sop>": "sop", "<eop>": "eop", "</s>": "<eos>", "<s>": "<bos>"}
# fixed by the vocabulary; published ChatGLM3 configs repeat them, the original code ignores them
_FIXED_KWARGS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "model_specific_special_tokens",
                 "extra_special_tokens", "additional_special_tokens", "added_tokens_decoder")


class ChatGLM2Tokenizer(SentencePieceFiles, PreTrainedTokenizer):
    """The ChatGLM2 (``family="v2"``) / ChatGLM3 (``family="v3"``) tokenizer."""

    vocab_files_names = {"vocab_file": V2_MODEL_FILE}
    model_file = V2_MODEL_FILE
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str, family: str = "v2", padding_side: str = "left", **kwargs: Any) -> None:
        if family not in ("v2", "v3"):
            raise InvalidInputError(f"tokenizer.model is a v2 or v3 tokenizer, not {family!r}", where=str(vocab_file))
        for key in _FIXED_KWARGS:
            kwargs.pop(key, None)
        self.family = family
        self.vocab_file = str(vocab_file)
        self.sp_model = load_sentencepiece(vocab_file)
        n_pieces = self.sp_model.get_piece_size()
        names = GLM_SPECIAL_TOKENS + (ROLE_TOKENS if family == "v3" else ())
        self._vocab = {piece: i for i, piece in enumerate(self.sp_model.id_to_piece(list(range(n_pieces))))}
        clashes = [name for name in names if name in self._vocab]
        if clashes:
            raise InvalidInputError(f"pieces {clashes} clash with the special tokens that follow the pieces",
                                    where=self.vocab_file)
        self._special_ids = {name: n_pieces + i for i, name in enumerate(names)}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        self._vocab.update(self._special_ids)
        self._commands = {**self._special_ids, "<bos>": self.sp_model.bos_id(), "<eos>": self.sp_model.eos_id(),
                          "<pad>": self.sp_model.unk_id(), "<unk>": self.sp_model.unk_id()}
        roles = [AddedToken(r, lstrip=False, rstrip=False, special=True, normalized=False)
                 for r in names if r in ROLE_TOKENS]
        self._added_tokens_decoder = {self._special_ids[r.content]: r for r in roles}
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=False,
                         extra_special_tokens=roles, **kwargs)

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the special tokens after them (64794 for v2, 64798 for v3)."""
        return self.sp_model.get_piece_size() + len(self._special_ids)

    def get_vocab(self) -> dict[str, int]:
        """Piece -> id, special tokens included."""
        return {**self._vocab, **self._added_tokens_encoder}

    def get_command(self, name: str) -> int:
        """The id of a special token by name: ``[gMASK]``, ``sop``/``<sop>``, ``eop``, ``<eos>``/``</s>``,
        ``<pad>``, ``[MASK]``, and for v3 ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|observation|>``."""
        key = _ALIASES.get(name, name)
        if key not in self._commands:
            raise KeyError(f"{name!r} is not a special token of the {self.family} tokenizer")
        return self._commands[key]

    # the published code exposes these as fixed properties rather than registered special tokens, so that
    # "</s>" or "<unk>" typed in text stays text
    @property
    def eos_token(self) -> str:
        return self.sp_model.id_to_piece(self.sp_model.eos_id())

    @property
    def eos_token_id(self) -> int:
        """``</s>`` (2): the token that ends an answer."""
        return self.sp_model.eos_id()

    @property
    def pad_token(self) -> str:
        return self.sp_model.id_to_piece(self.sp_model.unk_id())

    @property
    def pad_token_id(self) -> int:
        return self.sp_model.unk_id()

    @property
    def unk_token(self) -> str:
        return self.sp_model.id_to_piece(self.sp_model.unk_id())

    @property
    def unk_token_id(self) -> int:
        return self.sp_model.unk_id()

    @property
    def mask_token_id(self) -> int:
        return self._special_ids["[MASK]"]

    @property
    def gmask_token_id(self) -> int:
        """``[gMASK]`` (64790)."""
        return self._special_ids["[gMASK]"]

    @property
    def sop_token_id(self) -> int:
        """``sop`` (64792)."""
        return self._special_ids["sop"]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode_as_pieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab.get(token, self.sp_model.unk_id())

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._special_names:
            return self._special_names[index]
        return self.sp_model.id_to_piece(index) if 0 <= index < self.sp_model.get_piece_size() else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decoding between role tokens (written as names); GLM special names decode to nothing."""
        text, pieces = [], []
        for token in tokens:
            if token in ROLE_TOKENS and token in self._special_ids:
                text.append(self.sp_model.decode_pieces(pieces))
                text.append(token)
                pieces = []
            elif token and token not in self._special_ids:
                pieces.append(token)
        text.append(self.sp_model.decode_pieces(pieces))
        return "".join(text)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        # pad shares id 0 with <unk>; like the original, bos/eos/pad never reach the text
        dropped = {self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.unk_id()}
        if skip_special_tokens:
            dropped.update(self._special_ids.values())
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens([i for i in ids if i not in dropped]))
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        """``[gMASK, sop] + prompt`` (+ ``answer + [</s>]`` for a pair), as the original prepends them."""
        ids = [self.gmask_token_id, self.sop_token_id] + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 where `build_inputs_with_special_tokens` put (or has put) a special token."""
        if already_has_special_tokens:
            special = set(self._special_ids.values()) | {self.eos_token_id, self.sp_model.bos_id(), self.pad_token_id}
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def tokenizer_config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` written by `save_pretrained`: the published keys plus ``family``."""
        return {"remove_space": False, "do_lower_case": False, "padding_side": self.padding_side,
                "tokenizer_class": "ChatGLMTokenizer", "auto_map": _AUTO_MAP, "family": self.family}


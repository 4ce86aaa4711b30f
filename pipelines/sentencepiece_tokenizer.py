"""A Tokenizer over a SentencePiece `spiece.model`, for folders that ship no tokenizer.json (SigLIP's).

The pieces come from the `sentencepiece` library itself (Google's reader of the file, the one the checkpoints were
made with); around it, this reproduces transformers' `SiglipTokenizer` (its slow, Python tokenizer, the only one
transformers has for SigLIP) so that the ids are the same:

1. the text gets a leading "▁" (and its own "▁" become spaces), then is split on the added tokens of
   tokenizer_config.json (`</s>`, `<unk>`: never cut into pieces; their `lstrip` / `rstrip` eat the spaces beside
   them);
2. each other part is canonicalized as big_vision's prompt engineering does: lower-cased (`do_lower_case`),
   ASCII punctuation removed, runs of whitespace made one space, stripped;
3. the part is encoded as `unk_token + part`, and the pieces of the `unk_token` cut off again: transformers' way to
   encode a part without SentencePiece adding its dummy prefix a second time;
4. a lone leading "▁" before a special token is dropped, pieces become ids, and `</s>` is appended unless the ids
   already end with it. Truncation cuts the text's ids before that, as transformers does.

Canonicalization rewrites the text, so character offsets are not tracked: an Encoding's `offsets` are (0, 0) and its
`word_ids` None; tasks that read offsets (token classification, question answering) are not served by this tokenizer.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from pipelines.tokenization import _SPECIAL_KEYS, TRUNCATION_STRATEGIES, Encoding, Tokenizer, _token_content

MODEL_FILE = "spiece.model"
SUPPORTED_CLASSES = ("SiglipTokenizer",)  # tokenizer_config.json `tokenizer_class` values whose rules are below
SPIECE_UNDERLINE = "▁"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_UNSET_MAX_LENGTH = 1_000_000


class SentencePieceTokenizer(Tokenizer):
    """SiglipTokenizer's encoding over `sentencepiece`, behind the `Tokenizer` interface the pipelines use (encode,
    encode_batch, layout, special tokens, decode). Picklable: the model travels as its serialized bytes."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        special_tokens: dict[str, str],
        added_tokens: dict[str, tuple[int, bool, bool]],
        do_lower_case: bool = True,
        model_max_length: int | None = 64,
        padding_side: str = "right",
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if special_tokens.get("eos_token") is None:
            raise ValueError(f"a SigLIP tokenizer needs an eos_token; its special tokens: {special_tokens}")
        self._proto = model_proto
        self._sp = _load(model_proto)
        self.special_tokens = dict(special_tokens)
        self.added_tokens = dict(added_tokens)  # content -> (id, lstrip, rstrip)
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.clean_up_spaces = False
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(added_tokens, key=len, reverse=True))) + ")")
        self._unk_pieces = len(self._sp.encode(self.special_tokens["unk_token"], out_type=str))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> SentencePieceTokenizer:
        """From a folder's spiece.model and tokenizer_config.json (special tokens, lower-casing, maximum length)."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        tokenizer_class = config.get("tokenizer_class", "SiglipTokenizer")
        if tokenizer_class not in SUPPORTED_CLASSES:
            raise ValueError(
                f"{folder} has a SentencePiece model and no tokenizer.json, with tokenizer_class={tokenizer_class!r}; "
                f"SentencePiece-only folders are supported for {SUPPORTED_CLASSES}: save the tokenizer as "
                "tokenizer.json (transformers' fast tokenizer) for other classes"
            )
        defaults = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}  # SiglipTokenizer's
        special = {
            **defaults,
            **{k: _token_content(v) for k, v in _read_json(folder / "special_tokens_map.json").items()},
        }
        special.update({k: _token_content(config[k]) for k in _SPECIAL_KEYS if config.get(k) is not None})
        special = {k: v for k, v in special.items() if k in _SPECIAL_KEYS and v is not None}
        proto = (folder / MODEL_FILE).read_bytes()
        sp = _load(proto)
        # SiglipTokenizer makes its special tokens strip the spaces beside them; a saved added_tokens_decoder says
        # what was saved (and adds any other added tokens).
        added = {token: (sp.piece_to_id(token), True, True) for token in set(special.values())}
        for i, token in (config.get("added_tokens_decoder") or {}).items():
            added[token["content"]] = (int(i), bool(token.get("lstrip")), bool(token.get("rstrip")))
        max_length = config.get("model_max_length", 64)
        return cls(
            proto,
            special_tokens=special,
            added_tokens=added,
            do_lower_case=bool(config.get("do_lower_case", True)),
            model_max_length=None if max_length is None or max_length > _UNSET_MAX_LENGTH else max_length,
            padding_side=config.get("padding_side", "right"),
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_sp"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _sp=_load(state["_proto"]))

    # -- vocabulary and special tokens ----------------------------------------------------------------------------
    def token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._piece_id(token)

    @property
    def vocab_size(self) -> int:
        return max([self._sp.get_piece_size() - 1, *(i for i, _, _ in self.added_tokens.values())]) + 1

    def _piece_id(self, piece: str) -> int:
        return self.added_tokens[piece][0] if piece in self.added_tokens else self._sp.piece_to_id(piece)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        by_id = {i: token for token, (i, _, _) in self.added_tokens.items()}
        return [by_id.get(i) or self._sp.id_to_piece(i) for i in ids]

    @property
    def continuing_subword_prefix(self) -> str | None:
        return None

    def num_special_tokens(self, pair: bool = False) -> int:
        return 2 if pair else 1

    # -- encoding -------------------------------------------------------------------------------------------------
    def canonicalize(self, text: str) -> str:
        """big_vision's canonicalization: lower-cased (if configured), punctuation removed, whitespace collapsed."""
        if self.do_lower_case:
            text = text.lower()
        return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()

    def tokenize(self, text: str) -> list[str]:
        """The pieces of `text` (steps 1-3 and the first half of 4 in the module docstring), no end token."""
        parts = self._split.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        for i, part in enumerate(parts):
            if part in self.added_tokens:
                _, lstrip, rstrip = self.added_tokens[part]
                if lstrip and i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if rstrip and i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        pieces: list[str] = []
        for part in parts:
            if part in self.added_tokens:
                pieces.append(part)
            elif part:
                encoded = self._sp.encode(self.special_tokens["unk_token"] + self.canonicalize(part), out_type=str)
                pieces.extend(encoded[self._unk_pieces :] if len(encoded) >= self._unk_pieces else encoded)
        specials = set(self.special_tokens.values())
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in specials:
            pieces = pieces[1:]
        return pieces

    def _with_eos(self, ids: list[int]) -> list[int]:
        eos = self.token_id("eos_token")
        return ids if ids and ids[-1] == eos else ids + [eos]

    def encode(
        self,
        text: str,
        pair: str | None = None,
        *,
        max_length: int | None = None,
        stride: int = 0,
        truncation: str = "longest_first",
        add_special_tokens: bool = True,
        return_overflowing: bool = False,
    ) -> Encoding:
        """Tokenize one text (or pair: `A </s> B </s>`), truncated to `max_length` ids as transformers does."""
        if return_overflowing or stride:
            raise ValueError("the SentencePiece tokenizer does not return overflowing windows (stride, overflow)")
        if truncation not in TRUNCATION_STRATEGIES:
            raise ValueError(f"unknown truncation strategy {truncation!r}; allowed: {TRUNCATION_STRATEGIES}")
        specials = self.num_special_tokens(pair is not None) if add_special_tokens else 0
        if max_length is not None and max_length < specials + 1:
            raise ValueError(f"max_length={max_length} leaves no room for text next to the special tokens")
        first = [self._piece_id(p) for p in self.tokenize(text)]
        second = None if pair is None else [self._piece_id(p) for p in self.tokenize(pair)]
        if max_length is not None:
            first, second = _truncate(first, second, len(first) + len(second or ()) + specials - max_length, truncation)
        if add_special_tokens:
            first = self._with_eos(first)
            second = None if second is None else self._with_eos(second)
        ids = first + (second or [])
        sequence_ids = [0] * len(first) + [1] * len(second or ())
        special_ids = {i for i, _, _ in self.added_tokens.values()}
        return Encoding(
            input_ids=ids,
            token_type_ids=[0] * len(ids),
            offsets=[(0, 0)] * len(ids),
            special_tokens_mask=[int(i in special_ids) for i in ids],
            word_ids=[None] * len(ids),
            sequence_ids=sequence_ids,
        )

    def encode_batch(self, texts: list[str], pairs: list[str] | None = None, **kwargs) -> list[Encoding]:
        pairs = pairs if pairs is not None else [None] * len(texts)
        return [self.encode(t, p, **kwargs) for t, p in zip(texts, pairs)]

    # -- decoding -------------------------------------------------------------------------------------------------
    def decode(
        self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """Text of `ids` (SiglipTokenizer's convert_tokens_to_string: special tokens kept apart from the pieces)."""
        special_ids = {i for i, _, _ in self.added_tokens.values()}
        kept = [i for i in ids if not (skip_special_tokens and i in special_ids)]
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(kept))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run, after_special = "", [], False
        for token in tokens:
            if token in self.added_tokens:
                out += ("" if after_special else " ") + self._sp.decode(run) + token
                run, after_special = [], True
            else:
                run.append(token)
                after_special = False
        return (out + self._sp.decode(run)).strip()

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"padding_side={self.padding_side!r})"
        )


def _truncate(first: list[int], second: list[int] | None, excess: int, strategy: str):
    """transformers' truncate_sequences (right side, no overflow): `excess` ids removed from the end of the first
    text, of the second, or (longest_first with a pair) first from the longer one down to the other's length, the
    rest split between both."""
    if excess <= 0:
        return first, second
    if second is None or strategy == "only_first":
        return first[: max(len(first) - excess, 0)], second
    if strategy == "only_second":
        return first, second[: max(len(second) - excess, 0)]
    level = min(abs(len(second) - len(first)), excess)
    rest = excess - level
    if len(first) > len(second):
        cut_first, cut_second = level + rest // 2, rest - rest // 2
    else:
        cut_first, cut_second = rest // 2, level + rest - rest // 2
    return first[: len(first) - cut_first], second[: len(second) - cut_second]


def _load(proto: bytes):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)

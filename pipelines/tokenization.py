"""A thin layer over `tokenizers.Tokenizer`: the files of a Hub folder, truncation, pairs, offsets, overflow.

The padding and truncation stored in tokenizer.json are switched off on load (the MiniLM checkpoint, for
one, pads everything to 128): padding belongs to the batcher, which pads each micro-batch to its
longest member, and truncation is asked for per call with the pipeline's maximum length.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from pipelines.gguf import GGUFCheckpoint
from pipelines.processors.layout import Layout, Mask, Padded

# tokenizer_config.json stores "no limit" as a huge integer (int(1e30)); anything above this means unset.
_UNSET_MAX_LENGTH = 1_000_000
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")


@dataclass
class Encoding:
    """One tokenized input (or one overflow window of it), unpadded."""

    input_ids: list[int]
    token_type_ids: list[int]
    offsets: list[tuple[int, int]]
    special_tokens_mask: list[int]
    word_ids: list[int | None]
    sequence_ids: list[int | None]

    def __len__(self) -> int:
        return len(self.input_ids)

    def model_inputs(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids}


def _encoding(e: tokenizers.Encoding) -> Encoding:
    return Encoding(e.ids, e.type_ids, e.offsets, e.special_tokens_mask, e.word_ids, e.sequence_ids)


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": "[MASK]", ...}
        return value.get("content")
    return value


class Tokenizer:
    """Encodes text and text pairs for a model; knows its special tokens and maximum length. The text processor
    (pipelines/processors): token ids pad to the longest of a micro-batch, the attention mask marks the padding."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        clean_up_spaces: bool = False,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._truncating: dict[tuple, tokenizers.Tokenizer] = {}
        self._lock = threading.Lock()
        self.clean_up_spaces = clean_up_spaces
        self.special_tokens = dict(special_tokens or {})
        self.model_max_length = model_max_length
        self.padding_side = padding_side

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """From a Hub folder's tokenizer files, or from a `.gguf` file's metadata (pipelines/gguf_tokenizer.py)."""
        folder = Path(folder)
        if folder.suffix == ".gguf":
            parts = GGUFCheckpoint.open(folder).tokenizer
            return cls(parts.backend, special_tokens=parts.special_tokens, model_max_length=parts.model_max_length)
        path = folder / "tokenizer.json"
        if not path.is_file() and (folder / "spiece.model").is_file():  # SigLIP ships only its SentencePiece model
            from pipelines.sentencepiece_tokenizer import SentencePieceTokenizer

            return SentencePieceTokenizer.from_pretrained(folder)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {folder}; only fast-tokenizer folders are supported "
                f"(files present: {sorted(p.name for p in folder.iterdir())})"
            )
        config = _read_json(folder / "tokenizer_config.json")
        special = {k: _token_content(v) for k, v in _read_json(folder / "special_tokens_map.json").items()}
        special.update({k: _token_content(config[k]) for k in _SPECIAL_KEYS if config.get(k) is not None})
        max_length = config.get("model_max_length")
        if max_length is not None and max_length > _UNSET_MAX_LENGTH:
            max_length = None
        backend = tokenizers.Tokenizer.from_file(str(path))
        # transformers skips the clean-up for BPE models unless forced: it strips real spaces there.
        clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        )
        return cls(
            backend,
            special_tokens={k: v for k, v in special.items() if k in _SPECIAL_KEYS and v is not None},
            model_max_length=max_length,
            padding_side=config.get("padding_side", "right"),
            clean_up_spaces=clean_up,
        )

    def layout(self, input_names) -> Layout:
        """How these model inputs batch: input_ids padded with the pad token, other id lists with 0, the attention
        mask made from the input_ids' lengths; padded on this tokenizer's side."""
        rules = {"input_ids": Padded(self.pad_token_id), "attention_mask": Mask("input_ids")}
        return Layout(
            {name: rules.get(name, Padded(0)) for name in input_names},
            length="input_ids",
            padding_side=self.padding_side,
        )

    def __getstate__(self) -> dict:  # picklable for Ray workers: the lock and the truncating copies stay behind
        state = dict(self.__dict__)
        state["_lock"], state["_truncating"] = None, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    # -- special tokens -------------------------------------------------------------------------
    def token_id(self, name: str) -> int | None:
        """Id of a special token by role ('pad_token', 'mask_token', ...), None if the tokenizer has none."""
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int:
        pad = self.token_id("pad_token")
        return 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._backend.id_to_token(i) for i in ids]

    def decode(
        self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """Text of `ids`; spaces before punctuation removed where `clean_up_tokenization_spaces` asks for it
        (default: as tokenizer_config.json says)."""
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Token strings back to text through the decoder (transformers' fast-tokenizer method of this name)."""
        decoder = self._backend.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    @property
    def continuing_subword_prefix(self) -> str | None:
        """The model's marker of word-continuing pieces ("##" for WordPiece); None where it has none."""
        return getattr(self._backend.model, "continuing_subword_prefix", None) or None

    def num_special_tokens(self, pair: bool = False) -> int:
        return self._backend.num_special_tokens_to_add(pair)

    # -- encoding ---------------------------------------------------------------------------------
    def _configured(self, max_length: int | None, stride: int, strategy: str) -> tokenizers.Tokenizer:
        """A copy of the backend with this truncation set, cached: one backend is never reconfigured."""
        if max_length is None:
            return self._backend
        if strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"unknown truncation strategy {strategy!r}; allowed: {TRUNCATION_STRATEGIES}")
        key = (max_length, stride, strategy)
        with self._lock:
            backend = self._truncating.get(key)
            if backend is None:
                backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
                backend.enable_truncation(max_length, stride=stride, strategy=strategy)
                self._truncating[key] = backend
        return backend

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
    ) -> Encoding | list[Encoding]:
        """Tokenize one text (or pair). With `return_overflowing`, every window of `max_length`
        tokens overlapping by `stride` is returned as a list, the first window first."""
        if max_length is not None and max_length < self.num_special_tokens(pair is not None) + 1:
            raise ValueError(f"max_length={max_length} leaves no room for text next to the special tokens")
        backend = self._configured(max_length, stride, truncation)
        encoded = backend.encode(text, pair, add_special_tokens=add_special_tokens)
        if not return_overflowing:
            return _encoding(encoded)
        return [_encoding(encoded)] + [_encoding(o) for o in encoded.overflowing]

    def encode_batch(self, texts: list[str], pairs: list[str] | None = None, **kwargs) -> list[Encoding]:
        pairs = pairs if pairs is not None else [None] * len(texts)
        return [self.encode(t, p, **kwargs) for t, p in zip(texts, pairs)]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"padding_side={self.padding_side!r})"
        )


_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the spaces a decoder leaves before punctuation and contractions."""
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)

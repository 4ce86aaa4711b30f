"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's metadata, for checkpoints that ship no tokenizer.json.

    parts = GGUFCheckpoint.open("SmolLM2-135M-Instruct.Q4_1.gguf").tokenizer     # pipelines/gguf.py
    parts = tokenizer_from_gguf(metadata, source)   # from decoded metadata (pipelines.gguf.read_metadata)
    parts.backend.encode("Hi").ids, parts.special_tokens, parts.add_bos_token, parts.model_max_length

The result equals transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`, transformers
5.24, `integrations/gguf/gguf_tokenizer_mapping.py`) down to the serialized tokenizer.json, which is what the tests
compare. Two tokenizer models (`tokenizer.ggml.model`):

- "gpt2": byte-level BPE. Tokens spelled outside the byte alphabet (a raw space, say) are respelled byte by byte, the
  merges are taken as written. The pre-tokenizer is chosen by `tokenizer.ggml.pre` from `_PRE_TOKENIZER_SPLITS` (a
  Split on that vocabulary's regex, then ByteLevel without its own regex); any other `pre` -- "default", "gpt2",
  "smollm", "deepseek-llm" and every name transformers does not list -- gets plain ByteLevel with the GPT-2 regex.
- "llama": SentencePiece-style BPE with byte fallback (Metaspace "first", no normalizer); the merges come from the file
  or, as llama.cpp writes none for these, are recovered from the vocabulary and `tokenizer.ggml.scores`. Files of the
  gemma/phi3 architectures need transformers' special builders and are refused. A `pre` of the table replaces
  Metaspace here too, as in transformers (llama.cpp writes "default" for these vocabularies).

Tokens typed CONTROL (3) become special added tokens (in a byte-level vocabulary only those spelled in the byte
alphabet: the others are llama.cpp mislabels), USER_DEFINED (4) ones plain added tokens. Then, as transformers does,
the default special tokens of the class it builds with are added when not already added tokens ("<|endoftext|>" for
gpt2; "<s>", "</s>", "<unk>" for llama) -- a vocabulary without them grows by those tokens, past the model's
embeddings, which is transformers' behaviour kept on purpose -- and so are the file's bos/eos/unk/pad tokens. The post-
processor puts bos before and eos after each sequence as `tokenizer.ggml.add_bos_token` / `add_eos_token` say
(defaults: add_bos True for "llama", False for "gpt2"; add_eos False). `model_max_length` is `<arch>.context_length`
(transformers leaves it unset).

Where transformers and llama.cpp differ we follow transformers, the reference our pipelines are tested against. On
`pre = "smollm"` (SmolLM2) llama.cpp first isolates every digit (`\\p{N}`), as SmolLM2's own tokenizer.json does
with Digits(individual_digits=True), and then applies the GPT-2 regex; transformers applies plain ByteLevel (the
GPT-2 regex alone), as for "deepseek-llm", where llama.cpp has regexes of its own too. Contractions split alike
(both regexes are case-sensitive: "I'M" is "I", "'", "M"), and SmolLM2's vocabulary joins no digits, but a run of
two or more spaces before a number differs: "a  3" is "a", "Ġ", "Ġ", "3" here (the regex gives the last space to
" 3", and "Ġ3" is no token) and "a", "ĠĠ", "3" in llama.cpp -- 16 of the 391 test strings of
tests/test_gguf_tokenizer.py, all of that kind (measured with Digits + ByteLevel standing in for llama.cpp).
"llama-bpe"/"llama3" and "qwen2" get the regexes llama.cpp uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (1 normal, 2 unknown, 5 unused, 6 byte)
MODELS = ("gpt2", "llama")
# "llama" vocabularies of these architectures are rebuilt by transformers with builders of their own.
_SENTENCEPIECE_SPECIAL_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "phi3")
# role -> the metadata key of its token id
SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# the special tokens of the transformers class each model is built with (bos, eos, unk order): added when absent
_CLASS_DEFAULTS = {"gpt2": ("<|endoftext|>",), "llama": ("<s>", "</s>", "<unk>")}

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex its vocabulary was split with (transformers' table); any other pre: ByteLevel's own
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")
        + ("dbrx", "smaug-bpe"),
        _LLAMA3,
    ),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}


@dataclass(frozen=True)
class GGUFTokenizerParts:
    """What a GGUF file says about its tokenizer: the backend and the settings the Tokenizer wrapper takes."""

    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str]  # role (bos_token, eos_token, unk_token, pad_token) -> token text
    add_bos_token: bool
    add_eos_token: bool
    model_max_length: int | None


def tokenizer_from_gguf(metadata: Mapping[str, object], source: str) -> GGUFTokenizerParts:
    """The tokenizer of a GGUF file from its decoded metadata; `source` (the file) names it in errors."""
    fields = _Fields(metadata, source)
    model = fields.get("tokenizer.ggml.model", str, f"one of {MODELS}")
    if model not in MODELS:
        raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported; supported: {MODELS}")
    architecture = metadata.get("general.architecture")
    if model == "llama" and architecture in _SENTENCEPIECE_SPECIAL_ARCHITECTURES:
        raise ValueError(
            f"{source}: tokenizer.ggml.model='llama' with general.architecture={architecture!r} is not supported "
            f"(its vocabulary needs an architecture-specific builder); supported: any architecture but "
            f"{_SENTENCEPIECE_SPECIAL_ARCHITECTURES}"
        )
    tokens = fields.strings("tokenizer.ggml.tokens", required=True)
    token_types = fields.numbers("tokenizer.ggml.token_type", len(tokens), int)
    special = {
        role: tokens[fields.token_id(key, len(tokens))] for role, key in SPECIAL_TOKEN_IDS.items() if key in metadata
    }

    backend = _byte_level(tokens, fields) if model == "gpt2" else _sentencepiece(tokens, fields)
    # transformers' order, which decides the ids of tokens the vocabulary lacks: its class's defaults, the file's
    # control and user-defined tokens, then the file's bos/eos/unk/pad
    _add_missing_specials(backend, _CLASS_DEFAULTS[model])
    _add_file_tokens(backend, tokens, token_types or (), byte_level=model == "gpt2")
    _add_missing_specials(backend, tuple(special.values()))
    split = _PRE_TOKENIZER_SPLITS.get(fields.get("tokenizer.ggml.pre", str, "a pre-tokenizer name", required=False))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    add_bos = fields.get("tokenizer.ggml.add_bos_token", bool, "true or false", required=False)
    add_bos = (model == "llama") if add_bos is None else add_bos  # llama.cpp adds BOS to an unflagged SentencePiece
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", bool, "true or false", required=False))
    add_bos, add_eos = add_bos and "bos_token" in special, add_eos and "eos_token" in special
    backend.post_processor = _template(
        backend, special.get("bos_token") if add_bos else None, special.get("eos_token") if add_eos else None
    )

    context = metadata.get(f"{architecture}.context_length")
    max_length = context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None
    return GGUFTokenizerParts(backend, special, add_bos, add_eos, max_length)


class _Fields:
    """Typed reads of the metadata; each bad field raises ValueError naming the file, the field and what is allowed."""

    def __init__(self, metadata: Mapping[str, object], source: str):
        self.metadata, self.source = metadata, source

    def fail(self, key: str, problem: str, allowed: str):
        raise ValueError(f"{self.source}: {key} {problem}; allowed: {allowed}")

    def get(self, key: str, kind: type, allowed: str, required: bool = True):
        value = self.metadata.get(key)
        if value is None:
            if required:
                self.fail(key, "is missing", allowed)
            return None
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.fail(key, f"is {type(value).__name__} {value!r:.60}", allowed)
        return value

    def strings(self, key: str, required: bool = False) -> list[str] | None:
        value = self.metadata.get(key)
        if value is None and not required:
            return None
        allowed = "a non-empty list of strings"
        if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
            self.fail(key, "is missing" if value is None else f"is {type(value).__name__} {value!r:.60}", allowed)
        return value

    def numbers(self, key: str, length: int, kind: type) -> list | None:
        value = self.metadata.get(key)
        if value is None:
            return None
        allowed = f"a list of {length} {kind.__name__}s, one per token of tokenizer.ggml.tokens"
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, kind)) for v in value):
            self.fail(key, f"is {type(value).__name__} {value!r:.60}", allowed)
        if len(value) != length:
            self.fail(key, f"has {len(value)} entries for {length} tokens", allowed)
        return value

    def token_id(self, key: str, vocab: int) -> int:
        value = self.get(key, int, f"a token id in [0, {vocab})")
        if not 0 <= value < vocab:
            self.fail(key, f"is {value}, outside the {vocab} tokens of tokenizer.ggml.tokens", f"[0, {vocab})")
        return value


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b], extra = chr(256 + extra), extra + 1
    return spelling


_BYTES = _byte_alphabet()
_ALPHABET = frozenset(_BYTES.values())


def _byte_level(tokens: list[str], fields: _Fields) -> tokenizers.Tokenizer:
    """GPT2Tokenizer's backend: BPE over byte-spelled tokens, ByteLevel pre-tokenizer and decoder."""
    vocab = {
        token if set(token) <= _ALPHABET else "".join(_BYTES[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = _merges(fields, vocab)
    if merges is None:
        fields.fail("tokenizer.ggml.merges", "is missing", "a list of 'left right' merges (byte-level BPE needs them)")
    backend = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(tokens: list[str], fields: _Fields) -> tokenizers.Tokenizer:
    """LlamaTokenizer's backend: BPE with byte fallback, Metaspace on the first word, a decoder that undoes both."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges(fields, vocab)
    if merges is None:
        scores = fields.numbers("tokenizer.ggml.scores", len(tokens), float)
        if scores is None:
            fields.fail(
                "tokenizer.ggml.merges",
                "and tokenizer.ggml.scores are both missing",
                "merges, or one score per token to recover them from",
            )
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return backend


def _merges(fields: _Fields, vocab: dict[str, int]) -> list[tuple[str, str]] | None:
    """The file's merges as pairs; each must join two tokens of the vocabulary into a third."""
    merges = fields.strings("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = [tuple(merge.split(" ")) for merge in merges]
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(pair) or any(part not in vocab for part in (*pair, "".join(pair))):
            fields.fail(
                "tokenizer.ggml.merges",
                f"entry {i} is {merges[i]!r}",
                "'left right': two tokens of the vocabulary, one space between, whose join is a token too",
            )
    return pairs


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens, best score first
    (ties: the longer left piece, then the longer right one, then vocabulary order), as transformers recovers them."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_file_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types, byte_level: bool) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones (matched whole, like llama.cpp) as plain ones."""
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types)
        if kind == CONTROL and (not byte_level or set(token) <= _ALPHABET)
    ]
    if control:
        backend.add_special_tokens(control)
    known = backend.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == USER_DEFINED and t in known
    ]
    if user:
        backend.add_tokens(user)


def _add_missing_specials(backend: tokenizers.Tokenizer, tokens: tuple[str, ...]) -> None:
    """Each special token that is not an added token yet becomes one (a new id if the vocabulary lacks it)."""
    for token in dict.fromkeys(tokens):
        if token not in {t.content for t in backend.get_added_tokens_decoder().values()}:
            backend.add_tokens([AddedToken(token, normalized=False, special=True)])


def _template(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """bos before and eos after each sequence where given: `bos A eos` and `bos A eos bos B eos`, B typed 1."""

    def sequence(name: str, type_id: int) -> list[str]:
        return [*([f"{bos}:{type_id}"] if bos else []), f"${name}:{type_id}", *([f"{eos}:{type_id}"] if eos else [])]

    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(
        single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1), special_tokens=specials
    )

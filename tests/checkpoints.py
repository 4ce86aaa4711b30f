"""Tiny random Hugging Face checkpoints made on the fly, for tests; `transformers` is only used here as an oracle.

`make_checkpoint(path, family, head)` writes what the Hub would hold for a model: config.json, safetensors
(optionally sharded), tokenizer.json plus tokenizer_config.json and special_tokens_map.json, so that both our
loader and `transformers.AutoModel*/AutoTokenizer/pipeline` read the same folder. Model parity tests load our
classes with `load_ours` (the real loader, pipelines/loading.py) and the oracle's with `load_reference`.

Decoders (`DECODER_FAMILIES`, head "causal-lm") get their family's tokenizer style and a chat template in
tokenizer_config.json; config overrides pass through (`make_checkpoint(p, "llama", "causal-lm", rope_scaling=...)`).
`cached_logits` runs a model through the KV cache the way the generation engine does.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipelines.loading import load_model
from pipelines.runtime import RuntimeConfig

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")
HEADS = ("base", "sequence-classification", "token-classification", "question-answering", "masked-lm")

SENTENCES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenization splits unbelievably long words into several pieces, doesn't it?",
    "A café in Zürich serves great coffee.",
    "I loved this movie; the acting was wonderful, and the music was unforgettable.",
    "Numbers like 42 and 3.14 appear in text too.",
    "What is the capital of France? Paris is the capital and the largest city of France.",
    "short",
]

# Whole words of the WordPiece vocabulary; other words split into `##` pieces (e.g. "tokenization" -> token ##ization).
_WORDS = (
    "the a an and or of to in on is it was were be this that these what who where how do does doesn t "
    "i you he she we they my your love loved like movie film acting music wonderful great good bad "
    "hello world quick brown fox jump over lazy dog token word long split into several piece pieces "
    "number numbers appear text too short capital france paris largest city cafe zurich serve coffee "
    "today weather sunny rain model test sentence question answer name john lives new york un"
).split()
_PIECES = "s ed ing ly ization able ably er est un believ forget tion".split()
_PUNCT = list(".,!?;:'\"-()")

# Extra English text for training the byte-level BPE and Unigram vocabularies (plus SENTENCES).
_CORPUS = [
    "My name is John and I live in New York.",
    "The weather today is sunny, but tomorrow it may rain.",
    "Where does the model find the answer to the question?",
    "These sentences are short; they are only used to train a tiny tokenizer.",
    "Good films have great music and wonderful acting.",
]

_TOKENIZER_CLASS = {
    "bert": "BertTokenizerFast",
    "distilbert": "DistilBertTokenizerFast",
    "roberta": "RobertaTokenizerFast",
    "xlm-roberta": "XLMRobertaTokenizerFast",
}

_AUTO_CLASS = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
}


def _wordpiece_tokenizer() -> Tokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = _PUNCT + list("0123456789abcdefghijklmnopqrstuvwxyz")
    vocab = specials + chars + ["##" + c for c in chars] + _WORDS + ["##" + p for p in _PIECES]
    vocab = list(dict.fromkeys(vocab))  # drop duplicates, keep order
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    return tok


def _bytelevel_bpe_tokenizer() -> Tokenizer:
    """RoBERTa style: byte-level BPE, <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4 (left-stripping like roberta-base)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES + _CORPUS, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
    )
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return tok


def _unigram_tokenizer() -> Tokenizer:
    """XLM-RoBERTa style: SentencePiece-like Unigram with Metaspace, <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(SENTENCES + _CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return tok


@functools.cache
def _tokenizer_json(family: str) -> str:
    """The serialized tokenizer of a family (built once per test session: training is deterministic)."""
    build = {
        "bert": _wordpiece_tokenizer,
        "distilbert": _wordpiece_tokenizer,
        "roberta": _bytelevel_bpe_tokenizer,
        "xlm-roberta": _unigram_tokenizer,
    }[family]
    return build().to_str()


def _special_tokens(family: str) -> dict[str, str]:
    if family in ("bert", "distilbert"):
        names = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        return dict(zip(names, ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")))
    return {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    }


def write_tokenizer(path: Path, family: str) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json for `family` into `path`."""
    tokenizer = Tokenizer.from_str(_tokenizer_json(family))
    tokenizer.save(str(path / "tokenizer.json"))
    specials = _special_tokens(family)
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": t == "<mask>",
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in dict.fromkeys(specials.values())
    }
    config = {
        **specials,
        "added_tokens_decoder": added,
        "model_max_length": 64,
        "padding_side": "right",
        "tokenizer_class": _TOKENIZER_CLASS[family],
        "clean_up_tokenization_spaces": False,
    }
    if family in ("bert", "distilbert"):
        config.update(do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True)
    else:
        config.update(add_prefix_space=family == "xlm-roberta", trim_offsets=True)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return tokenizer


def _hf_config(family: str, head: str, vocab_size: int, num_labels: int, id2label, problem_type, overrides: dict):
    import transformers

    sizes = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2)
    if family == "distilbert":
        sizes = dict(dim=32, n_heads=4, hidden_dim=37, n_layers=2, max_position_embeddings=64, pad_token_id=0)
    elif family == "bert":
        sizes.update(max_position_embeddings=64, pad_token_id=0)
    else:  # positions start after the padding id 1, so 64 tokens need 66 positions
        sizes.update(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    if head == "question-answering":
        num_labels, id2label = 2, None  # start and end logits
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    id2label = {int(i): label for i, label in id2label.items()}
    labels = dict(id2label=id2label, label2id={label: i for i, label in id2label.items()}, problem_type=problem_type)
    return transformers.AutoConfig.for_model(family, **{"vocab_size": vocab_size, **sizes, **labels, **overrides})


def make_checkpoint(
    path,
    family: str,
    head: str = "base",
    *,
    num_labels: int = 3,
    sharded: bool = False,
    id2label: dict | None = None,
    problem_type: str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random `family` model with `head` (a Hugging Face folder with tokenizer) into `path`."""
    import transformers

    if family in DECODER_FAMILIES:
        return make_decoder_checkpoint(path, family, head, sharded=sharded, dtype=dtype, **config_overrides)
    if family not in FAMILIES or head not in HEADS:
        raise ValueError(f"unknown family {family!r} or head {head!r}; families: {FAMILIES}, heads: {HEADS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(path, family)
    config = _hf_config(family, head, tokenizer.get_vocab_size(), num_labels, id2label, problem_type, config_overrides)
    torch.manual_seed(0)
    model = getattr(transformers, _AUTO_CLASS[head]).from_config(config)
    with torch.no_grad():  # Hugging Face init leaves biases at 0 and norms at 1: perturb so that every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "50GB")
    return path


def load_ours(path, cls, **runtime) -> torch.nn.Module:
    """Our class `cls` from a Hugging Face folder through the real loader (`pipelines.loading.load_model`): meta
    build, the class's weights mapper, tied weights as config.json's tie_word_embeddings says, strict checks.
    float32 on the CPU unless `runtime` (RuntimeConfig fields: dtype=, device=, ...) says otherwise."""
    return load_model(Path(path), cls, RuntimeConfig.create(**runtime))


def load_reference(path, head: str = "base") -> torch.nn.Module:
    """The transformers model of `head` for the folder, float32, eval mode."""
    import transformers

    return getattr(transformers, _AUTO_CLASS[head]).from_pretrained(path, dtype=torch.float32).eval()


def encode(path, texts, text_pairs=None) -> dict[str, torch.Tensor]:
    """A right-padded batch from the folder's tokenizer, through transformers (the oracle's own inputs)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return dict(tokenizer(texts, text_pairs, padding=True, return_tensors="pt"))


def reference_output(model, head: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The transformers output that our class of the same head returns, as one tensor."""
    with torch.no_grad():
        out = model(**batch)
    if head == "base":
        return out.last_hidden_state
    if head == "question-answering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def assert_parity(ours, reference, head: str, batch: dict[str, torch.Tensor], token_type_ids: bool = True) -> None:
    """Our model equals the reference on `batch` within 1e-4, on real (non-padding) positions for per-token outputs."""
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids") if token_type_ids else None)
    ref_batch = batch if token_type_ids else {k: v for k, v in batch.items() if k != "token_type_ids"}
    want = reference_output(reference, head, ref_batch)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dim() == 3:
        real = batch["attention_mask"].bool()
        got, want = got[real], want[real]  # (N, D) over real tokens
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- decoders (causal language models) ------------------------------------------------------------------------
DECODER_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")
DECODER_HEADS = ("causal-lm",)

# What text generation is tested on: prompts of several lengths and a conversation for the chat templates.
PROMPTS = [
    "Hello world!",
    "The quick brown fox",
    "My name is John and I live in",
    "What is the capital of France? Paris is the capital and the largest city of",
    "a",
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Switzerland?"},
]

# Qwen2's pre-tokenization regex (transformers' Qwen2Tokenizer builds the same pipeline).
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# ChatML, as Qwen2 instruct models ship it.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 2 chat: [INST] turns, an optional <<SYS>> block in the first user turn.
_LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Mistral instruct: [INST] turns; a system message is prefixed to the first user turn.
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def _train_bpe(tok: Tokenizer, specials: list[str], vocab_size: int, alphabet: list[str] = ()) -> Tokenizer:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=list(alphabet), show_progress=False
    )
    texts = SENTENCES + _CORPUS + PROMPTS + [m["content"] for m in CHAT]
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _gpt2_tokenizer() -> Tokenizer:
    """GPT-2 style: byte-level BPE, <|endoftext|> the only special token, nothing added around a sequence."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train_bpe(tok, ["<|endoftext|>"], 400, pre_tokenizers.ByteLevel.alphabet())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _qwen2_tokenizer() -> Tokenizer:
    """Qwen2 style: NFC, its split regex, byte-level BPE; <|endoftext|>, <|im_start|>, <|im_end|> special."""
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    _train_bpe(tok, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 400, pre_tokenizers.ByteLevel.alphabet())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _llama_tokenizer() -> Tokenizer:
    """Llama / Mistral style (SentencePiece BPE as transformers converts it): <unk>=0 <s>=1 </s>=2, the 256 byte
    tokens <0x00>..<0xFF> for byte fallback, then the merged pieces; Metaspace ("▁") pre-tokenization that
    prepends to the first word only, and <s> added in front of every sequence."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    _train_bpe(trained, [], 300)
    model = json.loads(trained.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted(model["vocab"], key=model["vocab"].get)
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


_DECODER_TOKENIZERS = {
    "gpt2": (_gpt2_tokenizer, "GPT2Tokenizer", None),
    "llama": (_llama_tokenizer, "LlamaTokenizer", _LLAMA2_TEMPLATE),
    "mistral": (_llama_tokenizer, "LlamaTokenizer", _MISTRAL_TEMPLATE),
    "qwen2": (_qwen2_tokenizer, "Qwen2Tokenizer", _CHATML_TEMPLATE),
}
_DECODER_SPECIALS = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
}


@functools.cache
def _decoder_tokenizer_json(family: str) -> str:
    return _DECODER_TOKENIZERS[family][0]().to_str()


def write_decoder_tokenizer(path: Path, family: str) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (with the chat template) + special_tokens_map.json for a decoder."""
    tokenizer = Tokenizer.from_str(_decoder_tokenizer_json(family))
    tokenizer.save(str(path / "tokenizer.json"))
    _, tokenizer_class, template = _DECODER_TOKENIZERS[family]
    specials = _DECODER_SPECIALS[family]
    added = {
        str(tokenizer.token_to_id(t.content)): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in tokenizer.get_added_tokens_decoder().values()
    }
    config = {
        **specials,
        "added_tokens_decoder": added,
        "model_max_length": 128,
        "padding_side": "right",
        "tokenizer_class": tokenizer_class,
        "clean_up_tokenization_spaces": False,
    }
    if family in ("llama", "mistral"):
        config.update(add_bos_token=True, add_eos_token=False, legacy=False, add_prefix_space=True)
    else:
        config.update(add_prefix_space=False)
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in specials.items() if v}, indent=2))
    return tokenizer


def _hf_decoder_config(family: str, tokenizer: Tokenizer, overrides: dict):
    import transformers

    if family == "gpt2":
        eos = tokenizer.token_to_id("<|endoftext|>")
        sizes = {
            "n_embd": 32,
            "n_head": 4,
            "n_inner": 37,
            "n_layer": 2,
            "n_positions": 128,
            "bos_token_id": eos,
            "eos_token_id": eos,
        }
    else:
        sizes = {
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "max_position_embeddings": 128,
        }
    if family in ("llama", "mistral"):
        sizes.update(bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        bos, eos = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")
        sizes.update(bos_token_id=bos, eos_token_id=eos)
    vocab_size = tokenizer.get_vocab_size()
    return transformers.AutoConfig.for_model(family, **{"vocab_size": vocab_size, **sizes, **overrides})


def make_decoder_checkpoint(
    path,
    family: str,
    head: str = "causal-lm",
    *,
    sharded: bool = False,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random causal LM of `family` (with its tokenizer and chat template) into `path`.
    Config overrides pass through to transformers, e.g. rope_scaling={...}, sliding_window=5, tie_word_embeddings."""
    import transformers

    if family not in DECODER_FAMILIES or head not in DECODER_HEADS:
        raise ValueError(
            f"unknown family {family!r} or head {head!r}; decoders: {DECODER_FAMILIES}, heads: {DECODER_HEADS}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_decoder_tokenizer(path, family)
    config = _hf_decoder_config(family, tokenizer, copy.deepcopy(config_overrides))  # transformers edits nested dicts
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # perturb every weight; 0.3 (not 0.1) so that greedy decoding does not repeat one token
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "50GB")
    return path


def cached_logits(model, input_ids: torch.Tensor, prefill: int, chunk: int = 1) -> torch.Tensor:
    """Logits (B, T, V) of every position computed through a KV cache, as the generation engine does: the first
    `prefill` tokens in one prefill pass, then `chunk` tokens per pass at their positions (chunk=1 is decoding)."""
    from pipelines import layers

    B, T = input_ids.shape
    n_layers, n_kv, head_dim = model.config.cache_shape
    cache = layers.KVCache(
        n_layers,
        n_kv,
        head_dim,
        slots=B + 1,
        capacity=T + 3,
        device=input_ids.device,
        dtype=next(model.parameters()).dtype,
    )
    with torch.no_grad():
        out = [model(input_ids[:, :prefill], cache=cache.rows(0, prefill, prefill=True))]
        for start in range(prefill, T, chunk):
            ids = input_ids[:, start : start + chunk]
            positions = torch.arange(start, start + ids.shape[1]).expand(B, -1)
            out.append(model(ids, positions, cache=cache.rows(0, start + ids.shape[1])))
    return torch.cat(out, dim=1)

"""Tiny random Hugging Face checkpoints made on the fly, for tests; `transformers` is only used here as an oracle.

`make_checkpoint(path, family, head)` writes what the Hub would hold for a model: config.json, safetensors
(optionally sharded), tokenizer.json plus tokenizer_config.json and special_tokens_map.json, so that both our
loader and `transformers.AutoModel*/AutoTokenizer/pipeline` read the same folder. `load_native` is a minimal
loader for model parity tests (the real one is pipelines/loading.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
        "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>",
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


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / "model.safetensors"]


def load_native(path, cls) -> torch.nn.Module:
    """Our model class `cls` from a Hugging Face folder: meta build, renamed keys, tied weights, strict load."""
    path = Path(path)
    config = cls.config_class.from_hf(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = cls(config)
    state = {}
    for file in _weight_files(path):
        for key, tensor in load_file(file).items():
            name = cls.rename_checkpoint_key(key)
            if name is not None:
                state[name] = tensor
    for target, source in cls.tied_weights.items():
        if target not in state:
            state[target] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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

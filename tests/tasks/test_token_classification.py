"""token-classification: outputs equal transformers.pipeline on the same tiny checkpoints, every option."""

import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers

from pipelines import pipeline
from tests.checkpoints import FAMILIES, SENTENCES
from tests.compare import assert_same_output

ID2LABEL = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
# Words that every tiny tokenizer splits into several pieces, accents, punctuation, and characters that
# some vocabularies lack ("ß": [UNK] for WordPiece, <unk> for Unigram), whose word is the original text.
TEXTS = SENTENCES + ["Tokenization splits unbelievably long words, doesn't it? Straße, Zürich & café!"]
# Longer than the 64-token window of every family (150 to 320 tokens).
LONG = " ".join(SENTENCES[1:7]) + " " + " ".join(SENTENCES[1:5])
STRATEGIES = ("none", "simple", "first", "average", "max")


def _plain(value):
    """transformers returns numpy float32 scores; ours are Python floats (compared within 1e-4)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, np.floating) else value


def _confident_copy(source, target):
    """A copy whose classifier gives clear, varied labels: scaled weights, biases that centre each label's
    mean logit over TEXTS (so every label wins somewhere), "O" a little favoured. Random heads otherwise
    give near-uniform scores where argmax ties would make the comparison meaningless."""
    shutil.copytree(source, target)
    model = transformers.AutoModelForTokenClassification.from_pretrained(target).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
        model.classifier.bias.zero_()
        batch = tokenizer(TEXTS + [LONG], padding=True, truncation=True, return_tensors="pt")
        logits = model(**batch).logits[batch["attention_mask"].bool()]  # (N, 5) over real tokens
        model.classifier.bias.sub_(logits.mean(0))
        model.classifier.bias[0] += 1.0
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module", params=FAMILIES)
def pair_of_pipelines(request, checkpoint, tmp_path_factory):
    source = checkpoint(request.param, "token-classification", num_labels=5, id2label=ID2LABEL)
    path = _confident_copy(source, tmp_path_factory.mktemp("token-classification") / request.param)
    ref = transformers.pipeline("token-classification", model=str(path))
    return pipeline("token-classification", model=path), lambda *a, **kw: _plain(ref(*a, **kw))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Tokenizer does not support real words")
        yield


@pytest.mark.parametrize("ignore_labels", [None, []])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_transformers(pair_of_pipelines, strategy, ignore_labels):
    """Labels, words, offsets and indices equal (scores within 1e-4) for each aggregation strategy."""
    ours, ref = pair_of_pipelines
    kwargs = {"aggregation_strategy": strategy}
    if ignore_labels is not None:
        kwargs["ignore_labels"] = ignore_labels
    expected = ref(TEXTS, **kwargs)
    assert_same_output(ours(TEXTS, batch_size=3, **kwargs), expected)
    found = [e.get("entity_group", e.get("entity")) for entities in expected for e in entities]
    assert {"PER", "LOC"} <= set(found) or {"B-PER", "B-LOC"} <= set(found)  # varied labels, not one everywhere
    assert ("O" in found) == (ignore_labels == [])


def test_single_text_and_default_labels_match_transformers(pair_of_pipelines):
    """A single string returns one list; by default no aggregation and "O" tokens dropped."""
    ours, ref = pair_of_pipelines
    expected = ref(TEXTS[-1])
    assert_same_output(ours(TEXTS[-1]), expected)
    assert "O" not in {e["entity"] for e in expected} and len(expected) > 0
    assert_same_output(ours(TEXTS[-1], ignore_labels=["O", "B-PER"]), ref(TEXTS[-1], ignore_labels=["O", "B-PER"]))


STRIDES = [{"aggregation_strategy": s, "stride": 16} for s in STRATEGIES[1:]] + [
    {"stride": 16},  # transformers accepts stride without a strategy: per-token output, de-duplicated
    {"aggregation_strategy": "first", "stride": 0, "ignore_labels": []},
]


@pytest.mark.parametrize("kwargs", STRIDES)
def test_stride_covers_long_text_as_transformers(pair_of_pipelines, kwargs):
    """With stride, overlapping windows over the whole text, entities merged and de-duplicated as transformers."""
    ours, ref = pair_of_pipelines
    expected = ref(LONG, **kwargs)
    assert_same_output(ours(LONG, **kwargs), expected)
    assert max(e["end"] for e in expected) > len(LONG) // 2  # beyond the first window


def test_long_text_without_stride_is_truncated_as_transformers(pair_of_pipelines):
    """Without stride, only the first window is labelled (transformers truncates the same way)."""
    ours, ref = pair_of_pipelines
    for strategy in ("none", "simple"):
        expected = ref(LONG, aggregation_strategy=strategy, ignore_labels=[])
        assert_same_output(ours(LONG, aggregation_strategy=strategy, ignore_labels=[]), expected)
        assert max(e["end"] for e in expected) < len(LONG) - 50


def test_batch_equals_one_at_a_time(pair_of_pipelines):
    """Chunks of several texts micro-batched together give each text what it gets alone."""
    ours, _ = pair_of_pipelines
    texts = [LONG, *TEXTS, LONG[100:]]
    batched = ours(texts, batch_size=4, aggregation_strategy="simple", stride=8)
    alone = [ours(text, batch_size=1, aggregation_strategy="simple", stride=8) for text in texts]
    assert_same_output(batched, alone, atol=1e-5)
    assert_same_output(list(ours(iter(TEXTS), batch_size=5)), [ours(text) for text in TEXTS], atol=1e-5)


def test_parameters_at_construction_and_alias(checkpoint):
    """aggregation_strategy given to pipeline("ner") is every call's default; a per-call value overrides it."""
    path = checkpoint("bert", "token-classification", num_labels=5, id2label=ID2LABEL)
    pipe = pipeline("ner", model=path, aggregation_strategy="simple", ignore_labels=[])
    ref = transformers.pipeline("ner", model=str(path), aggregation_strategy="simple", ignore_labels=[])
    assert_same_output(pipe(TEXTS), _plain(ref(TEXTS)))
    assert_same_output(pipe(TEXTS, aggregation_strategy="none"), _plain(ref(TEXTS, aggregation_strategy="none")))
    assert all("entity_group" in e for e in pipe(TEXTS[2]))


def test_bad_parameters_and_inputs_are_named(checkpoint):
    """Unknown parameters, strategies, bad strides and non-string inputs raise errors naming what is allowed."""
    pipe = pipeline("token-classification", model=checkpoint("bert", "token-classification", num_labels=5))
    with pytest.raises(ValueError, match=r"unknown aggregation_strategy 'longest'; allowed: \('none', 'simple'"):
        pipe("x", aggregation_strategy="longest")
    with pytest.raises(TypeError, match="unknown parameters.*'aggregation'.*allowed: aggregation_strategy"):
        pipe("x", aggregation="simple")
    with pytest.raises(ValueError, match='stride .* needs an aggregation_strategy other than "none"'):
        pipe("x", aggregation_strategy="none", stride=8)
    with pytest.raises(ValueError, match="stride must be less than 62"):
        pipe("x", aggregation_strategy="simple", stride=62)
    with pytest.raises(ValueError, match="stride must be a non-negative integer"):
        pipe("x", aggregation_strategy="simple", stride=-1)
    with pytest.raises(TypeError, match="input #1: expected a string, got int"):
        pipe(["a", 3])
    with pytest.raises(TypeError, match="ignore_labels must be a list"):
        pipe("x", ignore_labels="O")
    with pytest.raises(ValueError, match="is_split_into_words=True is not supported"):
        pipe(["a", "b"], is_split_into_words=True)

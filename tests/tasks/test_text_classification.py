"""text-classification: outputs equal transformers.pipeline on the same tiny checkpoints, every option."""

import pytest
import transformers

from pipelines import pipeline
from tests.checkpoints import FAMILIES, SENTENCES
from tests.compare import assert_same_output

PAIRS = [
    {"text": "Is it raining?", "text_pair": "The streets are wet today."},
    {"text": SENTENCES[1], "text_pair": SENTENCES[3]},
]


@pytest.fixture(scope="module", params=FAMILIES)
def pair_of_pipelines(request, checkpoint):
    path = checkpoint(request.param, "sequence-classification", num_labels=3)
    return pipeline("text-classification", model=path), transformers.pipeline("text-classification", model=str(path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"top_k": None},
        {"top_k": 2},
        {"top_k": 1},
        {"function_to_apply": "sigmoid"},
        {"function_to_apply": "none"},
        {"function_to_apply": "softmax", "top_k": None},
    ],
)
def test_batch_options_match_transformers(pair_of_pipelines, kwargs):
    """Labels equal and scores within 1e-4 for lists, for each top_k / function_to_apply option."""
    ours, ref = pair_of_pipelines
    assert_same_output(ours(SENTENCES, batch_size=3, **kwargs), ref(SENTENCES, **kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"top_k": None}, {"top_k": 2}])
def test_single_string_shape_matches_transformers(pair_of_pipelines, kwargs):
    """A single string returns what transformers returns (a one-element list unless top_k is given)."""
    ours, ref = pair_of_pipelines
    assert_same_output(ours(SENTENCES[2], **kwargs), ref(SENTENCES[2], **kwargs))


def test_text_pairs_match_transformers(pair_of_pipelines):
    """{"text", "text_pair"} dicts, single and in a list, classify the pair as transformers does."""
    ours, ref = pair_of_pipelines
    assert_same_output(ours(PAIRS), ref(PAIRS))
    assert_same_output(ours(PAIRS[0], top_k=None), ref(PAIRS[0], top_k=None))


@pytest.mark.parametrize(
    "options",
    [
        {"problem_type": "multi_label_classification", "num_labels": 4},
        {"num_labels": 1},
        {"problem_type": "regression", "num_labels": 1},
        {"num_labels": 2, "id2label": {0: "NEGATIVE", 1: "POSITIVE"}},
    ],
)
def test_label_configs_match_transformers(checkpoint, options):
    """Multi-label (sigmoid), one label (sigmoid), regression (raw) and named labels follow config.json."""
    path = checkpoint("bert", "sequence-classification", **options)
    ours, ref = pipeline("sentiment-analysis", model=path), transformers.pipeline("sentiment-analysis", model=str(path))
    assert_same_output(ours(SENTENCES), ref(SENTENCES))
    assert_same_output(ours(SENTENCES, top_k=None), ref(SENTENCES, top_k=None))


def test_parameters_at_construction_are_defaults(checkpoint):
    """top_k given to pipeline() applies to every call; a per-call value overrides it."""
    path = checkpoint("bert", "sequence-classification")
    pipe = pipeline("text-classification", model=path, top_k=None)
    ref = transformers.pipeline("text-classification", model=str(path), top_k=None)
    assert [len(scores) for scores in pipe(SENTENCES)] == [3] * len(SENTENCES)
    assert_same_output(pipe(SENTENCES), ref(SENTENCES))
    assert_same_output(pipe(SENTENCES[0]), ref(SENTENCES[0]))  # [[...]]: transformers' single-string wrapping
    assert_same_output(pipe(SENTENCES, top_k=1), ref(SENTENCES, top_k=1))


def test_bad_parameters_and_inputs_are_named(checkpoint):
    """A bad function_to_apply, a misspelt parameter or a bad input fails naming it and what is allowed."""
    path = checkpoint("bert", "sequence-classification")
    pipe = pipeline("text-classification", model=path)
    with pytest.raises(ValueError, match="function_to_apply"):
        pipe("x", function_to_apply="tanh")
    with pytest.raises(TypeError, match="unknown parameters.*'topk'"):
        pipe("x", topk=2)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        pipe("x", top_k=0)
    with pytest.raises(ValueError, match="'text' and 'text_pair'"):
        pipe({"txt": "a"})
    with pytest.raises(TypeError, match="input #2: expected a string, got int"):
        pipe(["a", "b", 3])
    with pytest.raises(TypeError, match="text pair"):
        pipe([["a", "b"]])

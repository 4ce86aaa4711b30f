"""zero-shot-classification: outputs equal transformers.pipeline on the same tiny NLI checkpoints, every option."""

import pytest
import transformers

from pipelines import pipeline
from tests.checkpoints import FAMILIES, SENTENCES
from tests.compare import assert_same_output

LABEL_ORDERS = {
    "contradiction-first": {0: "contradiction", 1: "neutral", 2: "entailment"},
    "entailment-first": {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"},
}
LONG = "The quick brown fox jumps over the lazy dog. " * 12  # over the 64-token window: the sequence is cut


@pytest.fixture(scope="module", params=[(f, o) for f in FAMILIES for o in LABEL_ORDERS], ids=lambda p: "-".join(p))
def pair_of_pipelines(request, checkpoint):
    family, order = request.param
    path = checkpoint(family, "sequence-classification", num_labels=3, id2label=LABEL_ORDERS[order])
    ours = pipeline("zero-shot-classification", model=path)
    return ours, transformers.pipeline("zero-shot-classification", model=str(path))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"candidate_labels": ["sports", "politics", "cooking food"]},
        {"candidate_labels": "sports, politics,, music "},
        {"candidate_labels": ["sports", "politics"], "hypothesis_template": "This text is about {}!"},
        {"candidate_labels": ["sports", "politics", "music"], "multi_label": True},
        {"candidate_labels": ["sports", "politics"], "multi_label": False},
        {"candidate_labels": "weather"},
    ],
)
def test_batch_options_match_transformers(pair_of_pipelines, kwargs):
    """Labels in the same order and scores within 1e-4 for lists (chunks of several inputs batched together)."""
    ours, ref = pair_of_pipelines
    inputs = SENTENCES + [LONG]
    assert_same_output(ours(inputs, batch_size=5, **kwargs), ref(inputs, **kwargs))


def test_single_input_and_positional_labels_match_transformers(pair_of_pipelines):
    """A single string returns one dict; candidate labels may come as the second positional argument."""
    ours, ref = pair_of_pipelines
    assert_same_output(ours(SENTENCES[4], ["movies", "food"]), ref(SENTENCES[4], ["movies", "food"]))
    assert_same_output(ours([SENTENCES[4]], "movies"), ref([SENTENCES[4]], "movies"))


def test_entailment_index_found_by_name(pair_of_pipelines):
    """The entailment class is the label named entail* whatever its position (transformers agrees)."""
    ours, ref = pair_of_pipelines
    assert ours.entailment_id == ref.entailment_id != -1


def test_without_entailment_label_uses_last_class_like_transformers(checkpoint):
    """A model with no entail* label falls back to the last class (index -1), as transformers does."""
    path = checkpoint("bert", "sequence-classification", num_labels=3)
    ours = pipeline("zero-shot-classification", model=path)
    ref = transformers.pipeline("zero-shot-classification", model=str(path))
    assert ours.entailment_id == -1
    for multi_label in (False, True):
        kwargs = {"candidate_labels": ["a", "b"], "multi_label": multi_label}
        assert_same_output(ours(SENTENCES, **kwargs), ref(SENTENCES, **kwargs))


def test_results_do_not_depend_on_batching(checkpoint):
    """Scores are the same whether each chunk runs alone or mixed with other inputs' chunks."""
    path = checkpoint("roberta", "sequence-classification", num_labels=3, id2label=LABEL_ORDERS["contradiction-first"])
    pipe = pipeline("zero-shot-classification", model=path, candidate_labels=["a", "bb", "ccc ddd"])
    assert_same_output(pipe(SENTENCES, batch_size=1), pipe(SENTENCES, batch_size=16, max_batch_tokens=200))


def test_parameters_at_construction_are_defaults(checkpoint):
    """candidate_labels and multi_label given to pipeline() apply to every call; per-call values override them."""
    path = checkpoint("bert", "sequence-classification", num_labels=3, id2label=LABEL_ORDERS["entailment-first"])
    pipe = pipeline("zero-shot-classification", model=path, candidate_labels="x, y", multi_label=True)
    ref = transformers.pipeline("zero-shot-classification", model=str(path))
    assert_same_output(pipe(SENTENCES), ref(SENTENCES, candidate_labels="x, y", multi_label=True))
    assert_same_output(pipe(SENTENCES, multi_label=False), ref(SENTENCES, candidate_labels="x, y"))


def test_bad_parameters_and_inputs_are_named(checkpoint):
    """No labels, a template without {}, non-string sequences and unknown parameters raise errors naming them."""
    path = checkpoint("bert", "sequence-classification", num_labels=3, id2label=LABEL_ORDERS["contradiction-first"])
    pipe = pipeline("zero-shot-classification", model=path)
    with pytest.raises(ValueError, match="input #0: no candidate labels"):
        pipe("some text")
    with pytest.raises(ValueError, match="no candidate labels"):
        pipe("some text", candidate_labels=" , ")
    with pytest.raises(ValueError, match="hypothesis_template 'About it.' has no '{}'"):
        pipe("some text", candidate_labels="a", hypothesis_template="About it.")
    with pytest.raises(ValueError, match="hypothesis_template 'About {label}.'"):
        pipe("some text", candidate_labels="a", hypothesis_template="About {label}.")
    with pytest.raises(TypeError, match="input #1: expected a string sequence, got int"):
        pipe(["text", 3], candidate_labels="a")
    with pytest.raises(TypeError, match="candidate_labels must be a list of strings"):
        pipe("text", candidate_labels=[1, 2])
    with pytest.raises(TypeError, match="multi_label must be True or False"):
        pipe("text", candidate_labels="a", multi_label="yes")
    with pytest.raises(TypeError, match="unknown parameters.*'labels'.*allowed: candidate_labels"):
        pipe("text", labels="a")
    with pytest.raises(ValueError, match="hypothesis .* leaving none for the sequence"):
        pipe("text", candidate_labels=["word " * 70])

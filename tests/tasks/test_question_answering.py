"""question-answering: outputs equal transformers 4.57's pipeline (committed references), batching, bad input."""

import json
from pathlib import Path

import pytest

from pipelines import pipeline
from tests.compare import assert_same_output

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "qa_reference"  # made by tests/data/make_qa_reference.py
FAMILIES = ("bert", "roberta")
QUESTION, CONTEXT = "Where does John live?", "My name is John and I live in New York."


def _cases(family: str) -> list[dict]:
    return json.loads((REFERENCE / family / "reference.json").read_text())["cases"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request):
    return request.param, pipeline("question-answering", model=REFERENCE / request.param)


def _call(pipe, case: dict, **options):
    if "keywords" in case:
        return pipe(**case["keywords"], **case["params"], **options)
    return pipe(case["inputs"], **case["params"], **options)


def _without_filler(output):
    """transformers' output less its score-0 shortlist filler (see QuestionAnsweringPipeline's docstring)."""
    if isinstance(output, list) and output and isinstance(output[0], list):
        return [_without_filler(o) for o in output]
    answers = [a for a in (output if isinstance(output, list) else [output]) if a["score"] > 0]
    return answers[0] if len(answers) == 1 else answers


@pytest.mark.parametrize("name", [case["name"] for case in _cases("bert")])
def test_outputs_match_transformers_457(family_pipe, name):
    """Answers, offsets and result shapes equal transformers 4.57 and scores are within 1e-4, for every option."""
    family, pipe = family_pipe
    case = next(c for c in _cases(family) if c["name"] == name)
    expected = _without_filler(case["output"]) if case["zero_score_filler"] else case["output"]
    assert_same_output(_call(pipe, case, batch_size=3), expected)


def test_chunk_counts_match_transformers(family_pipe):
    """Long contexts are cut into as many overlapping windows as transformers makes, for each max_seq_len/doc_stride."""
    family, pipe = family_pipe
    long_cases = [c for c in _cases(family) if c["name"].startswith("long")]
    assert long_cases and all(max(c["chunks"]) > 1 for c in long_cases)
    for case in long_cases:
        pre = pipe._sanitize_parameters(**case["params"])[0]
        chunks = [len(pipe.preprocess_item(item, i, pre)) for i, item in enumerate(case["inputs"])]
        assert chunks == case["chunks"], case["name"]


def test_zero_score_filler_is_the_only_difference(family_pipe):
    """Where transformers pads a short context's answers with score-0 spans, ours are exactly its others."""
    family, pipe = family_pipe
    case = next(c for c in _cases(family) if c["name"] == "few_spans_top_k_5")
    assert case["zero_score_filler"] and any(a["score"] == 0 for a in case["output"])
    ours = _call(pipe, case)
    assert all(a["score"] > 0 and a["answer"] for a in ours)
    assert_same_output(ours, _without_filler(case["output"]))


@pytest.mark.parametrize("params", [{}, {"top_k": 3, "max_seq_len": 40, "doc_stride": 12}, {"align_to_words": False}])
def test_batched_equals_one_at_a_time(family_pipe, params):
    """Chunks of several inputs batched together (padded, length-sorted) give each input's own answers."""
    family, pipe = family_pipe
    inputs = [item for c in _cases(family) if c["name"] in ("short", "long") for item in c["inputs"]]
    one_by_one = [pipe(item, batch_size=1, **params) for item in inputs]
    assert_same_output(pipe(inputs, batch_size=7, **params), one_by_one, atol=1e-6)
    assert_same_output(list(pipe(iter(inputs), batch_size=2, **params)), one_by_one, atol=1e-6)


def test_parameters_at_construction_are_defaults():
    """top_k given to pipeline() applies to every call; a per-call value overrides it."""
    pipe = pipeline("question-answering", model=REFERENCE / "bert", top_k=3)
    assert len(pipe(question=QUESTION, context=CONTEXT)) == 3
    assert isinstance(pipe(question=QUESTION, context=CONTEXT, top_k=1), dict)


def test_bad_inputs_are_named():
    """Missing, empty, non-string or mismatched questions and contexts raise errors naming the problem."""
    pipe = pipeline("question-answering", model=REFERENCE / "bert")
    with pytest.raises(ValueError, match="context is missing"):
        pipe(question=QUESTION)
    with pytest.raises(ValueError, match="question is missing"):
        pipe(context=CONTEXT)
    with pytest.raises(ValueError, match="input #0: the input has no 'context'"):
        pipe({"question": QUESTION})
    with pytest.raises(ValueError, match="input #1: the input has no 'question'"):
        pipe([{"question": QUESTION, "context": CONTEXT}, {"question": None, "context": CONTEXT}])
    with pytest.raises(ValueError, match="question is empty"):
        pipe(question="", context=CONTEXT)
    with pytest.raises(ValueError, match="context is empty"):
        pipe({"question": QUESTION, "context": ""})
    with pytest.raises(TypeError, match="context must be a string, got int"):
        pipe(question=QUESTION, context=3)
    with pytest.raises(TypeError, match="input #1: question must be a string, got list"):
        pipe([{"question": QUESTION, "context": CONTEXT}, {"question": ["a"], "context": CONTEXT}])
    with pytest.raises(ValueError, match="2 questions and 3 contexts"):
        pipe(question=[QUESTION] * 2, context=[CONTEXT] * 3)
    with pytest.raises(ValueError, match="list of contexts"):
        pipe(question=QUESTION, context=[CONTEXT, CONTEXT])
    with pytest.raises(TypeError, match="is a dict"):
        pipe("Where does John live? My name is John.")
    with pytest.raises(ValueError, match="unknown keys \\['answer'\\]"):
        pipe({"question": QUESTION, "context": CONTEXT, "answer": "New York"})
    with pytest.raises(TypeError, match="not both"):
        pipe({"question": QUESTION, "context": CONTEXT}, question=QUESTION)


def test_bad_parameters_are_named():
    """Unknown parameters list the allowed ones; bad values and windows that cannot fit raise ValueError."""
    pipe = pipeline("question-answering", model=REFERENCE / "bert")
    with pytest.raises(TypeError, match="unknown parameters \\['topk'\\]; allowed: top_k, doc_stride"):
        pipe(question=QUESTION, context=CONTEXT, topk=2)
    for name in ("top_k", "max_answer_len", "max_seq_len"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            pipe(question=QUESTION, context=CONTEXT, **{name: 0})
    with pytest.raises(TypeError, match="align_to_words must be True or False"):
        pipe(question=QUESTION, context=CONTEXT, align_to_words="yes")
    with pytest.raises(ValueError, match="max_seq_len=65 is more than the model's maximum of 64"):
        pipe(question=QUESTION, context=CONTEXT, max_seq_len=65)
    with pytest.raises(ValueError, match="doc_stride \\(20\\) is larger than max_seq_len \\(16\\)"):
        pipe(question=QUESTION, context=CONTEXT, max_seq_len=16, doc_stride=20)
    with pytest.raises(ValueError, match="input #0: doc_stride=10 must be smaller than the 5 context tokens"):
        pipe(question=QUESTION, context=CONTEXT * 3, max_seq_len=16, doc_stride=10)
    with pytest.raises(ValueError, match="leaving no room for the context within max_seq_len=8"):
        pipe(question=QUESTION, context=CONTEXT, max_seq_len=8, doc_stride=2)

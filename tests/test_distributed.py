"""The Ray Data stages as plain callables on Arrow tables (no Ray running): results equal the in-process
pipeline, rows stay 1:1, bad rows are recorded or named, model failures are isolated to their rows."""

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipelines import pipeline
from pipelines.distributed import (
    STATS_COLUMNS,
    ModelStage,
    RowError,
    StageSpec,
    answer_type,
    postprocess_batch,
    preprocess_batch,
    ray_task,
)
from pipelines.runtime import RuntimeConfig
from tests.checkpoints import SENTENCES
from tests.faults import simulate_oom

QA_MODEL = Path(__file__).resolve().parent / "data" / "qa_reference" / "bert"


def _spec(task, model, **kw):
    pipe = pipeline(task, model, load_weights=False)
    defaults = dict(
        column="text",
        output_column=ray_task(pipe.task).output_column,
        error_column="error",
        id_column="id",
        runtime=RuntimeConfig(device="cpu"),
    )
    return StageSpec(task=pipe.task, model=str(model), **{**defaults, **kw})


def _run(spec, table, model_stage=None):
    model_stage = model_stage or ModelStage(spec)
    return postprocess_batch(model_stage(preprocess_batch(table, spec)), spec)


def _table(values, **columns):
    return pa.table({"id": list(range(len(values))), "text": pa.array(values, type=pa.string()), **columns})


def test_embeddings_equal_in_process_and_keep_input_columns(checkpoint):
    """The three stages give what the pipeline gives in process; input columns stay, internal ones go."""
    path = checkpoint("bert")
    spec = _spec("sentence-embeddings", path)
    out = _run(spec, _table(SENTENCES, lang=["en"] * len(SENTENCES)))
    assert out.column_names == ["id", "text", "lang", "embedding", "error"]
    assert out.column("error").null_count == len(SENTENCES)
    assert out.schema.field("embedding").type == pa.list_(pa.float32())
    expected = torch.tensor(pipeline("sentence-embeddings", path)(SENTENCES))
    torch.testing.assert_close(torch.tensor(out.column("embedding").to_pylist()), expected, atol=1e-5, rtol=0)


def test_stats_columns_kept_only_when_asked(checkpoint):
    """jobs.infer sums the per-row stats columns; run_pipeline users do not see them unless they ask."""
    path = checkpoint("bert")
    out = _run(_spec("sentence-embeddings", path, stats=True), _table(SENTENCES[:3]))
    assert set(STATS_COLUMNS) <= set(out.column_names)
    assert out.column("__tokens").to_pylist() == [
        len(pipeline("sentence-embeddings", path).preprocess(t)["input_ids"]) for t in SENTENCES[:3]
    ]


def test_classification_structs_equal_in_process(checkpoint):
    """Classification rows through the stage functions are Arrow structs equal to the in-process answers."""
    path = checkpoint("bert", "sequence-classification")
    out = _run(_spec("text-classification", path, params={"top_k": 2}), _table(SENTENCES))
    expected = pipeline("text-classification", path, top_k=2)(SENTENCES)
    got = out.column("classification").to_pylist()
    assert [[a["label"] for a in row] for row in got] == [[a["label"] for a in row] for row in expected]
    for row, ref in zip(got, expected):
        assert [a["score"] for a in row] == pytest.approx([a["score"] for a in ref], abs=1e-6)


def test_ner_rows_without_entities_keep_the_column_type(checkpoint):
    """An all-"O" batch must not produce list<null>: parts written by different blocks must share a schema."""
    path = checkpoint("bert", "token-classification")
    spec = _spec(
        "ner", path, params={"aggregation_strategy": "simple", "ignore_labels": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    )
    out = _run(spec, _table(SENTENCES[:2]))
    assert out.column("entities").to_pylist() == [[], []]
    assert out.schema.field("entities").type.value_type.names == ["entity_group", "score", "word", "start", "end"]


def test_question_answering_chunks_stay_in_their_row():
    """A context split into many chunks is batched with the other rows' chunks, and comes back as one row."""
    long_context = " ".join(["My name is John and I live in New York."] * 40)
    questions = ["Where does John live?", "What is my name?", "Who lives in New York?"]
    contexts = [long_context, "My name is John.", long_context[:200]]
    spec = _spec("question-answering", QA_MODEL, column={"question": "q", "context": "c"}, params={"doc_stride": 32})
    pipe = pipeline("question-answering", QA_MODEL, doc_stride=32)
    assert len(pipe.preprocess_item({"question": questions[0], "context": long_context}, 0)) > 3
    out = _run(spec, pa.table({"id": [0, 1, 2], "q": questions, "c": contexts}))
    assert out.num_rows == 3
    expected = [pipe(question=q, context=c) for q, c in zip(questions, contexts)]
    for got, ref in zip(out.column("answer").to_pylist(), expected):
        assert (got["answer"], got["start"], got["end"]) == (ref["answer"], ref["start"], ref["end"])
        assert got["score"] == pytest.approx(ref["score"], abs=1e-6)


def test_bad_rows_are_recorded_and_the_others_answered(checkpoint):
    """on_error="record": null, empty and non-string rows get a reason; every other row gets its answer."""
    path = checkpoint("bert", "sequence-classification")
    values = ["good text", None, "", "x " * 50_000, 12, "another good one"]
    table = pa.table({"id": list(range(6)), "text": _objects(values)})
    out = _run(_spec("text-classification", path), table)
    errors = dict(zip(out.column("id").to_pylist(), out.column("error").to_pylist()))
    assert errors[1] == "TypeError: expected a string, got NoneType"
    assert errors[4] == "TypeError: expected a string, got int"
    assert {i for i, e in errors.items() if e is None} == {0, 2, 3, 5}  # empty and very long texts are answered
    answers = out.column("classification").to_pylist()
    assert answers[1] is None and answers[4] is None and answers[3]["label"].startswith("LABEL_")


def _objects(values):
    """A column holding mixed Python values, as Ray Data stores them (pickled objects) when Arrow cannot type them."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    return ArrowPythonObjectArray.from_objects(values)


def test_raise_names_the_row(checkpoint):
    """Without an error column a bad row raises RowError naming its id (or its input when there is no id column)."""
    path = checkpoint("bert", "sequence-classification")
    spec = _spec("text-classification", path, error_column=None)
    with pytest.raises(RowError, match=r"row id=1: TypeError: expected a string, got NoneType"):
        preprocess_batch(_table(["fine", None]), spec)
    spec = _spec("text-classification", path, error_column=None, id_column=None)
    with pytest.raises(RowError, match=r"row with input None: TypeError"):
        preprocess_batch(_table(["fine", None]), spec)


def test_a_row_that_does_not_fit_in_memory_is_that_rows_error(checkpoint):
    """Out of memory on one long row, even alone: that row is recorded, the batch's other rows are answered."""
    path = checkpoint("bert", "sequence-classification")
    spec = _spec("text-classification", path)
    stage = ModelStage(spec)
    simulate_oom(stage.pipe.model, max_tokens=40)
    out = _run(spec, _table(["short text", "hello " * 60, "world"]), stage)
    assert out.column("error").to_pylist()[0] is None and out.column("error").to_pylist()[2] is None
    assert "out of memory" in out.column("error").to_pylist()[1]


def test_a_model_failure_on_one_row_spares_the_others(checkpoint, monkeypatch):
    """A batch that fails is rerun row by row; only the row that fails alone gets the error."""
    path = checkpoint("bert", "sequence-classification")
    spec = _spec("text-classification", path)
    stage = ModelStage(spec)
    poison = stage.pipe.preprocess("poison")["input_ids"]
    run_model = stage.pipe.run_model

    def failing(features, **kw):
        if any(f["input_ids"] == poison for f in features):
            raise RuntimeError("device assert triggered")
        return run_model(features, **kw)

    monkeypatch.setattr(stage.pipe, "run_model", failing)
    out = _run(spec, _table(["fine", "poison", "also fine"]), stage)
    assert out.column("error").to_pylist() == [None, "RuntimeError: device assert triggered", None]


def test_a_batch_where_every_row_fails_fails_as_a_whole(checkpoint, monkeypatch):
    """If every row fails even alone the device is broken, not the rows: raise, so Ray retries elsewhere."""
    path = checkpoint("bert", "sequence-classification")
    spec = _spec("text-classification", path)
    stage = ModelStage(spec)
    monkeypatch.setattr(
        stage.pipe, "run_model", lambda features, **kw: (_ for _ in ()).throw(RuntimeError("CUDA error"))
    )
    with pytest.raises(RuntimeError, match="every row of a batch of 2 failed"):
        stage(preprocess_batch(_table(["a", "b"]), spec))


def test_answer_type_narrows_float_lists_only():
    """answer_type stores float lists as float32 and keeps structs and given types as they are."""
    assert answer_type([[0.5, 1.0]], None) == pa.list_(pa.float32())
    assert answer_type([[[0.5]]], None) == pa.list_(pa.list_(pa.float32()))
    assert answer_type([{"label": "a", "score": 0.5}], None) == pa.struct(
        [("label", pa.string()), ("score", pa.float64())]
    )
    assert answer_type([[]], pa.list_(pa.int64())) == pa.list_(pa.int64())

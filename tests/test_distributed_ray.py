"""run_pipeline on a real local Ray instance (one per module, stopped at the end): the plan keeps the three
stages apart, rows stay 1:1 (chunk pipelines too), bad rows, and a model actor killed mid-job."""

import os
import signal
from pathlib import Path

import pytest
import ray
import torch

from pipelines import pipeline, run_pipeline
from tests.checkpoints import SENTENCES

QA_MODEL = Path(__file__).resolve().parent / "data" / "qa_reference" / "bert"
NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A Ray instance owned by this module, with Ray's defaults for local instances (token auth on; the token
    in ~/.ray/auth_token, made if missing). ray.init sets RAY_AUTH_MODE in os.environ: put it back after."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _rows(n, texts=SENTENCES):
    return [{"id": i, "text": f"{texts[i % len(texts)]} {i}"} for i in range(n)]


def test_three_separate_stages_and_results_equal_in_process(checkpoint):
    """Preprocess, model and postprocess run as three operators (never fused); embeddings equal in-process."""
    path = checkpoint("bert")
    rows = _rows(60)
    ds = run_pipeline(ray.data.from_items(rows, override_num_blocks=3), "sentence-embeddings", model=str(path))
    out = ds.take_all()
    stats = ds.stats()
    for stage in ("MapBatches(preprocess_batch)", "MapBatches(ModelStage)", "MapBatches(postprocess_batch)"):
        assert stats.count(stage) == 1, stats
    assert "preprocess_batch)->MapBatches(ModelStage" not in stats and "ModelStage)->MapBatches(post" not in stats
    assert sorted(r["id"] for r in out) == list(range(60))
    expected = dict(zip(range(60), pipeline("sentence-embeddings", path)([r["text"] for r in rows])))
    for row in out:
        torch.testing.assert_close(torch.tensor(row["embedding"]), torch.tensor(expected[row["id"]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["question-answering", "zero-shot-classification"])
def test_chunk_pipelines_keep_rows_one_to_one(checkpoint, task):
    """Several forward passes per row (QA chunks, one per zero-shot label) come back as exactly one row each."""
    if task == "question-answering":
        model, params, column = QA_MODEL, {"doc_stride": 32}, {"question": "q", "context": "c"}
        rows = [
            {"id": i, "q": "Where does John live?", "c": "My name is John and I live in New York. " * (1 + i % 20)}
            for i in range(40)
        ]
        inputs = [{"question": r["q"], "context": r["c"]} for r in rows]
    else:
        model = checkpoint("roberta", "sequence-classification", num_labels=3, id2label=NLI_LABELS)
        params, column = {"candidate_labels": ["sports", "music", "politics"]}, "text"
        rows, inputs = _rows(40), [r["text"] for r in _rows(40)]
    out = run_pipeline(
        ray.data.from_items(rows, override_num_blocks=4),
        task,
        model=str(model),
        column=column,
        rows_per_batch=16,
        **params,
    ).take_all()
    assert sorted(r["id"] for r in out) == list(range(40))
    expected = pipeline(task, model, **params)(inputs)
    name = "answer" if task == "question-answering" else "classification"
    for row in out:
        ref = expected[row["id"]]
        if task == "question-answering":
            assert (row[name]["answer"], row[name]["start"]) == (ref["answer"], ref["start"])
        else:
            assert row[name]["labels"] == ref["labels"]
            assert row[name]["scores"] == pytest.approx(ref["scores"], abs=1e-6)


def test_bad_rows_recorded_ids_partition_the_input(checkpoint):
    """null, non-string, empty and 100k-character rows: result ids + error ids = input ids, each error has a reason."""
    path = checkpoint("bert", "sequence-classification")
    rows = _rows(30)
    rows[3]["text"], rows[7]["text"], rows[11]["text"], rows[13]["text"] = None, 42, "", "word " * 20_000
    ds = ray.data.from_items(rows, override_num_blocks=1)  # one block: Arrow keeps the mixed column as objects
    out = run_pipeline(ds, "text-classification", model=str(path), on_error="record", id_column="id").take_all()
    ok = sorted(r["id"] for r in out if r["error"] is None)
    failed = {r["id"]: r["error"] for r in out if r["error"] is not None}
    assert sorted(ok + list(failed)) == list(range(30)) and len(out) == 30
    assert failed == {3: "TypeError: expected a string, got NoneType", 7: "TypeError: expected a string, got int"}


def test_raise_fails_the_job_naming_the_row(checkpoint):
    """Without an error column a bad row fails the Ray job, naming the row's id and reason."""
    path = checkpoint("bert", "sequence-classification")
    rows = _rows(20)
    rows[9]["text"] = None
    ds = run_pipeline(ray.data.from_items(rows), "text-classification", model=str(path), id_column="id")
    with pytest.raises(Exception, match=r"row id=9: TypeError: expected a string, got NoneType"):
        ds.take_all()


@pytest.mark.slow
def test_a_killed_model_actor_loses_and_duplicates_nothing(checkpoint):
    """Two model actors; one is SIGKILLed after the first results arrive. Ray restarts it and retries its
    batches: every input row comes out exactly once and the job succeeds."""
    path = checkpoint("bert")
    rows = _rows(3000)
    ds = run_pipeline(
        ray.data.from_items(rows, override_num_blocks=30),
        "sentence-embeddings",
        model=str(path),
        concurrency=2,
        rows_per_batch=100,
        stats=True,
    )
    seen, killed, at_kill = [], None, None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        seen += batch.column("id").to_pylist()
        if killed is None:
            killed, at_kill = int(batch.column("__model_worker")[0].as_py().split("/")[1]), len(seen)
            os.kill(killed, signal.SIGKILL)
    assert not _alive(killed)
    assert len(seen) == 3000 and sorted(seen) == list(range(3000))
    assert at_kill < 1500  # the kill came early: most rows were still to come


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a killed process its parent has not reaped yet is a zombie: not alive)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_arguments_are_checked_before_any_work(checkpoint):
    """An unknown task or column fails when run_pipeline is called, before any Ray work."""
    path = checkpoint("bert")
    ds = ray.data.from_items(_rows(3))
    with pytest.raises(ValueError, match="unknown task 'sentence-embedings'"):
        run_pipeline(ds, "sentence-embedings", model=str(path))
    with pytest.raises(KeyError, match="no column 'body'"):
        run_pipeline(ds, "sentence-embeddings", model=str(path), column="body")
    with pytest.raises(ValueError, match="on_error must be one of"):
        run_pipeline(ds, "sentence-embeddings", model=str(path), on_error="ignore")
    with pytest.raises(ValueError, match="already an input column"):
        run_pipeline(ds, "sentence-embeddings", model=str(path), output_column="text")


def test_text_generation_rows_equal_in_process_with_batches_sharing_the_engine(checkpoint):
    """Prompts and chats through run_pipeline: each row's answer equals the in-process pipeline's (greedy and
    seeded sampling), rows 1:1, with several model calls in flight in the actor's one engine."""
    path = str(checkpoint("qwen2", "causal-lm"))
    prompts = [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(48)]
    rows = [{"id": i, "text": p} for i, p in enumerate(prompts)]
    params = {"max_new_tokens": 6, "do_sample": False}
    ds = run_pipeline(
        ray.data.from_items(rows, override_num_blocks=6), "text-generation", model=path, rows_per_batch=8, **params
    )
    out = ds.take_all()
    assert sorted(r["id"] for r in out) == list(range(48))
    expected = pipeline("text-generation", path)(prompts, **params)
    assert {r["id"]: r["generated"] for r in out} == dict(enumerate(expected))
    chats = [{"id": i, "text": [{"role": "user", "content": p}]} for i, p in enumerate(prompts[:6])]
    sampled = {"max_new_tokens": 5, "do_sample": True, "seed": 3}
    out = run_pipeline(ray.data.from_items(chats), "text-generation", model=path, **sampled).take_all()
    expected = pipeline("text-generation", path)([c["text"] for c in chats], **sampled)
    assert {r["id"]: r["generated"] for r in out} == dict(enumerate(expected))

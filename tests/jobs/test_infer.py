"""jobs.infer end to end on a real local cluster (head + 1 worker node, token auth; one cluster for the module,
stopped at the end): `ray job submit` results equal in-process results, bad rows, resume after a kill, a
separate driver process, and both nodes doing work."""

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cluster import local
from jobs import files
from pipelines import pipeline
from pipelines.hub import DEFAULT_CHAT_MODEL, import_folder
from tests.checkpoints import SENTENCES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    """The cluster's environment for clients. The Ray processes inherit this test session's offline HF cache."""
    folder = tempfile.mkdtemp(prefix="rpj-")
    try:
        local.up(folder, workers=1, head_cpus=2, worker_cpus=1)
        yield {**os.environ, **local.env(folder)}
    finally:
        local.down(folder)


def _write_jsonl(folder: Path, rows: list[dict], files_count: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(files_count):
        with open(folder / f"part{n}.jsonl", "w") as f:
            for row in rows[n::files_count]:
                f.write(json.dumps(row) + "\n")
    return folder


def _submit(env, *args, submission_id=None, wait=True):
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--runtime-env",
        "cluster/runtime_env.yaml",
    ]
    if submission_id:
        command += ["--submission-id", submission_id]
    if not wait:
        command += ["--no-wait"]
    command += ["--", sys.executable, "-m", "jobs.infer", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _read(folder) -> list[dict]:
    return [row for path in files.part_files(str(folder)) for row in pq.read_table(path).to_pylist()]


def _rows(n):
    return [{"id": i, "text": f"{SENTENCES[i % len(SENTENCES)]} {i}"} for i in range(n)]


def test_job_submit_equals_in_process_on_both_nodes(cluster, checkpoint, tmp_path):
    """Embeddings written by the job equal in-process ones within 1e-5, one row per input; the summary file
    counts them, and the work ran on both nodes of the cluster."""
    path = checkpoint("bert")
    rows = _rows(400)
    inputs = _write_jsonl(tmp_path / "in", rows, files_count=4)
    result = _submit(
        cluster,
        "--task",
        "sentence-embeddings",
        "--model",
        path,
        "--input",
        f"{inputs}/*.jsonl",
        "--output",
        tmp_path / "out",
        "--rows-per-batch",
        64,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = _read(tmp_path / "out")
    assert sorted(r["id"] for r in out) == list(range(400))
    expected = pipeline("sentence-embeddings", path)([r["text"] for r in rows])
    got = torch.tensor([r["embedding"] for r in sorted(out, key=lambda r: r["id"])])
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (400, 400, 0)
    assert summary["tokens"] > 400 and all(summary["workers"][s] >= 1 for s in ("preprocess", "model", "postprocess"))
    assert len(summary["nodes"]) == 2, summary


def test_bad_rows_go_to_the_errors_folder_and_labels_equal_in_process(cluster, checkpoint, tmp_path):
    """--errors: null, empty and 100k-character rows; result ids + error ids = input ids exactly, each error
    with its reason; labels equal the in-process pipeline's."""
    path = checkpoint("bert", "sequence-classification")
    rows = _rows(120)
    rows[5]["text"], rows[17]["text"], rows[33]["text"] = None, "", "word " * 20_000
    inputs = _write_jsonl(tmp_path / "in", rows)
    result = _submit(
        cluster,
        "--task",
        "text-classification",
        "--model",
        path,
        "--input",
        inputs / "part0.jsonl",
        "--output",
        tmp_path / "out",
        "--errors",
        tmp_path / "errors",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, errors = _read(tmp_path / "out"), _read(tmp_path / "errors")
    assert sorted([r["id"] for r in out] + [r["id"] for r in errors]) == list(range(120))
    assert {r["id"]: r["error"] for r in errors} == {5: "TypeError: expected a string, got NoneType"}
    expected = pipeline("text-classification", path)([r["text"] or "" for r in rows])
    for row in out:
        assert row["classification"]["label"] == expected[row["id"]]["label"]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["error_rows"]) == (120, 119, 1)


def test_text_generation_job_equals_in_process(cluster, checkpoint, tmp_path):
    """`ray job submit` of text generation: each row's generated text equals the in-process pipeline's; an
    empty prompt is that row's error."""
    path = checkpoint("llama", "causal-lm")
    rows = _rows(40)
    rows[7]["text"] = ""
    inputs = _write_jsonl(tmp_path / "in", rows)
    params = {"max_new_tokens": 6, "do_sample": False}
    result = _submit(
        cluster,
        "--task",
        "text-generation",
        "--model",
        path,
        "--input",
        inputs / "part0.jsonl",
        "--output",
        tmp_path / "out",
        "--errors",
        tmp_path / "errors",
        "--params",
        json.dumps(params),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, errors = _read(tmp_path / "out"), _read(tmp_path / "errors")
    assert [r["id"] for r in errors] == [7] and "the prompt is empty" in errors[0]["error"]
    good = [r for r in rows if r["text"]]
    expected = dict(
        zip((r["id"] for r in good), pipeline("text-generation", path)([r["text"] for r in good], **params))
    )
    assert {r["id"]: r["generated"] for r in out} == expected


def test_without_errors_folder_the_job_fails_naming_the_row(cluster, checkpoint, tmp_path):
    """Without an errors folder a bad row fails the job, and the failure names the row's id and reason."""
    path = checkpoint("bert", "sequence-classification")
    rows = _rows(50)
    rows[21]["text"] = None
    inputs = _write_jsonl(tmp_path / "in", rows)
    result = _submit(
        cluster,
        "--task",
        "text-classification",
        "--model",
        path,
        "--input",
        inputs / "part0.jsonl",
        "--output",
        tmp_path / "out",
    )
    assert result.returncode != 0
    assert "row id=21: TypeError: expected a string, got NoneType" in result.stdout + result.stderr


@pytest.mark.slow
def test_resume_after_a_kill_writes_every_row_once(cluster, minilm_path, tmp_path):
    """The job is stopped once some part files exist; the rerun with --resume skips the rows written and
    writes the rest: every input row is in the output exactly once."""
    rows = [json.loads(line) for line in open(ROOT / "jobs" / "data" / "sample_corpus.jsonl")][:2000]
    inputs = _write_jsonl(tmp_path / "in", rows)
    out = tmp_path / "out"
    args = [
        "--task",
        "sentence-embeddings",
        "--model",
        minilm_path,
        "--input",
        inputs / "part0.jsonl",
        "--output",
        out,
        "--rows-per-batch",
        100,
    ]
    job_id = f"resume-{os.getpid()}-{time.time_ns()}"
    started = _submit(cluster, *args, submission_id=job_id, wait=False)
    assert started.returncode == 0, started.stderr[-3000:]
    deadline = time.time() + 240
    while len(files.part_files(str(out))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    stop = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "stop", job_id],
        env=cluster,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stderr[-3000:]
    done_before = len(_read(out))
    assert 0 < done_before < 2000, "the job must be stopped half way for this test to mean anything"

    result = _submit(cluster, *args, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = [r["id"] for r in _read(out)]
    assert len(ids) == len(set(ids)) == 2000
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_skipped_resume"] == done_before and summary["rows_in"] == 2000 - done_before


def test_run_pipeline_from_a_separate_driver_process(cluster, checkpoint):
    """A notebook-style driver: ray.init(address=...) to the running cluster, then run_pipeline."""
    path = checkpoint("bert", "sequence-classification")
    script = f"""
import json, ray
from pipelines import run_pipeline
ray.init(address="{cluster["RAY_ADDRESS"]}", logging_level="ERROR")
rows = [{{"id": i, "text": "hello world " * (i % 5 + 1)}} for i in range(200)]
out = run_pipeline(ray.data.from_items(rows), "text-classification", model={str(path)!r}, top_k=2).take_all()
print(json.dumps(sorted((r["id"], [a["label"] for a in r["classification"]]) for r in out)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    expected = pipeline("text-classification", path, top_k=2)(["hello world " * (i % 5 + 1) for i in range(200)])
    assert got == [[i, [a["label"] for a in expected[i]]] for i in range(200)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "sentimnet"], "unknown task 'sentimnet'"),
        (["--input", "no/such/file.jsonl"], "does not exist"),
        (["--column", "body"], "--column 'body' is not an input column; columns: ['id', 'text']"),
        (["--params", "[1]"], "--params must be a JSON object"),
        (["--concurrency", "a,b"], "--concurrency 'a,b': expected N or MIN,MAX"),
        (["--threads", "0"], "threads must be a positive integer, got 0"),
    ],
)
def test_arguments_are_checked_up_front(cluster, tmp_path, args, message):
    """Bad task, input, column, params, concurrency or threads fail before the job starts, naming what is wrong; no output is written."""
    inputs = _write_jsonl(tmp_path / "in", _rows(3))
    base = {"--task": "sentence-embeddings", "--input": str(inputs / "part0.jsonl"), "--output": str(tmp_path / "out")}
    pairs = dict(zip(args[::2], args[1::2]))
    argv = [item for key, value in {**base, **pairs}.items() for item in (key, value)]
    result = subprocess.run(
        [sys.executable, "-m", "jobs.infer", *argv], cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_text_generation_job_runs_the_default_chat_model_by_id(cluster, smollm2_path, tmp_path):
    """`jobs.infer --task text-generation` with no --model resolves the bundled SmolLM2 GGUF by its Hub id from the
    offline cache (imported as .ci/setup does) in the Ray workers, and answers as the in-process pipeline does."""
    import_folder(smollm2_path, DEFAULT_CHAT_MODEL)
    rows = [
        {"id": i, "text": text} for i, text in enumerate(["The capital of France is", "Once upon a time", "1, 2, 3,"])
    ]
    inputs = _write_jsonl(tmp_path / "in", rows)
    params = {"max_new_tokens": 8, "do_sample": False}
    args = ["--task", "text-generation", "--input", inputs / "part0.jsonl", "--output", tmp_path / "out"]
    result = _submit(cluster, *args, "--params", json.dumps(params))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = pipeline("text-generation")([r["text"] for r in rows], **params)
    assert {r["id"]: r["generated"] for r in _read(tmp_path / "out")} == dict(enumerate(expected))


def test_image_job_over_mixed_files_with_corrupt_ones(cluster, tmp_path):
    """--input-format images over a folder of JPEG, PNG and WebP files of several sizes and two corrupt ones (a text
    file named .jpg, an empty .png): results + errors = the input files, each error naming its problem; labels and
    scores equal the in-process pipeline's; the output keeps each file's path, not its bytes."""
    from tests.image_checkpoints import make_image_checkpoint, random_image

    model = make_image_checkpoint(tmp_path / "vit", "vit", "image-classification")
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    good = []
    for i in range(18):
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        path = photos / ("sub" if i % 2 else "") / f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}"
        random_image(i, 20 + 7 * i, 40 + 3 * i).save(path, format=fmt)
        good.append(str(path))
    (photos / "notes.jpg").write_text("this is not an image")
    (photos / "empty.png").write_bytes(b"")
    result = _submit(
        cluster,
        "--task",
        "image-classification",
        "--model",
        model,
        "--input",
        photos,
        "--input-format",
        "images",
        "--params",
        '{"top_k": 2}',
        "--output",
        tmp_path / "out",
        "--errors",
        tmp_path / "errors",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, errors = _read(tmp_path / "out"), _read(tmp_path / "errors")
    assert sorted(r["path"] for r in out) == sorted(good)
    reasons = {Path(r["path"]).name: r["error"] for r in errors}
    assert reasons == {
        "notes.jpg": "ImageInputError: bytes input of 20 bytes: not an image format Pillow can read (the data starts "
        "with b'this is not an i')",
        "empty.png": "ImageInputError: bytes input of 0 bytes: no image data",
    }
    assert all("bytes" not in r for r in out + errors)
    expected = dict(zip(good, pipeline("image-classification", str(model))(good, top_k=2)))
    for row in out:
        want = expected[row["path"]]
        assert [d["label"] for d in row["classification"]] == [d["label"] for d in want]
        got = [d["score"] for d in row["classification"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor([d["score"] for d in want]), atol=1e-5, rtol=0)


def test_image_job_over_a_parquet_binary_column(cluster, tmp_path):
    """Parquet with the images in a binary column (`--column image`): labels equal the in-process pipeline's, a
    corrupt cell is its row's error, and the output keeps the id but not the bytes."""
    import pyarrow as pa

    from tests.image_checkpoints import make_image_checkpoint, random_image

    model = make_image_checkpoint(tmp_path / "vit", "vit", "image-classification")
    cells = []
    for i in range(5):
        out = io.BytesIO()
        random_image(i, 24 + 5 * i, 30).save(out, format="PNG" if i % 2 else "JPEG")
        cells.append(out.getvalue())
    cells.append(cells[0][:40])  # a truncated JPEG
    ids = [f"row{i}" for i in range(len(cells))]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "image": pa.array(cells, pa.binary())}), tmp_path / "in" / "part.parquet")
    result = _submit(
        cluster,
        "--task",
        "image-classification",
        "--model",
        model,
        "--input",
        tmp_path / "in",
        "--column",
        "image",
        "--output",
        tmp_path / "out",
        "--errors",
        tmp_path / "errors",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, errors = _read(tmp_path / "out"), _read(tmp_path / "errors")
    assert sorted(r["id"] for r in out) == ids[:5] and [r["id"] for r in errors] == ["row5"]
    assert errors[0]["error"].startswith("ImageInputError: bytes input of 40 bytes:"), errors[0]["error"]
    assert all("image" not in r for r in out + errors)
    expected = dict(zip(ids, pipeline("image-classification", str(model))(cells[:5])))
    for row in out:
        assert [d["label"] for d in row["classification"]] == [d["label"] for d in expected[row["id"]]]

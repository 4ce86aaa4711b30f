"""jobs.embed, the in-process twin of jobs.infer: its output layout and columns, its inputs, its refusals, and
its options staying jobs.infer's (on a tiny random BERT; no Ray)."""

import json
import re

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import torch

from jobs import embed, infer
from pipelines import pipeline
from tests.checkpoints import SENTENCES

OPTION = re.compile(r"^  (--[a-z][a-z-]*)", re.MULTILINE)  # the first option of a line in argparse help


@pytest.fixture
def bert(checkpoint):
    return checkpoint("bert")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _run(bert, *argv):
    return embed.main(["--model", str(bert), "--device", "cpu", *map(str, argv)])


def test_writes_the_input_columns_and_the_pipelines_embeddings(bert, tmp_path):
    """One part file in --output holding every input column, rows in input order, and `embedding` equal to the
    pipeline's own embeddings; `_summary.json` next to it, as jobs.infer writes."""
    rows = [{"id": 100 + i, "text": text, "lang": "en"} for i, text in enumerate(SENTENCES)]
    summary = _run(bert, "--input", _jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "out")
    table = pq.read_table(tmp_path / "out")  # skips _summary.json, as for jobs.infer's output
    assert table.column_names == ["id", "text", "lang", "embedding"]
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert table.column("text").to_pylist() == SENTENCES
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 1
    expected = torch.stack(pipeline("sentence-embeddings", bert)(SENTENCES, return_tensors=True))
    got = torch.tensor(table.column("embedding").to_pylist())
    torch.testing.assert_close(got, expected.float())
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert written == summary and summary["rows"] == len(SENTENCES) and summary["input_format"] == "jsonl"
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"


def test_reads_csv_and_writes_jsonl_with_the_options_given(bert, tmp_path):
    """--input-format from the extension (csv), --column, --output-column and --output-format jsonl as in
    jobs.infer; --params reaches the pipeline (normalize: unit-length vectors)."""
    pyarrow.csv.write_csv(pa.table({"sentence": SENTENCES[:4]}), tmp_path / "in.csv")
    _run(
        bert,
        "--input",
        tmp_path / "in.csv",
        "--output",
        tmp_path / "out",
        "--column",
        "sentence",
        "--output-column",
        "vector",
        "--output-format",
        "jsonl",
        "--params",
        '{"normalize": true}',
    )
    (part,) = (tmp_path / "out").glob("part-*.jsonl")
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert [r["sentence"] for r in rows] == SENTENCES[:4]
    norms = torch.tensor([r["vector"] for r in rows]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(4))


def test_refuses_an_output_folder_that_holds_results(bert, tmp_path):
    """A second run into the same folder would mix two runs' part files: refused, naming the folder."""
    source = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCES[:2]])
    _run(bert, "--input", source, "--output", tmp_path / "out")
    with pytest.raises(SystemExit, match="already holds results"):
        _run(bert, "--input", source, "--output", tmp_path / "out")


def test_bad_inputs_are_named(bert, tmp_path):
    """A missing column lists the input's columns, a row that is not text is named by its index, a file that
    does not parse is named: all before anything is written."""
    source = _jsonl(tmp_path / "in.jsonl", [{"id": 0, "text": "fine"}, {"id": 1, "text": None}])
    with pytest.raises(SystemExit, match=r"--column 'body' is not an input column; columns: \['id', 'text'\]"):
        _run(bert, "--input", source, "--output", tmp_path / "out", "--column", "body")
    with pytest.raises(SystemExit, match=r"input #1: expected a string, got NoneType"):
        _run(bert, "--input", source, "--output", tmp_path / "out")
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": "fine"}, {"text": 7}])
    with pytest.raises(SystemExit, match=r"mixed.jsonl: not readable as jsonl"):
        _run(bert, "--input", mixed, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_options_are_jobs_infers_where_they_apply(capsys):
    """The twin does not drift: every jobs.embed option but the in-process ones is a jobs.infer option."""
    with pytest.raises(SystemExit):
        infer.parse_args(["--help"])
    infer_options = set(OPTION.findall(capsys.readouterr().out))
    embed_options = set(OPTION.findall(embed.build_parser().format_help()))
    assert embed_options - set(embed.IN_PROCESS_ONLY) <= infer_options
    assert {"--model", "--input", "--output", "--column", "--batch-size", "--dtype"} <= embed_options

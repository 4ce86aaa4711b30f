"""Embed a corpus in this process, without Ray: the in-process twin of `jobs.infer --task sentence-embeddings`.

    python -m jobs.embed [--input jobs/data/sample_corpus.jsonl] [--output out/embeddings] [--model ID_OR_FOLDER]
                         [--column text] [--output-column embedding] [--params '{"normalize": true}']
                         [--batch-size N] [--max-batch-tokens N] [--dtype float32] [--quantization int8|int4]
                         [--device auto] [--threads N]

The arguments are jobs.infer's where they apply, and so is the output: the input (a parquet, jsonl, csv or text
file, a folder of them, or a glob) is read whole, its `--column` embedded by one pipeline in this process, and
the input's columns plus `--output-column` (list<float32>) written as one part file into the `--output` folder,
with `_summary.json` next to it (`pyarrow.parquet.read_table(folder)` reads either job's output); the summary is
printed too. The model runs on the accelerator when there is one, as jobs.infer's model actors do (`--device cpu`
keeps it on the CPU).

Which to use: `jobs.embed` for a corpus that fits in memory on one machine, and to time the pipeline alone (no
cluster to start, nothing streams: it is the in-process side of `python -m jobs.benchmarks.ray_job`);
`jobs.infer` (through `ray job submit`) for anything larger or remote, several nodes or GPUs, other tasks,
failing rows recorded instead of failing the job (`--errors`), and resuming a killed run (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
import torch

from jobs import files

DEFAULT_INPUT = Path(__file__).parent / "data" / "sample_corpus.jsonl"
TASK = "sentence-embeddings"
RUNTIME_OPTIONS = ("device_map", "dtype", "quantization", "threads", "batch_size", "max_batch_tokens")


IN_PROCESS_ONLY = ("--device",)  # the options jobs.infer does not have (its actors are placed by Ray)


def build_parser() -> argparse.ArgumentParser:
    """jobs.infer's options where they apply to one process, plus IN_PROCESS_ONLY."""
    p = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a Hub id or a folder (default: the task's default model)")
    p.add_argument("--input", default=str(DEFAULT_INPUT), help="a local file, folder or glob (default: the sample)")
    p.add_argument("--output", default="out/embeddings", help="the output folder (default: out/embeddings)")
    p.add_argument("--input-format", choices=sorted(files.INPUT_FORMATS), help="default: from the extensions")
    p.add_argument("--output-format", choices=files.OUTPUT_FORMATS, default="parquet")
    p.add_argument("--column", default="text", help="the input column holding the texts")
    p.add_argument("--output-column", default="embedding", help="the column the embeddings are written to")
    p.add_argument(
        "--params",
        type=json_object,
        default="{}",
        help="the task's parameters as a JSON object, e.g. '{\"normalize\": true}'",
    )
    p.add_argument("--batch-size", type=int, help="rows per micro-batch")
    p.add_argument("--max-batch-tokens", type=int, help="padded tokens per micro-batch")
    p.add_argument("--dtype", help="float32, float16 or bfloat16")
    p.add_argument("--device-map", help="a device_map for the model, e.g. auto")
    p.add_argument(
        "--quantization", choices=["int8", "int4"], help="weight-only quantization of the model's linear layers"
    )
    p.add_argument("--device", help="in this process only: cpu, cuda, cuda:N, mps (default: the accelerator if any)")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
        help="torch threads (default: $OMP_NUM_THREADS, else torch's)",
    )
    return p


def runtime_options(args: argparse.Namespace) -> dict:
    """The pipeline's runtime keywords from the command line (unset ones keep the per-device defaults): on the
    accelerator when there is one, unless --device or --device-map says where."""
    options = {name: getattr(args, name) for name in RUNTIME_OPTIONS}
    return {**options, "device": args.device or (None if args.device_map else "auto")}


def json_object(value: str) -> dict:
    """The argparse type of --params: a JSON object."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is wanted, not {type(parsed).__name__}")
    return parsed


def read_table(spec: str, given_format: str | None) -> tuple[pa.Table, str]:
    """The whole input as one table, and its format; the files of a folder or glob in name order."""
    if "://" in spec:
        raise SystemExit(f"--input {spec!r}: jobs.embed reads local files; use jobs.infer for remote inputs")
    paths = files.input_paths(spec)
    fmt = files.input_format(paths, given_format)
    found = [str(f) for p in map(Path, paths) for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    found = [f for f in found if not Path(f).name.startswith((".", "_"))]  # as Ray Data skips them
    if not found:
        raise SystemExit(f"--input {spec!r} holds no file")
    readers = {
        "parquet": pq.read_table,
        "jsonl": pyarrow.json.read_json,
        "csv": pyarrow.csv.read_csv,
        "text": lambda f: pa.table({"text": Path(f).read_text(encoding="utf-8").splitlines()}),
    }
    tables = []
    for f in found:
        try:
            tables.append(readers[fmt](f))
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            raise SystemExit(f"--input {f}: not readable as {fmt}: {e}") from None
    return pa.concat_tables(tables, promote_options="default"), fmt


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if files.part_files(args.output):
        raise SystemExit(f"--output {args.output} already holds results: choose an empty folder")

    from pipelines import pipeline

    start = time.perf_counter()
    try:
        embed = pipeline(TASK, model=args.model, **runtime_options(args), **args.params)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SystemExit(f"jobs.embed: {e}") from None
    loaded = time.perf_counter()
    table, fmt = read_table(args.input, args.input_format)
    if args.column not in table.column_names:
        raise SystemExit(f"--column {args.column!r} is not an input column; columns: {table.column_names}")
    if args.output_column in table.column_names:
        raise SystemExit(f"--output-column {args.output_column!r} is an input column already; choose another name")
    texts = table.column(args.column).to_pylist()
    counted = time.perf_counter()
    try:  # every row checked (a bad one named by its index) and its tokens counted: not in the job's time
        tokens = sum(embed.feature_length(f) for i, t in enumerate(texts) for f in embed.preprocess_item(t, i))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"jobs.embed: --column {args.column!r}: {e}") from None
    run_start = time.perf_counter()
    vectors = embed(texts, return_tensors=True)
    wall = time.perf_counter() - run_start

    matrix = torch.stack(vectors).float().numpy()  # (rows, H)
    column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    part = files.write_part(table.append_column(args.output_column, column), args.output, args.output_format)
    job = time.perf_counter() - start - (run_start - counted)  # load + read + embed + write
    summary = {
        "task": TASK,
        "model": args.model,
        "input": args.input,
        "input_format": fmt,
        "output": args.output,
        "part": part,
        "dtype": str(next(embed.model.parameters()).dtype).removeprefix("torch."),
        "device": str(embed.device),
        "rows": len(texts),
        "tokens": tokens,
        "load_s": round(loaded - start, 2),
        "embed_s": round(wall, 2),
        "job_s": round(job, 2),
        "rows_per_s": round(len(texts) / wall, 1) if wall else None,
        "tokens_per_s": round(tokens / wall) if wall else None,
        "threads": torch.get_num_threads(),
    }
    fs, root = files.filesystem(args.output)
    with fs.open_output_stream(f"{root}/_summary.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

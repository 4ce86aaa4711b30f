"""Run a pipeline over files on a Ray cluster: the entry point for `ray job submit`.

    ray job submit --working-dir . -- python -m jobs.infer --task sentence-embeddings \\
        --model sentence-transformers/all-MiniLM-L6-v2 --input jobs/data/sample_corpus.jsonl --output out/embeddings

Reads parquet / jsonl / csv / text / image files through Ray Data (streaming), runs `run_pipeline`, writes part files
(parquet or jsonl) into --output and, with --errors DIR, the rows that failed (their columns and the
reason) into DIR; without --errors the first bad row fails the job, naming the row. Prints progress and
a summary, also written as `_summary.json` into the output folder. `--resume` continues a killed job:
the rows already written (results or errors) are skipped, none is written twice (see jobs/files.py).

Images (`--input-format images`, or files that all have image extensions): each file is read whole and decoded,
resized and cropped by the preprocess tasks; only uint8 pixels travel to the model actors, and the output rows keep
the file's `path` (the id column), not its bytes. Parquet with the images in a binary column works too (`--column`
naming it); a binary input column is never copied into the output. A corrupt file is one error row with --errors.

    python -m jobs.infer --task image-classification --model path/to/vit --input 'photos/**/*.jpg' \
        --input-format images --output out/labels --errors out/bad
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from jobs import files
from pipelines.distributed import STAGE_TIME, STAGE_WORKER, TOKENS, RowError
from pipelines.registry import canonical_task

PROGRESS_EVERY_S = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.infer", description=__doc__.split("\n")[0])
    p.add_argument("--task", help="a task or alias (default: the one the model's config implies)")
    p.add_argument("--model", help="a Hub id or a folder (default: the task's default model)")
    p.add_argument("--input", required=True, help="a file, a folder, a glob, or a remote URI")
    p.add_argument("--output", required=True, help="the output folder (local or a remote URI)")
    p.add_argument("--input-format", choices=sorted(files.INPUT_FORMATS), help="default: from the extensions")
    p.add_argument("--output-format", choices=files.OUTPUT_FORMATS, default="parquet")
    p.add_argument(
        "--column",
        help="the input column, or key=column,... for dict inputs (question=q,context=c); default text, and for "
        "--input-format images the files' bytes",
    )
    p.add_argument(
        "--id-column",
        help="names rows in errors and keys --resume (default: 'id' if the input has it; images: the file's path)",
    )
    p.add_argument("--output-column", help="default: the task's (embedding, classification, entities, answer, ...)")
    p.add_argument("--params", default="{}", help="the task's parameters as a JSON object, e.g. '{\"top_k\": 3}'")
    p.add_argument("--errors", help="record failing rows in this folder and go on (default: fail on the first)")
    p.add_argument("--resume", action="store_true", help="skip the rows a killed run already wrote")
    p.add_argument("--num-gpus", type=float, help="GPUs per model actor (default: 1 if the cluster has GPUs)")
    p.add_argument("--concurrency", help="model actors: N or MIN,MAX (default: 1,GPUs or 1 on CPU)")
    p.add_argument("--preprocess-concurrency", type=int, help="max preprocess tasks (default: a quarter of the CPUs)")
    p.add_argument("--postprocess-concurrency", type=int, help="max postprocess tasks (default: a quarter of the CPUs)")
    p.add_argument("--batch-size", type=int, help="rows per micro-batch")
    p.add_argument("--max-batch-tokens", type=int, help="padded tokens per micro-batch")
    p.add_argument("--rows-per-batch", type=int, help="rows per model call (default: the task's, 4096; generation 256)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16")
    p.add_argument("--device-map", help="a device_map for the model actors, e.g. auto")
    p.add_argument(
        "--quantization", choices=["int8", "int4"], help="weight-only quantization of the model's linear layers"
    )
    p.add_argument("--threads", type=int, help="torch threads per model actor (default: its CPUs)")
    p.add_argument("--kv-cache-tokens", type=int, help="text generation: the engine's KV cache budget in tokens")
    return p.parse_args(argv)


def _runtime(args: argparse.Namespace):
    """The model actors' RuntimeConfig from the command line (unset options keep the per-device defaults)."""
    from pipelines.runtime import RuntimeConfig

    try:
        return RuntimeConfig.create(
            dtype=args.dtype,
            device_map=args.device_map,
            quantization=args.quantization,
            threads=args.threads,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            kv_cache_tokens=args.kv_cache_tokens,
        )
    except (TypeError, ValueError) as e:
        raise SystemExit(f"jobs.infer: {e}") from None


def _column(value: str) -> str | dict[str, str]:
    if "=" not in value:
        return value
    pairs = [item.split("=", 1) for item in value.split(",")]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise SystemExit(f"--column {value!r}: expected a column or key=column,key=column")
    return dict(pairs)


def _concurrency(value: str | None):
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2):
        raise SystemExit(f"--concurrency {value!r}: expected N or MIN,MAX")
    return numbers[0] if len(numbers) == 1 else tuple(numbers)


def _params(value: str) -> dict:
    try:
        params = json.loads(value)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--params is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise SystemExit(f"--params must be a JSON object, got {type(params).__name__}")
    return params


# -- the writer stage ---------------------------------------------------------------------------------------
def write_batch(table: pa.Table, output: str, errors: str | None, fmt: str, error_column: str | None) -> pa.Table:
    """Write the batch's results (and failed rows) as part files; return one row of counts and stage times."""
    internal = [TOKENS, *STAGE_TIME.values(), *STAGE_WORKER.values()]
    data = table.drop_columns(internal)
    failed = data.column(error_column).is_valid() if error_column else pa.array([False] * table.num_rows)
    good = data.filter(pc.invert(failed))
    bad = data.filter(failed)
    if error_column:
        good = good.drop_columns([error_column])
    if good.num_rows:
        files.write_part(good, output, fmt)
    if bad.num_rows:
        files.write_part(bad, errors, fmt)
    stats = {"rows": [table.num_rows], "errors": [bad.num_rows], "tokens": [pc.sum(table.column(TOKENS)).as_py() or 0]}
    for stage, name in STAGE_TIME.items():
        stats[f"{stage}_s"] = [pc.sum(table.column(name)).as_py() or 0.0]
    for stage, name in STAGE_WORKER.items():
        stats[f"{stage}_workers"] = [sorted(set(table.column(name).to_pylist()))]
    return pa.table(stats)


# -- the job -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    paths = files.input_paths(args.input)
    fmt = files.input_format(paths, args.input_format)
    images = fmt == "images"
    column = _column(args.column or ("bytes" if images else "text"))
    params, concurrency = _params(args.params), _concurrency(args.concurrency)
    runtime = _runtime(args)
    output, errors = args.output, args.errors
    if args.task is not None:
        try:
            args.task = canonical_task(args.task)
        except ValueError as e:
            raise SystemExit(f"jobs.infer: {e}") from None
    if files.part_files(output) and not args.resume:
        raise SystemExit(
            f"--output {output} already holds results: pass --resume to continue that job, or choose an empty folder"
        )

    import ray

    from pipelines.distributed import run_pipeline

    ray.init(logging_level="WARNING")
    ds = files.read(paths, fmt)
    schema = ds.schema()
    names = list(schema.names)
    id_column = args.id_column or ("id" if "id" in names else "path" if images else None)
    if args.id_column and args.id_column not in names:
        raise SystemExit(f"--id-column {args.id_column!r} is not an input column; columns: {names}")
    wanted = [column] if isinstance(column, str) else list(column.values())
    for name in wanted:
        if name not in names:
            raise SystemExit(f"--column {name!r} is not an input column; columns: {names}")
    types = dict(zip(names, schema.types))
    binary = any(pa.types.is_binary(types[n]) or pa.types.is_large_binary(types[n]) for n in wanted)

    skipped = 0
    if args.resume:
        if id_column is None:
            raise SystemExit(
                f"--resume needs an id column to know which rows are done; pass --id-column (columns: {names})"
            )
        done = files.completed_ids([output] + ([errors] if errors else []), id_column)
        skipped = len(done)
        ds = ds.map_batches(
            files.drop_done,
            fn_kwargs={"id_column": id_column, "done": ray.put(done)},
            batch_format="pyarrow",
            num_cpus=files.READ_CPUS,
        )

    start = time.perf_counter()
    try:
        result = run_pipeline(
            ds,
            args.task,
            model=args.model,
            column=column,
            output_column=args.output_column,
            runtime=runtime,
            num_gpus=args.num_gpus,
            concurrency=concurrency,
            preprocess_concurrency=args.preprocess_concurrency,
            postprocess_concurrency=args.postprocess_concurrency,
            on_error="record" if errors else "raise",
            id_column=id_column,
            rows_per_batch=args.rows_per_batch,
            stats=True,
            keep_input=not binary,  # image bytes are not copied into the output (the id / path column is)
            **params,
        )
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise SystemExit(f"jobs.infer: {e}") from None
    error_column = "error" if errors else None
    written = result.map_batches(
        write_batch,
        fn_kwargs=dict(output=output, errors=errors, fmt=args.output_format, error_column=error_column),
        batch_format="pyarrow",
        num_cpus=files.READ_CPUS,
    )
    try:
        totals = _drain(written, start)
    except Exception as e:
        reason = _row_error(e)
        if reason is None:
            raise
        raise SystemExit(f"jobs.infer failed: {reason}") from None
    summary = _summary(args, totals, skipped, time.perf_counter() - start, fmt)
    fs, root = files.filesystem(output)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/_summary.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    return summary


def _drain(written, start: float) -> dict:
    """Consume the writer's count rows, printing progress; totals and the workers each stage used."""
    totals: dict = defaultdict(float)
    workers: dict[str, set] = defaultdict(set)
    last = start
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            for key, value in row.items():
                if key.endswith("_workers"):
                    workers[key].update(value)
                else:
                    totals[key] += value
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            print(
                f"[jobs.infer] {int(totals['rows']):,} rows done ({int(totals['errors'])} errors), "
                f"{totals['rows'] / (now - start):,.1f} rows/s",
                flush=True,
            )
    totals["workers"] = {k: sorted(v) for k, v in workers.items()}
    return totals


def _row_error(error: BaseException) -> str | None:
    """The 'row ...: reason' message of a RowError somewhere in a Ray exception chain, if there is one."""
    seen = error
    while seen is not None:
        if isinstance(seen, RowError):
            return str(seen)
        seen = seen.__cause__ or getattr(seen, "cause", None)
    for line in str(error).splitlines():
        if "RowError: " in line:
            return line.split("RowError: ", 1)[1]
    return None


def _summary(args, totals: dict, skipped: int, wall: float, fmt: str) -> dict:
    rows, errors = int(totals.get("rows", 0)), int(totals.get("errors", 0))
    workers = totals.get("workers", {})
    nodes = sorted({w.split("/")[0] for ws in workers.values() for w in ws})
    return {
        "task": args.task,
        "model": args.model,
        "input": args.input,
        "input_format": fmt,
        "output": args.output,
        "errors_output": args.errors,
        "rows_in": rows,
        "rows_out": rows - errors,
        "error_rows": errors,
        "rows_skipped_resume": skipped,
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1) if wall else None,
        "tokens": int(totals.get("tokens", 0)),
        "tokens_per_s": round(totals.get("tokens", 0) / wall) if wall else None,
        "stage_busy_s": {stage: round(totals.get(f"{stage}_s", 0.0), 2) for stage in STAGE_TIME},
        "workers": {stage: len(workers.get(f"{stage}_workers", [])) for stage in STAGE_WORKER},
        "nodes": nodes,
    }


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

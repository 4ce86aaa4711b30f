"""The same embedding job in process and as a Ray job on a local cluster, same run: rows/s and their ratio.

    python -m jobs.benchmarks.ray_job [--rows 20000] [--model sentence-transformers/all-MiniLM-L6-v2] [--dtype float32]

In process: `jobs.embed` (the pipeline called on all rows in one process, all cores for torch). As a Ray
job: `python -m cluster.local up` (head only, all CPUs), `ray job submit -- python -m jobs.infer` on the
same rows, then `down`. Both times count model loading, reading and writing the output, so that neither
side is flattered; the Ray job's time is the one its summary reports (from building the plan to the last
part written), plus the submit-to-finish time seen by the client (driver start, `ray.init`).
Prints a table and the worker counts of each Ray stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from jobs.benchmarks.corpus import write_jsonl
from jobs.benchmarks.harness import (
    ROOT,
    add_timing_arguments,
    argument_parser,
    markdown_table,
    module_command,
    wait_for_idle,
)


def in_process(corpus: Path, out: Path, model: str, dtype: str) -> dict:
    command = module_command("jobs.embed", "--input", corpus, "--output", out / "in_process", "--model", model)
    command += ["--dtype", dtype]  # on the accelerator where there is one, as the Ray job's model actor
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    return {"wall_s": wall, "work_s": summary["job_s"], "rows": summary["rows"]}


def as_ray_job(corpus: Path, out: Path, model: str, dtype: str, workers: int) -> dict:
    from cluster import local

    folder = tempfile.mkdtemp(prefix="rpb-")
    local.up(folder, workers=workers)
    try:
        env = {**os.environ, **local.env(folder)}
        submit = ["ray.scripts.scripts", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--"]
        job = module_command("jobs.infer", "--task", "sentence-embeddings", "--model", model, "--dtype", dtype)
        command = module_command(*submit, *job, "--input", corpus, "--output", out / "ray")
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
    finally:
        local.down(folder)
    summary = json.loads((out / "ray" / "_summary.json").read_text())
    return {"wall_s": wall, "work_s": summary["wall_s"], "rows": summary["rows_in"], "summary": summary}


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser("jobs.benchmarks.ray_job", __doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workers", type=int, default=0, help="extra worker nodes of the local cluster")
    add_timing_arguments(parser, wait_idle_s=120.0)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    corpus = work / "corpus.jsonl"
    write_jsonl(corpus, args.rows, seed=1)
    wait_for_idle(args.wait_idle)
    ours = in_process(corpus, work, args.model, args.dtype)
    wait_for_idle(args.wait_idle)
    ray_job = as_ray_job(corpus, work, args.model, args.dtype, args.workers)
    summary = ray_job.pop("summary")

    header = ["run", "rows/s (work)", "work s", "rows/s (submit to end)", "wall s"]
    rows = [
        [
            name,
            f"{r['rows'] / r['work_s']:.1f}",
            f"{r['work_s']:.1f}",
            f"{r['rows'] / r['wall_s']:.1f}",
            f"{r['wall_s']:.1f}",
        ]
        for name, r in (("in process (jobs.embed)", ours), ("Ray job (jobs.infer)", ray_job))
    ]
    lines = [f"{args.rows:,} rows, {args.model}, {args.dtype}, {os.cpu_count()} CPUs", *markdown_table(header, rows)]
    ratio = (ray_job["rows"] / ray_job["work_s"]) / (ours["rows"] / ours["work_s"])
    ratio_wall = (ray_job["rows"] / ray_job["wall_s"]) / (ours["rows"] / ours["wall_s"])
    lines.append(f"Ray / in process: {ratio:.2f}x (work), {ratio_wall:.2f}x (submit to end); target >= 0.8x")
    lines.append(f"Ray workers: {summary['workers']}; stage busy seconds: {summary['stage_busy_s']}")
    print("\n".join(lines))
    return {"in_process": ours, "ray": ray_job, "ratio": ratio, "ratio_wall": ratio_wall, "ray_summary": summary}


if __name__ == "__main__":
    main()

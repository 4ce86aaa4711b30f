"""The main job until the Ray job layer lands: embed a corpus in process and write Parquet.

    python -m jobs.embed [--input jobs/data/sample_corpus.jsonl] [--output out/embeddings.parquet]
                         [--model sentence-transformers/all-MiniLM-L6-v2] [--batch-size N] [--dtype float32]

Reads JSON lines with `id` and `text`, writes `id`, `text`, `embedding` (list<float32>), prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines import pipeline

DEFAULT_INPUT = Path(__file__).parent / "data" / "sample_corpus.jsonl"


def read_jsonl(path: Path, column: str) -> tuple[list, list[str]]:
    ids, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            row = json.loads(line)
            if column not in row:
                raise SystemExit(f"{path}:{n + 1}: no column {column!r}; columns: {sorted(row)}")
            ids.append(row.get("id", n))
            texts.append(row[column])
    return ids, texts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--output", type=Path, default=Path("out/embeddings.parquet"))
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--column", default="text")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (default: the pipeline's)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per micro-batch (default: per device)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None)
    args = parser.parse_args(argv)
    if not args.input.is_file():
        raise SystemExit(f"input {args.input} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    embed = pipeline("sentence-embeddings", model=args.model, dtype=args.dtype, batch_size=args.batch_size,
                     max_batch_tokens=args.max_batch_tokens)  # fmt: skip
    loaded = time.perf_counter()
    ids, texts = read_jsonl(args.input, args.column)
    counted = time.perf_counter()
    tokens = sum(len(embed.preprocess(t)["input_ids"]) for t in texts)  # for the summary; not part of the job's time
    run_start = time.perf_counter()
    vectors = embed(texts, return_tensors=True)
    wall = time.perf_counter() - run_start

    args.output.parent.mkdir(parents=True, exist_ok=True)
    matrix = torch.stack(vectors).float().numpy()
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    pq.write_table(pa.table({"id": ids, "text": texts, "embedding": embeddings}), args.output)
    job = time.perf_counter() - start - (run_start - counted)  # load + read + embed + write
    summary = {
        "model": args.model, "dtype": args.dtype, "rows": len(texts), "tokens": tokens,
        "load_s": round(loaded - start, 2), "embed_s": round(wall, 2), "job_s": round(job, 2),
        "rows_per_s": round(len(texts) / wall, 1), "tokens_per_s": round(tokens / wall),
        "threads": torch.get_num_threads(), "output": str(args.output),
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

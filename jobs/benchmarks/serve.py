"""Benchmark embedding serving over loopback: our Ray Serve application against infinity-emb, same model, same run.

    python -m jobs.benchmarks.serve --infinity /path/to/venv/bin/infinity_emb [--seconds 30] [--concurrency 1,8,32]
                                    [--threads 2] [--wait-idle 120] [--json OUT]

infinity-emb pins its own torch/transformers versions, so it lives in a virtualenv of its own, e.g.
`python -m venv /tmp/inf && /tmp/inf/bin/pip install torch==2.13.0 "infinity-emb[server,torch]"`; without
`--infinity` only our server is measured. Both serve the bundled sentence-transformers/all-MiniLM-L6-v2 in
float32 on CPU, one server at a time, each on 127.0.0.1 only:

- ours: `deploy.app:build_app` (ingress + one model replica with `--threads` torch threads), OpenAI route
  `POST /v1/embeddings`;
- infinity: `infinity_emb v2 --engine torch --device cpu` (its default batch size, 32), `POST /embeddings`.

A load generator in this process (aiohttp) keeps `c` requests in flight, each one text from the bundled
corpus generator (5-60 words), for `--seconds` per concurrency level after a 3 s warm-up; it prints one row
per server and level: requests/s, p50/p99 latency of the successful requests, and failed requests.
Before measuring, both servers' embeddings of the same texts are compared (min cosine).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jobs.benchmarks.corpus import make_corpus
from jobs.benchmarks.harness import add_timing_arguments, argument_parser, markdown_table, minilm_folder, wait_for_idle

WARMUP_S = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, texts: list[str], concurrency: int, seconds: float) -> dict:
    """Keep `concurrency` requests in flight for `seconds`; latencies of the 200s, count of the others."""
    import aiohttp

    latencies, failed, stop_at = [], 0, time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(i: int) -> None:
            nonlocal failed
            n = i
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    async with session.post(url, json={"input": texts[n % len(texts)], "model": "m"}) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failed += 1
                n += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "requests_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "ok": len(latencies),
        "failed": failed,
    }


def measure(name: str, url: str, texts: list[str], levels: list[int], seconds: float, wait_idle_s: float) -> list[dict]:
    rows = []
    for c in levels:
        asyncio.run(_load(url, texts, c, WARMUP_S))
        wait_for_idle(wait_idle_s)
        result = asyncio.run(_load(url, texts, c, seconds))
        rows.append({"server": name, "concurrency": c, **result})
        print(
            f"{name:9s} c={c:<3d} {result['requests_s']:8.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
            f"p99 {result['p99_ms']:7.1f} ms  failed {result['failed']}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def embed_once(url: str, texts: list[str]) -> np.ndarray:
    import requests

    r = requests.post(url, json={"input": texts, "model": "m"}, timeout=60)
    r.raise_for_status()
    return np.asarray([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])], dtype=np.float32)


def wait_ready(url: str, limit_s: float = 180) -> None:
    import requests

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {limit_s} s")


def serve_ours(folder: Path, threads: int, **args):
    """Start Ray and our application on a loopback port; returns (embeddings URL, stop function)."""
    import ray
    from ray import serve

    from deploy.app import build_app

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "task": "sentence-embeddings",
            "model": str(folder),
            "served_model_name": "m",
            "threads": threads,
            "max_in_flight": 256,
            **args,
        }
    )
    serve.run(app, name="emb", route_prefix="/emb")

    def stop():
        serve.shutdown()
        ray.shutdown()

    return f"http://127.0.0.1:{port}/emb/v1/embeddings", stop


def serve_infinity(binary: str, folder: Path):
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"infinity-{port}.log", "w")
    proc = subprocess.Popen(
        [
            binary,
            "v2",
            "--model-id",
            str(folder),
            "--served-model-name",
            "m",
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--no-bettertransformer",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wait_ready(f"http://127.0.0.1:{port}/health")

    def stop():
        proc.terminate()
        proc.wait(30)
        log.close()

    return f"http://127.0.0.1:{port}/embeddings", stop


def table(rows: list[dict]) -> list[str]:
    header = ["server", "concurrency", "requests/s", "p50 ms", "p99 ms", "failed"]
    cells = [
        [
            r["server"],
            r["concurrency"],
            f"{r['requests_s']:.1f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            r["failed"],
        ]
        for r in rows
    ]
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argument_parser("jobs.benchmarks.serve", __doc__)
    parser.add_argument("--infinity", help="path of the infinity_emb executable (its own virtualenv)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--threads", type=int, help="torch threads of our model replica (default: the app's)")
    add_timing_arguments(parser, wait_idle_s=120.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    folder, texts = minilm_folder(), make_corpus(512, seed=1, min_words=5, max_words=60)
    rows, reference = [], None
    servers = [("ours", lambda: serve_ours(folder, args.threads))]
    if args.infinity:
        servers.append(("infinity", lambda: serve_infinity(args.infinity, folder)))
    for name, start in servers:
        url, stop = start()
        try:
            vectors = embed_once(url, texts[:32])
            if reference is None:
                reference = vectors
            cosine = float(
                np.min(
                    np.sum(vectors * reference, axis=1)
                    / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
                )
            )
            print(f"{name}: min cosine with ours over 32 texts {cosine:.6f}", file=sys.stderr)
            rows += measure(name, url, texts, levels, args.seconds, args.wait_idle)
        finally:
            stop()
    print("\n".join(table(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()

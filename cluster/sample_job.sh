#!/usr/bin/env bash
# The README's main command: start a local Ray cluster (token auth on), `ray job submit` the embedding job over
# the bundled 10,000-row corpus with the default model, print its summary, stop the cluster (also on failure).
#   bash cluster/sample_job.sh [extra jobs.infer options, e.g. --dtype bfloat16]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
export RAY_PIPELINES_CLUSTER_DIR="${RAY_PIPELINES_CLUSTER_DIR:-/tmp/ray-pipelines-sample-job}"
OUT="$PWD/out/sample-job-$(date +%Y%m%d-%H%M%S)"

"$PY" -m cluster.local up
trap '"$PY" -m cluster.local down' EXIT
set -a; . "$RAY_PIPELINES_CLUSTER_DIR/env"; set +a

"$PWD/.venv/bin/ray" job submit --runtime-env cluster/runtime_env.yaml -- \
    "$PY" -m jobs.infer --task sentence-embeddings --model sentence-transformers/all-MiniLM-L6-v2 \
    --input "$PWD/jobs/data/sample_corpus.jsonl" --output "$OUT" "$@"
echo "summary: $OUT/_summary.json"
cat "$OUT/_summary.json"

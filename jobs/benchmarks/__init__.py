"""Benchmarks, run from a checkout as `python -m jobs.benchmarks.<name>` (BENCHMARKS.md records their figures).

They are not job entry points and not part of the installed package (pyproject excludes `jobs.benchmarks*`):
nothing in `pipelines/`, `deploy/` or `jobs/`'s entry points imports them. `harness` holds what they share;
`corpus` makes their texts (and the bundled `jobs/data/sample_corpus.jsonl`).
"""

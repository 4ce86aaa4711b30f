"""Hugging Face-style pipelines on native PyTorch models, for in-process calls, Ray Data jobs and Ray Serve.

from pipelines import pipeline
emb = pipeline("sentence-embeddings")
emb(["a sentence", "another one"])

from pipelines import run_pipeline            # the same pipelines over a Ray Dataset
run_pipeline(ray.data.read_parquet(...), "sentence-embeddings").write_parquet(...)
"""

from pipelines.base import ChunkPipeline, Pipeline
from pipelines.factory import pipeline
from pipelines.processors import register_processor
from pipelines.registry import register_pipeline
from pipelines.runtime import RuntimeConfig

__all__ = [
    "ChunkPipeline",
    "Pipeline",
    "RuntimeConfig",
    "pipeline",
    "register_pipeline",
    "register_processor",
    "run_pipeline",
]


def __getattr__(name):
    if name == "run_pipeline":  # imports Ray: only when asked for
        from pipelines.distributed import run_pipeline

        return run_pipeline
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")

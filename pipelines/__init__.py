"""Hugging Face-style pipelines on native PyTorch models, for in-process calls, Ray Data jobs and Ray Serve.

    from pipelines import pipeline
    emb = pipeline("sentence-embeddings")
    emb(["a sentence", "another one"])
"""

from pipelines.base import ChunkPipeline, Pipeline
from pipelines.factory import pipeline
from pipelines.registry import register_pipeline

__all__ = ["ChunkPipeline", "Pipeline", "pipeline", "register_pipeline"]

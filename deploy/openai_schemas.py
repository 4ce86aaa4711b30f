"""OpenAI's request bodies and answer shapes, for every application that speaks it.

    GET  /v1/models             -> model_list(...)
    POST /v1/embeddings         EmbeddingsRequest      -> embedding_list(...)
    POST /v1/completions        CompletionRequest      -> completion(...) or chunks (completion_chunk)
    POST /v1/chat/completions   ChatCompletionRequest  -> the same, chat-shaped

`pipeline_parameters` maps an OpenAI request's options to the text-generation pipeline's parameters:
max_tokens -> max_new_tokens, temperature 0 -> greedy (do_sample=False), temperature > 0 -> sampling at that
temperature, no temperature -> the model's defaults, n -> num_return_sequences, stop -> stop_strings.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipelines.generation.sampling import MAX_NEW_TOKENS

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# The pipeline's parameter names in error messages, as an OpenAI client calls them (in this order).
OPENAI_NAMES = (
    ("set do_sample=True", "set temperature > 0"),
    ("do_sample=False", "temperature=0"),
    ("max_new_tokens", "max_tokens"),
    ("num_return_sequences", "n"),
    ("stop_strings", "stop"),
)
# The OpenAI routes, by the ingress route name that answers them.
OPENAI_PATHS = {
    "embeddings": "/v1/embeddings",
    "completions": "/v1/completions",
    "chat_completions": "/v1/chat/completions",
}


class OpenAIBody(BaseModel):
    """An OpenAI body: unknown fields are refused (422 naming them); strict: "10" is not a number, 1 not a bool."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingsRequest(OpenAIBody):
    """`/v1/embeddings`."""

    model_config = ConfigDict(extra="forbid")  # not strict: clients send dimensions as they like
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class StreamOptions(OpenAIBody):
    include_usage: bool = False


class GenerationOptions(OpenAIBody):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationOptions):
    """`/v1/completions`."""

    prompt: str | list[str]


class ChatMessage(OpenAIBody):
    role: str
    content: str


class ChatCompletionRequest(GenerationOptions):
    """`/v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)


def pipeline_parameters(request: GenerationOptions, max_tokens: int | None) -> dict:
    """The text-generation pipeline's parameters for an OpenAI request (see the module docstring)."""
    params = {"max_new_tokens": max_tokens} if max_tokens is not None else {}
    if request.temperature == 0:
        params["do_sample"] = False
    elif request.temperature is not None:
        params.update(do_sample=True, temperature=request.temperature)
    if request.top_p is not None:
        params["top_p"] = request.top_p
    if request.n != 1:
        params["num_return_sequences"] = request.n
    if request.stop is not None:
        params["stop_strings"] = request.stop
    if request.seed is not None:
        params["seed"] = request.seed
    return params


# -- answers --------------------------------------------------------------------------------------------------------
def error(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error body, with our `error_type` beside it for clients of the other routes."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}, "error_type": kind}


def model_list(models: list[dict], created: int) -> dict:
    """`GET /v1/models`: `models` are {"id", "task", ...} each; the task and routes ride along as metadata."""
    data = [{"object": "model", "created": created, "owned_by": "ray-pipelines", **m} for m in models]
    return {"object": "list", "data": sorted(data, key=lambda m: m["id"])}


def embedding_list(vectors: list, encoding_format: str, model: str, tokens: int) -> dict:
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(v, encoding_format)} for i, v in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encode(vector: list[float], encoding_format: str):
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(index: int, text: str, reason: str | None, is_chat: bool) -> dict:
    """One choice of a whole answer."""
    if is_chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def delta(index: int, text: str, reason: str | None, is_chat: bool, extra: dict | None = None) -> dict:
    """One choice of a streamed chunk: chat sends `delta` ({"role"} first, then {"content"}), completions `text`."""
    if is_chat:
        body = {**(extra or {}), "content": text} if text or extra else {}
        return {"index": index, "delta": body, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

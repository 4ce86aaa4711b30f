"""Ray Serve application over one pipeline: a FastAPI ingress (CPU) and a model deployment (GPU when present).

    serve run deploy/embeddings.yaml                         # or, for one model:
    serve run deploy.app:build_app task=sentence-embeddings model=sentence-transformers/all-MiniLM-L6-v2

    HTTP -> Ingress: validate, preprocess (tokenizer only) -> ModelServer: dynamic batches by tokens, forward
         -> Ingress: postprocess -> JSON

Routes under the application's prefix: `POST /` and `/predict` (Hugging Face Inference API: `{"inputs",
"parameters"}`, answering exactly what the in-process pipeline answers), `POST /v1/embeddings` (OpenAI) and
`POST /embed` (TEI) for embedding models, `GET /health`, `GET /info`, `GET /metrics` (Prometheus text),
`/docs` (OpenAPI). Errors follow TEI / OpenAI: `{"error": "...", "error_type": "..."}` with 4xx, never 500
for a bad request: 422 validation, 413 body too large, 401 without the configured bearer token, 408 on
timeout, 503 with Retry-After when more requests are in flight than the replica accepts.
"""


import asyncio
import base64
import json
import logging
import time
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from deploy.metrics import Metrics
from pipelines.convert import outputs_to_numpy, outputs_to_torch, to_plain
from pipelines.factory import pipeline

logger = logging.getLogger(__name__)

EMBEDDING_TASKS = ("sentence-embeddings",)


class ServeError(Exception):
    """An error answered to the client with `status` and `{"error": message, "error_type": kind}`."""

    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


# -- request bodies -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Body):
    """Hugging Face Inference API: one input or a list; `parameters` are the task's (`top_k`, ...)."""

    inputs: Any = Field(description="a text, a dict (QA, text pairs) or a list of them")
    parameters: dict[str, Any] = Field(default_factory=dict)


class EmbeddingsRequest(_Body):
    """OpenAI `/v1/embeddings`."""

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbedRequest(_Body):
    """TEI `/embed`."""

    inputs: str | list[str]
    truncate: bool = True
    normalize: bool = True


# -- the model deployment ---------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ModelServer:
    """Holds the weights; serves batches of requests, grouped by `@serve.batch` up to a token budget.

    Each request is one list of features (the parts of its inputs). Concurrent requests are collected
    for at most `batch_wait_s` or until their tokens reach `max_batch_tokens`, then run together through
    the pipeline's own length-sorted, token-budgeted micro-batches with out-of-memory split-and-retry.
    `max_ongoing_requests` must let a batch fill (Serve's defaults, 5 ongoing and batches of 10, never
    fill): `model_ongoing_requests` sizes it from the token budget and refuses a value that cannot.
    """

    def __init__(self, task: str, model: str, dtype: str | None = None, device: str | None = None,
                 max_batch_tokens: int = 16384, batch_wait_s: float = 0.005, threads: int | None = None, **params):  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = pipeline(task, model, dtype=dtype, device=device, **params)
        self.forward.set_max_batch_size(max_batch_tokens)
        self.forward.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, batch_size_fn=lambda rs: sum(r[2] for r in rs))
    async def forward(self, requests: list[tuple[list, dict, int]]) -> list[tuple[list, int]]:
        """requests: (features, forward params, tokens) each; returns (outputs per feature, requests in batch)."""
        results: list = [None] * len(requests)
        by_params: dict[str, list[int]] = {}
        for i, (_, params, _) in enumerate(requests):
            by_params.setdefault(repr(sorted(params.items())), []).append(i)
        for members in by_params.values():
            features = [f for i in members for f in requests[i][0]]
            outputs = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.pipe.run_model(features, params=requests[members[0]][1])
            )
            start = 0
            for i in members:
                n = len(requests[i][0])
                results[i] = ([outputs_to_numpy(o) for o in outputs[start : start + n]], len(requests))
                start += n
        return results

    async def __call__(self, features: list, params: dict, tokens: int):
        return await self.forward((features, params, tokens))


# -- the ingress --------------------------------------------------------------------------------------------------
api = FastAPI(title="ray-pipelines", description=__doc__.split("\n")[0])


def _encode(vector: list[float], fmt: str):
    if fmt == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")


@api.exception_handler(RequestValidationError)
async def _validation_error(_request, exc: RequestValidationError):
    return JSONResponse({"error": str(exc), "error_type": "validation"}, status_code=422)


# serve.ingress pickles the app and the class where it decorates them: everything they use is defined above.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """Validates, preprocesses and postprocesses on CPU; the model runs in `ModelServer`."""

    def __init__(self, model_server, task: str, model: str, revision: str | None = None, dtype: str | None = None,
                 max_client_batch_size: int = 256, max_body_bytes: int = 2_000_000, max_in_flight: int = 128,
                 request_timeout_s: float = 60.0, api_key: str | None = None, **params):  # fmt: skip
        self.model_server = model_server
        self.pipe = pipeline(task, model, revision=revision, load_weights=False, **params)
        self.info = {"model_id": model, "revision": revision, "task": self.pipe.task, "dtype": dtype or "float32",
                     "max_input_length": self.pipe.max_length, "max_client_batch_size": max_client_batch_size}  # fmt: skip
        self.max_batch, self.max_body, self.max_in_flight = max_client_batch_size, max_body_bytes, max_in_flight
        self.timeout_s, self.api_key = request_timeout_s, api_key
        self.in_flight = 0
        self.metrics = Metrics()

    # -- routes -----------------------------------------------------------------------------------------------
    @api.post("/")
    async def predict_root(self, request: Request):
        return await self._handle(request, "predict", self._predict)

    @api.post("/predict")
    async def predict(self, request: Request):
        return await self._handle(request, "predict", self._predict)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._handle(request, "embeddings", self._openai_embeddings)

    @api.post("/embed")
    async def embed(self, request: Request):
        return await self._handle(request, "embed", self._tei_embed)

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.get("/info")
    async def get_info(self):
        return self.info

    @api.get("/metrics")
    async def get_metrics(self):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- the request path ----------------------------------------------------------------------------------------
    async def _handle(self, request: Request, route: str, handler):
        start = time.perf_counter()
        try:
            self._check_auth(request)
            if self.in_flight >= self.max_in_flight:
                raise ServeError(503, f"server busy: {self.in_flight} requests in flight (the most this replica "
                                      "accepts); retry later", "overloaded", {"Retry-After": "1"})  # fmt: skip
            self.in_flight += 1
            try:
                body = await self._json(request)
                response = await asyncio.wait_for(handler(body), timeout=self.timeout_s)
            finally:
                self.in_flight -= 1
        except ServeError as e:
            self.metrics.request(route, e.status, e.kind, time.perf_counter() - start)
            return JSONResponse({"error": e.message, "error_type": e.kind}, status_code=e.status, headers=e.headers)
        except TimeoutError:
            self.metrics.request(route, 408, "timeout", time.perf_counter() - start)
            return JSONResponse({"error": f"the request took longer than {self.timeout_s} s", "error_type": "timeout"},
                                status_code=408)  # fmt: skip
        except Exception:  # a bug or a broken model, not a bad request: logged, answered as such
            logger.exception("internal error on %s", route)
            self.metrics.request(route, 500, "internal", time.perf_counter() - start)
            return JSONResponse({"error": "internal error; see the server log", "error_type": "internal"},
                                status_code=500)  # fmt: skip
        self.metrics.request(route, 200, None, time.perf_counter() - start)
        return response

    def _check_auth(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ServeError(401, "missing or wrong bearer token (Authorization: Bearer <key>)", "authentication")

    async def _json(self, request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise ServeError(413, f"request body of {size} bytes is over the limit of {self.max_body}", "payload_too_large")
        raw = await request.body()
        if len(raw) > self.max_body:
            raise ServeError(413, f"request body of {len(raw)} bytes is over the limit of {self.max_body}",
                             "payload_too_large")  # fmt: skip
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ServeError(422, f"the body is not valid JSON: {e}", "validation") from None

    def _parse(self, model: type[BaseModel], body):
        try:
            return model.model_validate(body)
        except ValidationError as e:  # name the fields
            detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
            raise ServeError(422, detail or str(e), "validation") from None

    def _items(self, inputs) -> tuple[list, bool]:
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else inputs
        if not isinstance(items, list):
            raise ServeError(422, f"inputs: expected a text, a dict or a list of them, got {type(inputs).__name__}",
                             "validation")  # fmt: skip
        if not items:
            raise ServeError(422, "inputs: empty list; send at least one input", "validation")
        if len(items) > self.max_batch:
            raise ServeError(422, f"inputs: {len(items)} items, more than the maximum batch of {self.max_batch}",
                             "validation")  # fmt: skip
        return items, single

    async def _run(self, items: list, parameters: dict) -> tuple[list, int]:
        """Preprocess on this replica, forward on the model server (batched with other requests), postprocess.
        Returns the answers and the number of tokens the model read."""
        try:
            pre, fwd, post = self._call_params(parameters)
            parts = [self.pipe.preprocess_item(item, i, pre) for i, item in enumerate(items)]
        except (TypeError, ValueError, KeyError) as e:
            raise ServeError(422, str(e).strip("'\""), "validation") from None
        features = [f for p in parts for f in p]
        tokens = sum(len(f["input_ids"]) for f in features)
        outputs, batch = await self.model_server.remote(features, fwd, tokens)
        self.metrics.batch(batch, tokens)
        answers, start = [], 0
        for p in parts:
            merged = [{**f, **outputs_to_torch(o)} for f, o in zip(p, outputs[start:])]
            start += len(p)
            answers.append(to_plain(self.pipe.postprocess_item(merged, post)))
        return answers, tokens

    def _call_params(self, parameters: dict):
        base_pre, base_fwd, base_post = self.pipe._params
        pre, fwd, post = self.pipe._sanitize_parameters(**parameters)
        return {**base_pre, **pre}, {**base_fwd, **fwd}, {**base_post, **post}

    # -- the three formats -------------------------------------------------------------------------------------
    async def _predict(self, body):
        request = self._parse(PredictRequest, body)
        items, single = self._items(request.inputs)
        answers, _ = await self._run(items, request.parameters)
        return answers[0] if single else answers

    def _embedding_task(self):
        if self.pipe.task not in EMBEDDING_TASKS:
            raise ServeError(404, f"this application serves {self.pipe.task!r}, not embeddings; use POST /predict",
                             "not_found")  # fmt: skip

    async def _openai_embeddings(self, body):
        self._embedding_task()
        request = self._parse(EmbeddingsRequest, body)
        items, _ = self._items(request.input)
        vectors, tokens = await self._run(items, {})
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
                for i, v in enumerate(vectors)]  # fmt: skip
        return {"object": "list", "data": data, "model": request.model or self.info["model_id"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    async def _tei_embed(self, body):
        self._embedding_task()
        request = self._parse(EmbedRequest, body)
        items, _ = self._items(request.inputs)
        if not request.truncate:
            for i, text in enumerate(items):
                n = len(self.pipe.tokenizer.encode(text, truncation=False))
                if n > self.pipe.max_length:
                    raise ServeError(422, f"inputs[{i}]: {n} tokens, more than the model's maximum of "
                                          f"{self.pipe.max_length}; send truncate=true to cut it", "validation")  # fmt: skip
        if not request.normalize:
            raise ServeError(422, "normalize: only true is served; the model's sentence-transformers files decide "
                                  "the normalisation", "validation")  # fmt: skip
        vectors, _ = await self._run(items, {})
        return vectors


# -- building the application -----------------------------------------------------------------------------
SMALL_REQUEST_TOKENS = 32  # one short sentence with its special tokens: what a batch must be able to hold


def model_ongoing_requests(max_batch_tokens: int, given=None) -> int:
    """The model replica's `max_ongoing_requests`: enough requests waiting to fill a batch of small requests.

    A replica only batches the requests it holds, so fewer ongoing requests than a batch holds caps every
    batch below its budget. Default: the number of SMALL_REQUEST_TOKENS requests in `max_batch_tokens`
    (at least 8). A given value below that is refused, naming both numbers.
    """
    fill = max(8, max_batch_tokens // SMALL_REQUEST_TOKENS)
    if given is None:
        return fill
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"max_ongoing_requests must be a positive integer, got {given!r}")
    if given < fill:
        raise ValueError(f"max_ongoing_requests={given} cannot fill a batch of max_batch_tokens={max_batch_tokens} "
                         f"({fill} requests of {SMALL_REQUEST_TOKENS} tokens): raise it to >= {fill} or lower "
                         "max_batch_tokens")  # fmt: skip
    return given


def build_app(args: dict):
    """The application for `serve run deploy.app:build_app key=value ...` or a config's `args:`.

    args: task, model, and optionally revision, dtype, device, max_batch_tokens, batch_wait_s, model_replicas,
    ingress_replicas, num_gpus, max_client_batch_size, max_body_bytes, max_in_flight, request_timeout_s,
    api_key, threads, and the task's parameters under `params`.
    """
    args = dict(args)
    task, model = args.pop("task", None), args.pop("model", None)
    if model is None:
        raise ValueError("build_app needs model= (a Hub id or a folder)")
    params = dict(args.pop("params", {}) or {})
    gpus = float(args.pop("num_gpus", 1 if torch.cuda.is_available() else 0))
    max_batch_tokens = int(args.pop("max_batch_tokens", 16384 if gpus else 4096))
    model_server = ModelServer.options(
        num_replicas=int(args.pop("model_replicas", 1)),
        ray_actor_options={"num_cpus": 1.0 if gpus else 0.25, "num_gpus": gpus},  # fractions: fits 2-core machines
        max_ongoing_requests=model_ongoing_requests(max_batch_tokens, args.pop("max_ongoing_requests", None)),
    ).bind(task, model, dtype=args.get("dtype"), device=args.pop("device", None), max_batch_tokens=max_batch_tokens,
           batch_wait_s=float(args.pop("batch_wait_s", 0.005)), threads=args.pop("threads", None), **params)  # fmt: skip
    ingress = Ingress.options(num_replicas=int(args.pop("ingress_replicas", 1)))
    return ingress.bind(model_server, task, model, **args, **params)

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
import logging
import time
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from ray import serve
from ray.exceptions import RayActorError

from deploy.common import (Body, PredictRequest, ServeError, busy, call_params, check_auth, install_error_handlers,
                           internal_response, parse, read_json, replica_options, timeout_response)
from deploy.metrics import Metrics
from pipelines.convert import outputs_to_numpy, outputs_to_torch, to_plain
from pipelines.factory import pipeline

logger = logging.getLogger(__name__)

EMBEDDING_TASKS = ("sentence-embeddings",)
MODEL_HEADER = "serve_multiplexed_model_id"  # Serve's own header: its proxy routes on it too
REPLICA_RETRIES = 3  # a request whose model replica died is sent again, this many times at most


class EmbeddingsRequest(Body):
    """OpenAI `/v1/embeddings`."""

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class EmbedRequest(Body):
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

    With `models` ({id: Hub id or folder}) the replica serves several models of the task through Serve's
    model multiplexing: the request's model id (header `serve_multiplexed_model_id`) routes it to a replica
    that holds that model when there is one, and each replica keeps its `max_models_per_replica` most
    recently used models, loading others on demand and dropping the least recently used.
    """

    def __init__(self, task: str, model: str, models: dict | None = None, max_models_per_replica: int = 3,
                 dtype: str | None = None, device: str | None = None, max_batch_tokens: int = 16384,
                 batch_wait_s: float = 0.0, threads: int | None = None, **params):  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.load = lambda path: pipeline(task, path, dtype=dtype, device=device, **params)
        self.models, self.default = dict(models or {}), model
        self.pipe = None if models else self.load(model)

        async def load_model(model_id: str):  # a plain function: Serve keeps its LRU on the decorated object
            return await self._load_model(model_id)

        self.multiplexed = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load_model)
        self.stats = {"requests": 0, "batches": 0, "loads": []}
        self.forward.set_max_batch_size(max_batch_tokens)
        self.forward.set_batch_wait_timeout_s(batch_wait_s)

    async def _load_model(self, model_id: str):
        self.stats["loads"].append(model_id)
        return await asyncio.get_running_loop().run_in_executor(None, self.load, self.models[model_id])

    async def _pipeline(self, model_id: str):
        if not self.models:
            return self.pipe
        return await self.multiplexed(model_id or self.default)

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, batch_size_fn=lambda rs: sum(r[2] for r in rs))
    async def forward(self, requests: list[tuple]) -> list[tuple[list, int, float]]:
        """requests: (features, forward params, tokens, model id, arrival time) each; returns, per request,
        (outputs per feature, requests in the batch, seconds it waited for the batch)."""
        started = time.perf_counter()
        self.stats["requests"] += len(requests)
        self.stats["batches"] += 1
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (_, params, _, model_id, _) in enumerate(requests):
            groups.setdefault((model_id, repr(sorted(params.items()))), []).append(i)
        for (model_id, _), members in groups.items():
            pipe = await self._pipeline(model_id)
            features = [f for i in members for f in requests[i][0]]
            outputs = await asyncio.get_running_loop().run_in_executor(
                None, lambda: pipe.run_model(features, params=requests[members[0]][1])
            )
            start = 0
            for i in members:
                n = len(requests[i][0])
                outputs_i = [outputs_to_numpy(o) for o in outputs[start : start + n]]
                results[i] = (outputs_i, len(requests), started - requests[i][4])
                start += n
        return results

    async def __call__(self, features: list, params: dict, tokens: int):
        model_id = serve.get_multiplexed_model_id()
        return await self.forward((features, params, tokens, model_id, time.perf_counter()))

    def get_stats(self) -> dict:
        """Requests and batches served by this replica and the models it loaded, in order (for tests and ops)."""
        return dict(self.stats, loads=list(self.stats["loads"]))


# -- the ingress --------------------------------------------------------------------------------------------------
api = FastAPI(title="ray-pipelines", description=__doc__.split("\n")[0])


def _encode(vector: list[float], fmt: str):
    if fmt == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")


install_error_handlers(api)


# serve.ingress pickles the app and the class where it decorates them: everything they use is defined above.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """Validates, preprocesses and postprocesses on CPU; the model runs in `ModelServer`."""

    def __init__(self, model_server, task: str, model: str, models: dict | None = None, revision: str | None = None,
                 dtype: str | None = None, max_client_batch_size: int = 256, max_body_bytes: int = 2_000_000,
                 max_in_flight: int = 128, request_timeout_s: float = 60.0, api_key: str | None = None,
                 **params):  # fmt: skip
        self.model_server = model_server
        self.models, self.default = dict(models or {}), model
        self.tokenize_only = lambda path: pipeline(task, path, revision=revision, load_weights=False, **params)
        self.pipes = {model: self.tokenize_only(self.models.get(model, model))}
        self.pipe = self.pipes[model]
        self.info = {"model_id": model, "revision": revision, "task": self.pipe.task, "dtype": dtype or "float32",
                     "max_input_length": self.pipe.max_length, "max_client_batch_size": max_client_batch_size}  # fmt: skip
        if self.models:
            self.info["models"] = sorted(self.models)
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
            check_auth(request, self.api_key)
            if self.in_flight >= self.max_in_flight:
                raise busy(self.in_flight)
            self.in_flight += 1
            try:
                body = await read_json(request, self.max_body)
                model_id = self._model_id(request, body)
                response = await asyncio.wait_for(handler(body, model_id), timeout=self.timeout_s)
            finally:
                self.in_flight -= 1
        except asyncio.CancelledError:  # the client went away: Serve cancels this task and the model call
            self.metrics.request(route, 499, "cancelled", time.perf_counter() - start)
            raise
        except ServeError as e:
            self.metrics.request(route, e.status, e.kind, time.perf_counter() - start)
            return e.response()
        except TimeoutError:
            self.metrics.request(route, 408, "timeout", time.perf_counter() - start)
            return timeout_response(self.timeout_s)
        except Exception:  # a bug or a broken model, not a bad request: logged, answered as such
            logger.exception("internal error on %s", route)
            self.metrics.request(route, 500, "internal", time.perf_counter() - start)
            return internal_response()
        self.metrics.request(route, 200, None, time.perf_counter() - start)
        return response

    def _model_id(self, request: Request, body) -> str:
        """The multiplexed model a request asks for: header `serve_multiplexed_model_id`, else an OpenAI body's
        `model` when this application serves several models; "" for the default model."""
        model_id = request.headers.get(MODEL_HEADER, "")
        if not model_id and self.models and isinstance(body, dict) and isinstance(body.get("model"), str):
            model_id = body["model"]
        if model_id and model_id != self.default and model_id not in self.models:
            served = sorted(self.models) or [self.default]
            raise ServeError(404, f"unknown model {model_id!r}; this application serves: {', '.join(served)}",
                             "model_not_found")  # fmt: skip
        return "" if model_id == self.default else model_id

    def _pipe(self, model_id: str):
        """The tokenizer-only pipeline of a model, built on first use (tokenizers are small)."""
        key = model_id or self.default
        if key not in self.pipes:
            self.pipes[key] = self.tokenize_only(self.models[key])
        return self.pipes[key]

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

    async def _run(self, items: list, parameters: dict, model_id: str = "") -> tuple[list, int]:
        """Preprocess on this replica, forward on the model server (batched with other requests), postprocess.
        Returns the answers and the number of tokens the model read."""
        pipe = self._pipe(model_id)
        try:
            pre, fwd, post = call_params(pipe, parameters)
            parts = [pipe.preprocess_item(item, i, pre) for i, item in enumerate(items)]
        except (TypeError, ValueError, KeyError) as e:
            raise ServeError(422, str(e).strip("'\""), "validation") from None
        features = [f for p in parts for f in p]
        tokens = sum(len(f["input_ids"]) for f in features)
        outputs, batch, queued_s = await self._forward(features, fwd, tokens, model_id)
        self.metrics.batch(batch, tokens, queued_s)
        answers, start = [], 0
        for p in parts:
            merged = [{**f, **outputs_to_torch(o)} for f, o in zip(p, outputs[start:])]
            start += len(p)
            answers.append(to_plain(pipe.postprocess_item(merged, post)))
        return answers, tokens

    async def _forward(self, features: list, params: dict, tokens: int, model_id: str):
        """The model server's answer; a replica that dies under the request (killed, node lost) is retried on
        another one: inference is idempotent, and the caller should not see a replica's death."""
        handle = self.model_server.options(multiplexed_model_id=model_id) if model_id else self.model_server
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                return await handle.remote(features, params, tokens)
            except RayActorError as e:
                if attempt == REPLICA_RETRIES:
                    raise ServeError(503, f"no model replica could serve the request ({type(e).__name__}); retry "
                                          "later", "unavailable", {"Retry-After": "1"}) from None  # fmt: skip
                logger.warning("model replica lost (%s); retrying the request on another", type(e).__name__)
                await asyncio.sleep(0.1 * 2**attempt)

    # -- the three formats -------------------------------------------------------------------------------------
    async def _predict(self, body, model_id: str):
        request = parse(PredictRequest, body)
        items, single = self._items(request.inputs)
        answers, _ = await self._run(items, request.parameters, model_id)
        return answers[0] if single else answers

    def _embedding_task(self):
        if self.pipe.task not in EMBEDDING_TASKS:
            raise ServeError(404, f"this application serves {self.pipe.task!r}, not embeddings; use POST /predict",
                             "not_found")  # fmt: skip

    async def _openai_embeddings(self, body, model_id: str):
        self._embedding_task()
        request = parse(EmbeddingsRequest, body)
        items, _ = self._items(request.input)
        vectors, tokens = await self._run(items, {}, model_id)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
                for i, v in enumerate(vectors)]  # fmt: skip
        return {"object": "list", "data": data, "model": request.model or model_id or self.default,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    async def _tei_embed(self, body, model_id: str):
        self._embedding_task()
        request = parse(EmbedRequest, body)
        items, _ = self._items(request.inputs)
        pipe = self._pipe(model_id)
        if not request.truncate:
            for i, text in enumerate(items):
                n = len(pipe.tokenizer.encode(text, truncation=False))
                if n > pipe.max_length:
                    raise ServeError(422, f"inputs[{i}]: {n} tokens, more than the model's maximum of "
                                          f"{pipe.max_length}; send truncate=true to cut it", "validation")  # fmt: skip
        if not request.normalize:
            raise ServeError(422, "normalize: only true is served; the model's sentence-transformers files decide "
                                  "the normalisation", "validation")  # fmt: skip
        vectors, _ = await self._run(items, {}, model_id)
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


def model_deployment_options(args: dict, gpus: float, max_batch_tokens: int) -> dict:
    """`ModelServer.options(...)` from build_app's args (pops what it uses): replicas or autoscaling, resources,
    and an ongoing-request limit that lets batches fill."""
    return replica_options(args, gpus, model_ongoing_requests(max_batch_tokens, args.pop("max_ongoing_requests", None)))


def build_app(args: dict):
    """The application for `serve run deploy.app:build_app key=value ...` or a config's `args:`.

    args: task, model, and optionally revision, dtype, device, max_batch_tokens, batch_wait_s, model_replicas
    or autoscaling (Serve's autoscaling_config for the model deployment), max_ongoing_requests, models
    ({id: Hub id or folder}, multiplexed, selected by the `serve_multiplexed_model_id` header) with
    max_models_per_replica, ingress_replicas, num_gpus, max_client_batch_size, max_body_bytes, max_in_flight,
    request_timeout_s, api_key, threads, and the task's parameters under `params`. task=text-generation builds
    deploy.generation's application instead (OpenAI completions and chat, streaming).
    """
    if args.get("task") == "text-generation":  # streams from a continuous-batching engine: its own application
        from deploy.generation import build_generation_app

        return build_generation_app(args)
    args = dict(args)
    task, model = args.pop("task", None), args.pop("model", None)
    if model is None:
        raise ValueError("build_app needs model= (a Hub id or a folder)")
    params = dict(args.pop("params", {}) or {})
    models = args.pop("models", None)
    if models is not None and (not isinstance(models, dict) or not models):
        raise ValueError(f"models must be a non-empty mapping of model id -> Hub id or folder, got {models!r}")
    if models is not None and model not in models:
        raise ValueError(f"model={model!r} (the default) must be one of models: {sorted(models)}")
    gpus = float(args.pop("num_gpus", 1 if torch.cuda.is_available() else 0))
    max_batch_tokens = int(args.pop("max_batch_tokens", 16384 if gpus else 4096))
    model_server = ModelServer.options(**model_deployment_options(args, gpus, max_batch_tokens)).bind(
        task, model, models=models, max_models_per_replica=int(args.pop("max_models_per_replica", 3)),
        dtype=args.get("dtype"), device=args.pop("device", None), max_batch_tokens=max_batch_tokens,
        batch_wait_s=float(args.pop("batch_wait_s", 0.0)), threads=args.pop("threads", None), **params,
    )  # fmt: skip
    ingress = Ingress.options(num_replicas=int(args.pop("ingress_replicas", 1)))
    return ingress.bind(model_server, task, model, models=models, **args, **params)

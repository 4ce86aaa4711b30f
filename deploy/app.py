"""Ray Serve application over one pipeline: an ingress (CPU) and a model deployment (GPU when present).

    serve run deploy/embeddings.yaml                         # or, for one model:
    serve run deploy.app:build_app task=sentence-embeddings model=sentence-transformers/all-MiniLM-L6-v2

    HTTP -> EncoderIngress: validate, preprocess (processor only) -> ModelServer: dynamic batches by tokens,
         forward -> EncoderIngress: postprocess -> JSON

Routes under the application's prefix: `POST /` and `/predict` (Hugging Face Inference API: `{"inputs",
"parameters"}`, answering exactly what the in-process pipeline answers; for a task whose inputs are bytes, a raw
`application/octet-stream`, `image/*` or `audio/*` body is one input, with the task's parameters in the query
string), `POST /v1/embeddings` (OpenAI) and `POST /embed` (TEI) for embedding models, and what every application
answers (deploy/http_api.py): `GET /health`, `/info`, `/metrics`, `/v1/models`, `/docs`. Errors: deploy/ingress.py.

Images (image-classification, zero-shot-image-classification, image-feature-extraction, image-embeddings): a raw
`image/*` body, or in JSON each input as base64 or a `data:image/<type>;base64,` URI, as the Hugging Face Inference
API takes them. `/v1/embeddings` with an image-embeddings model (CLIP, SigLIP) takes its `input` strings the same
way (OpenAI's API has no image input; base64 data URIs are what the multimodal embedding APIs clients already use
accept, and a string stays a string in every OpenAI client). The server never reads a path for a client (its own
files), nor fetches a URL unless the application is built with `allow_image_urls: true` (SSRF: it would fetch from
inside the network for anyone who can reach it); refused, those are 422s naming the input. A fetched image counts
against `max_body_bytes` as a body does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from pydantic import Field
from ray import serve
from ray.exceptions import RayActorError

from deploy import openai_schemas as oai
from deploy.common import (
    COMMON_ARGS,
    LIMIT_ARGS,
    read_args,
    replica_gpus,
    replica_options,
    replica_runtime,
    request_batch_tokens,
)
from deploy.http_api import ServeIngress, http_api
from deploy.ingress import Body, Incoming, Ingress, Limits, PredictRequest, ServeError, parse, validation_error
from deploy.metrics import BatchMetrics
from pipelines.convert import outputs_to_numpy, outputs_to_torch, to_plain
from pipelines.factory import pipeline
from pipelines.images import fetch_image_bytes, image_bytes, is_url
from pipelines.runtime import RuntimeConfig

logger = logging.getLogger(__name__)

EMBEDDING_TASKS = ("sentence-embeddings", "image-embeddings")  # /v1/embeddings input: texts, or base64 images
IMAGE_PROCESSORS = ("image", "image-text")  # processor kinds whose inputs are images: bytes on the wire
REPLICA_RETRIES = 3  # a request whose model replica died is sent again, this many times at most


class EmbedRequest(Body):
    """TEI `/embed`."""

    inputs: str | list[str] = Field(description="a text or a list of texts")
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

    def __init__(
        self,
        task: str,
        model: str,
        runtime: RuntimeConfig,
        models: dict | None = None,
        max_models_per_replica: int = 3,
        max_batch_tokens: int = 4096,
        batch_wait_s: float = 0.0,
        revision: str | None = None,
        params: dict | None = None,
    ):
        self.load = lambda path: pipeline(task, path, revision=revision, runtime=runtime, **(params or {}))
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
            run = functools.partial(pipe.run_model, features, params=requests[members[0]][1])
            outputs = await asyncio.get_running_loop().run_in_executor(None, run)
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


# -- the ingress logic (no Ray) ---------------------------------------------------------------------------------
class EncoderIngress(Ingress):
    """The request -> response steps of an encoder application: check and preprocess a request's inputs with the
    model's processor, hand the features to `forward(features, params, tokens, model_id)` (the model deployment,
    where requests are batched together; any async function in tests), postprocess its outputs.

    `processors(model_id)` gives the weightless pipeline of a served model ("" for the default)."""

    routes = {"predict": "predict", "embeddings": "openai_embeddings", "embed": "tei_embed"}

    def __init__(self, processors, forward, limits: Limits, default: str, served=(), info: dict | None = None):
        self.processors, self.forward = processors, forward
        pipe = processors("")
        self.openai_routes = ("embeddings",) if pipe.task in EMBEDDING_TASKS else ()
        info = {"max_input_length": pipe.max_length, "max_client_batch_size": limits.max_client_batch_size, **info}
        super().__init__(pipe, limits, BatchMetrics(), default, served, info)

    def _items(self, inputs) -> tuple[list, bool]:
        single = isinstance(inputs, (str, dict, bytes))
        items = [inputs] if single else inputs
        if not isinstance(items, list):
            raise validation_error(f"inputs: expected a text, a dict or a list of them, got {type(inputs).__name__}")
        if not items:
            raise validation_error("inputs: empty list; send at least one input")
        if len(items) > self.limits.max_client_batch_size:
            raise validation_error(
                f"inputs: {len(items)} items, more than the maximum batch of {self.limits.max_client_batch_size}"
            )
        if self.pipe.processor_kind in IMAGE_PROCESSORS:
            items = [self._image(item, i, single) for i, item in enumerate(items)]
        return items, single

    def _image(self, item, i: int, single: bool) -> bytes | str:
        """An image input as the bytes it encodes: a raw body's bytes, or base64 / a data URI in JSON. Never a path;
        a URL only with `allow_image_urls` (kept as the URL here, fetched with the preprocessing, off the event
        loop), else the server would read its own files or fetch for the client."""
        where = "inputs" if single else f"inputs[{i}]"
        if isinstance(item, bytes):
            return item
        if not isinstance(item, str):
            raise validation_error(
                f"{where}: expected an image as a base64 string or a data:image/...;base64 URI, got "
                f"{type(item).__name__}"
            )
        if is_url(item):
            if self.limits.allow_image_urls:
                return item
            raise validation_error(
                f"{where}: {item[:80]!r} is a URL: this server does not fetch images (its application is built without "
                "allow_image_urls); send the image's bytes (an image/* body), base64 or a data:image/...;base64 URI"
            )
        try:
            return image_bytes(item)
        except ValueError as e:
            raise validation_error(f"{where}: {e}") from None

    def _preprocess(self, pipe, items: list, pre: dict) -> list:
        """Each input's features (in a worker thread: image decoding and URL fetches stay off the event loop)."""
        parts = []
        for i, item in enumerate(items):
            if isinstance(item, str) and pipe.processor_kind in IMAGE_PROCESSORS:  # an allowed URL
                item = fetch_image_bytes(item, self.limits.max_body_bytes)
            parts.append(pipe.preprocess_item(item, i, pre))
        return parts

    async def _run(self, items: list, parameters: dict, model_id: str = "") -> tuple[list, int]:
        """Preprocess here, forward on the model deployment (batched with other requests), postprocess.
        Returns the answers and the number of tokens (the features' lengths) the model read."""
        pipe = self.processors(model_id)
        try:
            pre, fwd, post = pipe.call_parameters(**parameters)
            parts = await asyncio.to_thread(self._preprocess, pipe, items, pre)
        except (TypeError, ValueError, KeyError) as e:
            raise validation_error(str(e).strip("'\"")) from None
        features = [f for p in parts for f in p]
        tokens = sum(pipe.feature_length(f) for f in features)
        outputs, batch, queued_s = await self.forward(features, fwd, tokens, model_id)
        self.metrics.batch(batch, tokens, queued_s)
        answers, start = [], 0
        for p in parts:
            merged = [{**f, **outputs_to_torch(o)} for f, o in zip(p, outputs[start:])]
            start += len(p)
            answers.append(to_plain(pipe.postprocess_item(merged, post)))
        return answers, tokens

    # -- the three formats -------------------------------------------------------------------------------------
    async def predict(self, incoming: Incoming):
        request = parse(PredictRequest, incoming.body)
        items, single = self._items(request.inputs)
        answers, _ = await self._run(items, request.parameters, incoming.model_id)
        return answers[0] if single else answers

    def _embedding_task(self):
        if self.pipe.task not in EMBEDDING_TASKS:
            raise ServeError(
                404, f"this application serves {self.pipe.task!r}, not embeddings; use POST /predict", "not_found"
            )

    async def openai_embeddings(self, incoming: Incoming):
        self._embedding_task()
        request = parse(oai.EmbeddingsRequest, incoming.body)
        items, _ = self._items(request.input)
        vectors, tokens = await self._run(items, {}, incoming.model_id)
        return oai.embedding_list(vectors, request.encoding_format, incoming.model_id or self.default, tokens)

    async def tei_embed(self, incoming: Incoming):
        self._embedding_task()
        request = parse(EmbedRequest, incoming.body)
        items, _ = self._items(request.inputs)
        pipe = self.processors(incoming.model_id)
        if not request.truncate and pipe.processor_kind == "text":
            for i, text in enumerate(items):
                n = len(pipe.tokenizer.encode(text, truncation=False))
                if n > pipe.max_length:
                    raise validation_error(
                        f"inputs[{i}]: {n} tokens, more than the model's maximum of {pipe.max_length}; "
                        "send truncate=true to cut it"
                    )
        if not request.normalize:
            raise validation_error(
                "normalize: only true is served; the model's sentence-transformers files decide the normalisation"
            )
        vectors, _ = await self._run(items, {}, incoming.model_id)
        return vectors


# -- the ingress deployment -------------------------------------------------------------------------------------
api = http_api(
    "ray-pipelines",
    __doc__.split("\n")[0],
    {"predict": ("/", "/predict"), "embeddings": ("/v1/embeddings",), "embed": ("/embed",)},
)


async def _forward_with_retries(handle, features: list, params: dict, tokens: int, model_id: str):
    """The model deployment's answer; a replica that dies under the request (killed, node lost) is retried on
    another one: inference is idempotent, and the caller should not see a replica's death."""
    handle = handle.options(multiplexed_model_id=model_id) if model_id else handle
    for attempt in range(REPLICA_RETRIES + 1):
        try:
            return await handle.remote(features, params, tokens)
        except RayActorError as e:
            if attempt == REPLICA_RETRIES:
                raise ServeError(
                    503,
                    f"no model replica could serve the request ({type(e).__name__}); retry later",
                    "unavailable",
                    {"Retry-After": "1"},
                ) from None
            logger.warning("model replica lost (%s); retrying the request on another", type(e).__name__)
            await asyncio.sleep(0.1 * 2**attempt)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class EncoderApp(ServeIngress):
    """The ingress replica: an `EncoderIngress` whose model calls go to `ModelServer` through its handle."""

    def __init__(
        self,
        model_server,
        task: str,
        model: str,
        served_model_name: str | None = None,
        models: dict | None = None,
        revision: str | None = None,
        dtype: str | None = None,
        limits: dict | None = None,
        params: dict | None = None,
    ):
        models = dict(models or {})
        weightless = {}

        def processors(model_id: str):  # the weightless pipeline of a model, built on first use (they are small)
            key = model_id or model
            if key not in weightless:
                path = models.get(key, key)
                weightless[key] = pipeline(task, path, revision=revision, load_weights=False, **(params or {}))
            return weightless[key]

        def forward(features, fwd, tokens, model_id):
            return _forward_with_retries(model_server, features, fwd, tokens, model_id)

        default = model if models else (served_model_name or model)
        info = {"model_id": model, "revision": revision, "dtype": dtype or "float32"}
        if models:
            info["models"] = sorted(models)
        self.core = EncoderIngress(processors, forward, Limits(**(limits or {})), default, models or (), info)


# -- building the application -----------------------------------------------------------------------------
SMALL_REQUEST_TOKENS = 32  # one short sentence with its special tokens: what a batch must be able to hold
ENCODER_ARGS = {
    **COMMON_ARGS,
    "models": dict,  # {id: Hub id or folder}: multiplexed, selected by the request's model id
    "max_models_per_replica": int,
    "max_batch_tokens": int,  # tokens of concurrent requests gathered into one model call
    "batch_wait_s": float,
    "allow_image_urls": bool,  # image inputs as http(s) URLs are fetched by the ingress (default off: SSRF)
}


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
        raise ValueError(
            f"max_ongoing_requests={given} cannot fill a batch of max_batch_tokens={max_batch_tokens} "
            f"({fill} requests of {SMALL_REQUEST_TOKENS} tokens): raise it to >= {fill} or lower max_batch_tokens"
        )
    return given


def model_deployment_options(args: dict, gpus: float, max_batch_tokens: int) -> dict:
    """`ModelServer.options(...)` from build_app's args (pops what it uses): replicas or autoscaling, resources,
    and an ongoing-request limit that lets batches fill."""
    return replica_options(args, gpus, model_ongoing_requests(max_batch_tokens, args.pop("max_ongoing_requests", None)))


def build_app(args: dict):
    """The application for `serve run deploy.app:build_app key=value ...` or a config's `args:`.

    args (ENCODER_ARGS; an unknown key is refused here, naming the allowed ones): task, model, and optionally
    served_model_name (the id clients send as `model`; default `model`), revision, the model replicas' runtime
    (device, dtype, threads, quantization), max_batch_tokens, batch_wait_s, model_replicas or autoscaling (Serve's
    autoscaling_config for the model deployment), max_ongoing_requests, num_gpus, models ({id: Hub id or folder},
    multiplexed, selected by the `serve_multiplexed_model_id` header or the body's `model`) with
    max_models_per_replica, ingress_replicas, the ingress limits (max_client_batch_size, max_body_bytes,
    max_in_flight, request_timeout_s, api_key), and the task's parameters under `params`. task=text-generation
    builds deploy.generation's application instead (OpenAI completions and chat, streaming).
    """
    if isinstance(args, dict) and args.get("task") == "text-generation":  # streams from an engine: its own app
        from deploy.generation import build_generation_app

        return build_generation_app(args)
    args = read_args("deploy.app:build_app", args, ENCODER_ARGS)
    task, model = args.pop("task", None), args.pop("model", None)
    if task is None or model is None:
        raise ValueError("deploy.app:build_app needs task= and model= (a Hub id or a folder)")
    models = args.pop("models", None)
    if models is not None and not models:
        raise ValueError(f"models must be a non-empty mapping of model id -> Hub id or folder, got {models!r}")
    if models is not None and model not in models:
        raise ValueError(f"model={model!r} (the default) must be one of models: {sorted(models)}")
    if models is not None and "served_model_name" in args:
        raise ValueError("served_model_name names a single model; with models, the ids are the models' keys")
    params, revision = args.pop("params", {}), args.pop("revision", None)
    runtime, gpus = replica_runtime(args), replica_gpus(args)
    max_batch_tokens = request_batch_tokens(args, gpus)
    model_server = ModelServer.options(**model_deployment_options(args, gpus, max_batch_tokens)).bind(
        task,
        model,
        runtime,
        models=models,
        max_models_per_replica=args.pop("max_models_per_replica", 3),
        max_batch_tokens=max_batch_tokens,
        batch_wait_s=args.pop("batch_wait_s", 0.0),
        revision=revision,
        params=params,
    )
    limits = {"max_client_batch_size": 256, **{k: args.pop(k) for k in (*LIMIT_ARGS, "allow_image_urls") if k in args}}
    Limits(**limits)  # checked here, before Serve starts
    ingress = EncoderApp.options(num_replicas=args.pop("ingress_replicas", 1))
    return ingress.bind(
        model_server,
        task,
        model,
        served_model_name=args.pop("served_model_name", None),
        models=models,
        revision=revision,
        dtype=runtime.dtype if isinstance(runtime.dtype, str) else None,
        limits=limits,
        params=params,
    )

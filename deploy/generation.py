"""Ray Serve application for text generation: an ingress (CPU, tokenizer only) and a model deployment whose
continuous-batching engine is the batcher.

    serve run deploy/generation.yaml                          # or, for one model:
    serve run deploy.generation:build_generation_app model=openai-community/gpt2

    HTTP -> GenerationIngress: validate, prompt or chat -> ids -> GenerationServer.generate (streamed): every
    sequence joins the engine's running batch at its next step and leaves it when it stops -> GenerationIngress:
    detokenize (incrementally when streaming), cut at stop strings -> JSON or server-sent events

Routes under the application's prefix:
- `POST /v1/completions` (OpenAI): `{"prompt": str | [str], "max_tokens" (default 16), "temperature", "top_p", "n",
  "stop": str | [str], "seed", "stream", "stream_options": {"include_usage"}, "model", "user"}` ->
  `{"id", "object": "text_completion", "created", "model", "choices": [{"index", "text", "logprobs": null,
  "finish_reason": "stop" | "length"}], "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}`;
  choice `index` = prompt index * n + sequence index.
- `POST /v1/chat/completions` (OpenAI): `{"messages": [{"role", "content"}], ...the same options, max_tokens or
  max_completion_tokens (default: the model's, as the pipeline)}` -> `{"object": "chat.completion", "choices":
  [{"index", "message": {"role": "assistant", "content"}, "logprobs": null, "finish_reason"}], "usage", ...}`.
- With `"stream": true` both answer `text/event-stream`: `data: {chunk}\\n\\n` events in OpenAI's chunk format
  (`"object": "text_completion"` with `text`, or `"chat.completion.chunk"` with `delta`: first `{"role":
  "assistant", "content": ""}`, then `{"content": piece}`), the chunk that ends a choice carrying its
  `finish_reason`, then `{"choices": [], "usage"}` with include_usage, then `data: [DONE]`. An error after the
  first event arrives as `data: {"error", "error_type"}` and ends the stream.
- `POST /` and `/predict` (Hugging Face Inference API): `{"inputs": prompt | chat | [prompts or chats],
  "parameters": {...}}` -> exactly what `pipeline("text-generation", model)(inputs, **parameters)` returns.
- What every application answers (deploy/http_api.py): `GET /health`, `/info`, `/metrics`, `/v1/models`, `/docs`.

OpenAI options map to the pipeline's as deploy/openai_schemas.py says; stop strings are cut as OpenAI does: the
text ends before the stop string (the HF route keeps it, as the pipeline does). Errors: deploy/ingress.py; 422
also names a prompt plus max_tokens over the model's context with both numbers. A client that goes away cancels
its sequences in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from ray import serve
from ray.exceptions import RayActorError

from deploy import openai_schemas as oai
from deploy.common import COMMON_ARGS, LIMIT_ARGS, read_args, replica_gpus, replica_options, replica_runtime
from deploy.http_api import ServeIngress, http_api
from deploy.ingress import Incoming, Ingress, Limits, PredictRequest, ServeError, parse, validation_error
from deploy.metrics import GenerationMetrics
from pipelines.convert import to_plain
from pipelines.factory import pipeline
from pipelines.generation import chat
from pipelines.generation.sampling import GenerationParams
from pipelines.generation.streaming import GeneratedText
from pipelines.runtime import DEVICE_DEFAULTS, RuntimeConfig

logger = logging.getLogger(__name__)


# -- the model deployment ---------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class GenerationServer:
    """Holds the weights and the pipeline's engine loop; no `@serve.batch`: each stream's sequences join the
    engine's running batch at its next step (continuous batching), whoever sent them. `runtime.batch_size` is
    the sequences running at once, `max_batch_tokens` the prompt tokens prefilled per step."""

    def __init__(self, model: str, runtime: RuntimeConfig, revision: str | None = None):
        self.pipe = pipeline("text-generation", model, revision=revision, runtime=runtime)
        self.engine_loop = self.pipe.loop  # the engine's thread starts now, not on the first request
        self.stats = {"requests": 0, "sequences": 0, "finished": 0, "cancelled": 0, "max_running": 0}

    async def generate(self, prompts: list[list[int]], params: dict):
        """Stream the tokens of the num_return_sequences sequences of each prompt (choice index = prompt index * n
        + sequence index): one `{"tokens": [(choice, token id, finish reason or None), ...], "running": sequences
        in the engine}` per batch of engine steps, or a single `{"error", "error_type"}` for a request the engine
        refuses. When the caller goes away (the stream is closed or cancelled) the unfinished sequences are
        cancelled in the engine."""
        try:
            per_prompt = self.pipe.requests([{"input_ids": ids} for ids in prompts], params)
        except (TypeError, ValueError) as e:
            yield {"error": str(e), "error_type": "validation"}
            return
        self.stats["requests"] += 1
        events: asyncio.Queue = asyncio.Queue()
        live: dict[int, int] = {}  # choice -> engine sequence id, while unfinished
        try:
            for choice, request in enumerate(r for requests in per_prompt for r in requests):
                live[choice] = self.engine_loop.submit(on_event=self._on_event(events, choice), **request)
                self.stats["sequences"] += 1
            while live:
                chunk, running = [], 0
                batch = [await events.get()]
                while not events.empty():  # everything the engine made since the last yield, in one message
                    batch.append(events.get_nowait())
                for choice, event, running in batch:  # noqa: B007 - the last event's running count is sent
                    if isinstance(event, ValueError):  # the engine refused the sequence (it never ran)
                        live.pop(choice, None)
                        yield {"error": str(event), "error_type": "validation"}
                        return
                    if isinstance(event, BaseException):  # a failed step: every sequence in the engine fails
                        live.pop(choice, None)
                        raise event
                    chunk.append((choice, event.token_id, event.finish_reason))
                    if event.finished:
                        live.pop(choice, None)
                        self.stats["finished"] += 1
                yield {"tokens": chunk, "running": running}
        finally:
            for seq_id in live.values():
                self.engine_loop.cancel(seq_id)
            self.stats["cancelled"] += len(live)

    def _on_event(self, events: asyncio.Queue, choice: int) -> Callable:
        """on_event for the engine's thread: hands the event (and the engine's batch size) to this replica's loop."""
        loop, engine = asyncio.get_running_loop(), self.engine_loop.engine

        def on_event(event):
            running = len(engine.running)
            self.stats["max_running"] = max(self.stats["max_running"], running)
            loop.call_soon_threadsafe(events.put_nowait, (choice, event, running))

        return on_event

    def get_stats(self) -> dict:
        """Streams and sequences served, finished, cancelled; sequences in the engine now and at most (tests, ops)."""
        engine = self.engine_loop.engine
        return dict(self.stats, running=len(engine.running), waiting=len(engine.waiting))


# -- the ingress logic (no Ray) ---------------------------------------------------------------------------------
class TokenStream:
    """The model deployment's stream for one request (anything with `__anext__` and `cancel()`: a Serve
    response generator, or a local one in tests): `next()` gives its next chunk of (choice, token id, finish
    reason) or None at the end, and keeps the metrics; `close()` cancels the sequences still running."""

    def __init__(self, response, metrics: GenerationMetrics, started: float):
        self.response, self.metrics, self.started = response, metrics, started
        self.done, self.tokens, self.peak = False, 0, 0

    async def next(self) -> list | None:
        if self.done:
            return None
        try:
            chunk = await self.response.__anext__()
        except StopAsyncIteration:
            self._end()
            return None
        except RayActorError as e:
            self._end()
            raise ServeError(
                503,
                f"the model replica was lost ({type(e).__name__}); retry later",
                "unavailable",
                {"Retry-After": "1"},
            ) from None
        if "error" in chunk:
            self._end()
            raise ServeError(422, chunk["error"], chunk["error_type"])
        if self.tokens == 0:
            self.metrics.first_token.observe(time.perf_counter() - self.started)
        self.tokens += len(chunk["tokens"])
        self.metrics.generated_tokens += len(chunk["tokens"])
        self.peak = max(self.peak, chunk["running"])
        return chunk["tokens"]

    def close(self) -> None:
        if not self.done:
            self._end()
            self.response.cancel()

    def _end(self) -> None:
        self.done = True
        if self.tokens:
            self.metrics.engine_sequences.observe(self.peak)


class CompletionStream:
    """A streamed OpenAI answer whose first model chunk has arrived (a `deploy.ingress.Stream`): the opening
    events, the events of each chunk, the closing events, then "[DONE]"."""

    def __init__(self, tokens: TokenStream, first: list, opening: list, chunk_events: Callable, closing: Callable):
        self.tokens, self.first, self.opening = tokens, first, opening
        self.chunk_events, self.closing = chunk_events, closing

    async def events(self):
        for event in self.opening:
            yield event
        chunk = self.first
        while chunk is not None:
            for event in self.chunk_events(chunk):
                yield event
            chunk = await self.tokens.next()
        for event in self.closing():
            yield event
        yield "[DONE]"

    def close(self) -> None:
        self.tokens.close()


def _deltas(choices: list[GeneratedText], chunk: list) -> dict[int, str]:
    """Push a chunk's tokens into their choices; {choice: new text} for the choices with news (text or an end)."""
    news: dict[int, str] = {}
    for index, token, reason in chunk:
        if choices[index].finish_reason is None:
            news[index] = news.get(index, "") + choices[index].push(token, reason)
    return {i: text for i, text in news.items() if text or choices[i].finish_reason}


class GenerationIngress(Ingress):
    """The request -> response steps of a text-generation application: prompts or chats to ids with the model's
    tokenizer, `open_stream(prompt ids, forward params)` (the model deployment's streamed `generate`; a local
    generator in tests) for the tokens, detokenized and cut at stop strings into OpenAI or Hugging Face answers."""

    routes = {"completions": "completions", "chat_completions": "chat_completions", "predict": "predict"}
    openai_routes = ("completions", "chat_completions")

    def __init__(self, pipe, open_stream, limits: Limits, default: str, info: dict | None = None):
        self.open_stream = open_stream
        info = {
            "max_context": pipe.max_length,
            "max_client_batch_size": limits.max_client_batch_size,
            "chat_template": pipe.templates.templates is not None,
            **(info or {}),
        }
        super().__init__(pipe, limits, GenerationMetrics(), default, (), info)

    def _prepare(self, items: list, parameters: dict, names=()) -> tuple[list[dict], dict, dict, GenerationParams]:
        """Features (prompt ids, ...) of each item and the (forward, postprocess) parameters of the request, checked:
        each prompt plus its new tokens must fit the model's context. 422 naming the field (as `names` rename it)."""
        try:
            pre, fwd, post = self.pipe.call_parameters(**parameters)
            resolved = GenerationParams.resolve(self.pipe.generation_defaults, max_context=self.pipe.max_length, **fwd)
            features = [self.pipe.preprocess_item(item, i, pre)[0] for i, item in enumerate(items)]
            for i, f in enumerate(features):
                try:
                    resolved.new_tokens(len(f["input_ids"]))
                except ValueError as e:
                    raise ValueError(f"input #{i}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            message = str(e).strip("'\"")
            for ours, theirs in names:
                message = message.replace(ours, theirs)
            raise validation_error(message) from None
        sequences = len(features) * resolved.num_return_sequences
        if sequences > self.limits.max_client_batch_size:
            raise validation_error(
                f"{len(features)} prompts x {resolved.num_return_sequences} sequences = {sequences} sequences, "
                f"more than the maximum of {self.limits.max_client_batch_size} per request"
            )
        return features, fwd, post, resolved

    def _open(self, features: list[dict], fwd: dict, start: float) -> TokenStream:
        self.metrics.prompt_tokens += sum(len(f["input_ids"]) for f in features)
        response = self.open_stream([list(f["input_ids"]) for f in features], fwd)
        return TokenStream(response, self.metrics, start)

    async def _generate(self, features: list[dict], fwd: dict, choices: list[GeneratedText], start: float) -> None:
        """Run the sequences to the end, filling `choices`; cancelled with this task (timeout, client gone)."""
        tokens = self._open(features, fwd, start)
        try:
            while (chunk := await tokens.next()) is not None:
                for index, token, reason in chunk:
                    choices[index].push(token, reason)
        finally:
            tokens.close()

    # -- the formats -------------------------------------------------------------------------------------------
    async def predict(self, incoming: Incoming):
        request = parse(PredictRequest, incoming.body)
        single = isinstance(request.inputs, str) or chat.is_chat(request.inputs)
        items = [request.inputs] if single else request.inputs
        if not isinstance(items, list) or not items:
            raise validation_error("inputs: expected a prompt, a chat or a non-empty list of them")
        features, fwd, post, resolved = self._prepare(items, request.parameters)
        n = resolved.num_return_sequences
        choices = [GeneratedText(self.pipe.decode) for _ in range(len(features) * n)]
        await self._generate(features, fwd, choices, incoming.started)
        answers = []
        for i, f in enumerate(features):
            mine = choices[i * n : (i + 1) * n]
            outputs = {**f, "generated_ids": [c.ids for c in mine], "finish_reasons": [c.finish_reason for c in mine]}
            answers.append(to_plain(self.pipe.postprocess_item([outputs], post)))
        return answers[0] if single else answers

    async def completions(self, incoming: Incoming):
        request = parse(oai.CompletionRequest, incoming.body)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise validation_error("prompt: empty list; send at least one prompt")
        max_tokens = request.max_tokens if request.max_tokens is not None else oai.COMPLETION_MAX_TOKENS
        parameters = oai.pipeline_parameters(request, max_tokens)
        return await self._openai(request, prompts, prompts, parameters, incoming, is_chat=False)

    async def chat_completions(self, incoming: Incoming):
        request = parse(oai.ChatCompletionRequest, incoming.body)
        if request.max_tokens is not None and request.max_completion_tokens is not None:
            raise validation_error("max_tokens, max_completion_tokens: give one of them")
        messages = [m.model_dump() for m in request.messages]
        parameters = oai.pipeline_parameters(request, request.max_tokens or request.max_completion_tokens)
        return await self._openai(request, [messages], [""], parameters, incoming, is_chat=True)

    async def _openai(self, request, items: list, contexts: list[str], parameters: dict, incoming, is_chat: bool):
        features, fwd, _, resolved = self._prepare(items, parameters, oai.OPENAI_NAMES)
        n = resolved.num_return_sequences
        choices = [
            GeneratedText(self.pipe.decode, resolved.stop_strings, contexts[i // n], incremental=request.stream)
            for i in range(len(features) * n)
        ]
        head = {
            "id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if is_chat else "text_completion",
            "created": int(time.time()),
            "model": incoming.model_id or self.default,
        }
        prompt_tokens = sum(len(f["input_ids"]) for f in features)

        def usage() -> dict:
            return oai.usage(prompt_tokens, sum(len(c.ids) for c in choices))

        if not request.stream:
            await self._generate(features, fwd, choices, incoming.started)
            answers = [oai.choice(i, c.output, c.finish_reason, is_chat) for i, c in enumerate(choices)]
            return {**head, "choices": answers, "usage": usage()}
        head["object"] = "chat.completion.chunk" if is_chat else "text_completion"
        tokens = self._open(features, fwd, incoming.started)
        try:
            first = await tokens.next()
        except BaseException:
            tokens.close()
            raise
        opening = [
            {**head, "choices": [oai.delta(i, "", None, is_chat, {"role": "assistant"})]}
            for i in range(len(choices))
            if is_chat
        ]

        def chunk_events(chunk: list) -> list[dict]:
            return [
                {**head, "choices": [oai.delta(i, text, choices[i].finish_reason, is_chat)]}
                for i, text in _deltas(choices, chunk).items()
            ]

        def closing() -> list[dict]:
            return [{**head, "choices": [], "usage": usage()}] if request.include_usage else []

        return CompletionStream(tokens, first, opening, chunk_events, closing)


# -- the ingress deployment -------------------------------------------------------------------------------------
api = http_api(
    "ray-pipelines text generation",
    __doc__.split("\n")[0],
    {
        "completions": ("/v1/completions",),
        "chat_completions": ("/v1/chat/completions",),
        "predict": ("/", "/predict"),
    },
)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class GenerationApp(ServeIngress):
    """The ingress replica: a `GenerationIngress` whose token streams come from `GenerationServer.generate`."""

    def __init__(
        self,
        model_server,
        model: str,
        served_model_name: str | None = None,
        revision: str | None = None,
        dtype: str | None = None,
        max_sequences: int | None = None,
        limits: dict | None = None,
        params: dict | None = None,
    ):
        stream = model_server.options(stream=True)
        pipe = pipeline("text-generation", model, revision=revision, load_weights=False, **(params or {}))
        info = {"model_id": model, "revision": revision, "dtype": dtype or "float32", "max_sequences": max_sequences}
        limits = Limits(**(limits or {}))
        self.core = GenerationIngress(pipe, stream.generate.remote, limits, served_model_name or model, info)


# -- building the application -----------------------------------------------------------------------------
GENERATION_ARGS = {
    **COMMON_ARGS,
    "max_sequences": int,  # sequences running at once in the engine
    "max_batch_tokens": int,  # prompt tokens prefilled per engine step
    "kv_cache_tokens": int,
}


def generation_deployment_options(args: dict, gpus: float, max_sequences: int) -> dict:
    """`GenerationServer.options(...)` from the args (pops what it uses): replicas or autoscaling, resources, and
    an ongoing-stream limit that lets the engine fill: at least `max_sequences` streams by default."""
    max_ongoing = args.pop("max_ongoing_requests", None)
    return replica_options(args, gpus, max(8, max_sequences) if max_ongoing is None else max_ongoing)


def build_generation_app(args: dict):
    """The application for `serve run deploy.generation:build_generation_app key=value ...` or a config's `args:`.

    args (GENERATION_ARGS; an unknown key is refused here, naming the allowed ones): model (a Hub id or a folder),
    and optionally task ("text-generation"), served_model_name, revision, the model replicas' runtime (device,
    dtype, threads, quantization), num_gpus, model_replicas or autoscaling (Serve's autoscaling_config for the
    model deployment), max_ongoing_requests, ingress_replicas, max_sequences (sequences running at once in the
    engine), max_batch_tokens (prompt tokens prefilled per step), kv_cache_tokens, the ingress limits
    (max_client_batch_size: sequences per request, max_body_bytes, max_in_flight, request_timeout_s, api_key),
    and the pipeline's default parameters under `params`.
    """
    args = read_args("deploy.generation:build_generation_app", args, GENERATION_ARGS)
    task, model = args.pop("task", "text-generation"), args.pop("model", None)
    if task != "text-generation":
        raise ValueError(f"build_generation_app serves task 'text-generation', got {task!r}; use deploy.app:build_app")
    if model is None:
        raise ValueError("build_generation_app needs model= (a Hub id or a folder)")
    params, revision = args.pop("params", {}), args.pop("revision", None)
    runtime, gpus = replica_runtime(args), replica_gpus(args)
    max_sequences = args.pop("max_sequences", DEVICE_DEFAULTS["cuda" if gpus else "cpu"].max_sequences)
    runtime = runtime.merged(
        batch_size=max_sequences,
        max_batch_tokens=args.pop("max_batch_tokens", None),
        kv_cache_tokens=args.pop("kv_cache_tokens", None),
    )
    options = generation_deployment_options(args, gpus, max_sequences)
    server = GenerationServer.options(**options).bind(model, runtime, revision=revision)
    limits = {k: args.pop(k) for k in LIMIT_ARGS if k in args}
    Limits(**limits)  # checked here, before Serve starts
    ingress = GenerationApp.options(num_replicas=args.pop("ingress_replicas", 1))
    return ingress.bind(
        server,
        model,
        served_model_name=args.pop("served_model_name", None),
        revision=revision,
        dtype=runtime.dtype if isinstance(runtime.dtype, str) else None,
        max_sequences=max_sequences,
        limits=limits,
        params=params,
    )

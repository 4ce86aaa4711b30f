"""Ray Serve application for text generation: a FastAPI ingress (CPU, tokenizer only) and a model deployment whose
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
- `GET /health`, `GET /info` (model id, task, max context, dtype, ...), `GET /metrics` (Prometheus text), `/docs`.

OpenAI options map to the pipeline's: max_tokens -> max_new_tokens, temperature 0 -> greedy (do_sample=False),
temperature > 0 -> sampling at that temperature, no temperature -> the model's defaults (generation_config.json,
then the pipeline's do_sample=True, temperature=0.7), n -> num_return_sequences, stop -> stop_strings, cut as
OpenAI does: the text ends before the stop string (the HF route keeps it, as the pipeline does).

Errors as deploy/app.py: `{"error": "...", "error_type": "..."}`, never 500 for a bad request: 422 validation
(malformed JSON, wrong types, unknown fields or parameters, an empty prompt, a prompt plus max_tokens over the
model's context, naming both numbers), 413 body too large, 401 without the configured bearer token, 408 on timeout,
503 with Retry-After over `max_in_flight` (a stream counts until it ends). A client that goes away cancels its
sequences in the engine.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError

from deploy.common import (Body, PredictRequest, ServeError, busy, call_params, check_auth, install_error_handlers,
                           internal_response, parse, read_json, replica_options, timeout_response)
from deploy.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram, Metrics
from pipelines.generation import chat
from pipelines.convert import to_plain
from pipelines.factory import pipeline
from pipelines.generation.streaming import TextStream
from pipelines.generation.sampling import MAX_NEW_TOKENS, GenerationParams, truncate_at_stop

logger = logging.getLogger(__name__)

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# The pipeline's parameter names in error messages, as an OpenAI client calls them (in this order).
OPENAI_NAMES = (
    ("set do_sample=True", "set temperature > 0"), ("do_sample=False", "temperature=0"),
    ("max_new_tokens", "max_tokens"), ("num_return_sequences", "n"), ("stop_strings", "stop"),
)  # fmt: skip


# -- request bodies -------------------------------------------------------------------------------------------
class _Body(Body):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "10" is not a number, 1 is not a boolean


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIOptions(_Body):
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


class CompletionRequest(_OpenAIOptions):
    """OpenAI `/v1/completions`."""

    prompt: str | list[str]


class ChatMessage(_Body):
    role: str
    content: str


class ChatCompletionRequest(_OpenAIOptions):
    """OpenAI `/v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)


def _pipeline_parameters(request: _OpenAIOptions, max_tokens: int | None) -> dict:
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


# -- the model deployment ---------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class GenerationServer:
    """Holds the weights and the pipeline's engine loop; no `@serve.batch`: each stream's sequences join the
    engine's running batch at its next step (continuous batching), whoever sent them."""

    def __init__(self, model: str, revision: str | None = None, dtype: str | None = None, device: str | None = None,
                 max_sequences: int = 64, max_batch_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 threads: int | None = None):  # fmt: skip
        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = pipeline("text-generation", model, revision=revision, dtype=dtype, device=device,
                             batch_size=max_sequences, max_batch_tokens=max_batch_tokens,
                             kv_cache_tokens=kv_cache_tokens)  # fmt: skip
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
                for choice, event, running in batch:
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


# -- what the ingress keeps per request -------------------------------------------------------------------------
class GenerationMetrics(Metrics):
    """Requests by route and status, errors by type, latency, plus prompt and generated tokens, time to first
    token and the number of sequences the engine ran at once while a request's tokens were made (its peak)."""

    def __init__(self):
        super().__init__()
        self.prompt_tokens = self.generated_tokens = 0
        self.first_token = Histogram(LATENCY_BUCKETS)
        self.engine_sequences = Histogram(BATCH_BUCKETS)

    def render(self) -> str:
        lines = ["# TYPE pipelines_requests_total counter"]
        lines += [f'pipelines_requests_total{{route="{r}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.requests.items())]  # fmt: skip
        lines += ["# TYPE pipelines_errors_total counter"]
        lines += [f'pipelines_errors_total{{type="{t}"}} {n}' for t, n in sorted(self.errors.items())]
        lines += ["# TYPE pipelines_prompt_tokens_total counter", f"pipelines_prompt_tokens_total {self.prompt_tokens}"]
        lines += ["# TYPE pipelines_generated_tokens_total counter",
                  f"pipelines_generated_tokens_total {self.generated_tokens}"]  # fmt: skip
        lines += self.latency.render("pipelines_request_seconds")
        lines += self.first_token.render("pipelines_time_to_first_token_seconds")
        lines += self.engine_sequences.render("pipelines_engine_sequences")
        return "\n".join(lines) + "\n"


class _Choice:
    """One returned sequence: its token ids and its text. With stop strings the text ends before the first one
    (OpenAI), found in `context` (the prompt) + text so that one begun in the prompt counts; while streaming,
    text that could still grow into a stop string is held back, so nothing sent ever needs taking back."""

    def __init__(self, decode: Callable, stops=(), context: str = "", incremental: bool = False):
        self.decode, self.stops, self.context = decode, tuple(stops), context
        self.ids: list[int] = []
        self.text, self.sent, self.finish_reason = "", 0, None
        self.stream = TextStream(decode) if incremental else None

    def push(self, token: int, reason: str | None) -> str:
        """Add a generated token (and the engine's finish reason); the text that may be sent now."""
        if self.finish_reason is not None:  # already cut at a stop string
            return ""
        self.ids.append(token)
        self.finish_reason = reason
        if self.stream is not None:
            self.text += self.stream.push(token) + (self.stream.flush() if reason else "")
        elif reason is not None:
            self.text = self.decode(self.ids)
        else:
            return ""
        return self._advance()

    def _advance(self) -> str:
        end = len(self.text)
        if self.stops:
            full, start = self.context + self.text, len(self.context)
            cut = len(truncate_at_stop(full, self.stops, start=start))
            if cut < len(full):
                self.finish_reason = "stop"
            end = (cut if self.finish_reason else _hold_back(full, self.stops, cut, start)) - start
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    @property
    def output(self) -> str:
        return self.text[: self.sent]


def _hold_back(full: str, stops: tuple, end: int, start: int) -> int:
    """Where sendable text ends: before the earliest tail of full[:end] that is the beginning of a stop string."""
    for p in range(max(end - max(map(len, stops)) + 1, 0), end):
        if any(s.startswith(full[p:end]) for s in stops):
            return max(p, start)
    return end


class _TokenStream:
    """The model server's stream for one request: `next()` gives its next chunk of (choice, token id, finish
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
            raise ServeError(503, f"the model replica was lost ({type(e).__name__}); retry later", "unavailable",
                             {"Retry-After": "1"}) from None  # fmt: skip
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


@dataclass
class _EventStream:
    """A streamed answer whose first model chunk has arrived: opening events, events per chunk, closing events;
    and how it ended (a client that went away until it says otherwise)."""

    tokens: _TokenStream
    first: list
    opening: list[dict]
    events: Callable[[list], list[dict]]
    closing: Callable[[], list[dict]]
    status: int = 499
    kind: str | None = "cancelled"
    closed: bool = False


class _EventResponse(StreamingResponse):
    """text/event-stream that runs `on_close` however it ends, even when the client left before the first byte
    (the body generator then never starts, so its own `finally` cannot be relied on)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _deltas(choices: list[_Choice], chunk: list) -> dict[int, str]:
    """Push a chunk's tokens into their choices; {choice: new text} for the choices with news (text or an end)."""
    news: dict[int, str] = {}
    for index, token, reason in chunk:
        if choices[index].finish_reason is None:
            news[index] = news.get(index, "") + choices[index].push(token, reason)
    return {i: text for i, text in news.items() if text or choices[i].finish_reason}


def _answer(index: int, text: str, reason: str | None, is_chat: bool) -> dict:
    if is_chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def _delta(index: int, text: str, reason: str | None, is_chat: bool, extra: dict | None = None) -> dict:
    if is_chat:
        delta = {**(extra or {}), "content": text} if text or extra else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"  # ASCII: no U+2028 or U+0085 for a client that splits lines on them


# -- the ingress ------------------------------------------------------------------------------------------------
api = FastAPI(title="ray-pipelines text generation", description=__doc__.split("\n")[0])


install_error_handlers(api)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class GenerationIngress:
    """Validates, tokenizes and detokenizes on CPU; the model runs in `GenerationServer`."""

    def __init__(self, model_server, model: str, revision: str | None = None, dtype: str | None = None,
                 max_sequences: int = 64, max_client_batch_size: int = 64, max_body_bytes: int = 2_000_000,
                 max_in_flight: int = 128, request_timeout_s: float = 60.0, api_key: str | None = None,
                 **params):  # fmt: skip
        self.model_stream = model_server.options(stream=True)
        self.pipe = pipeline("text-generation", model, revision=revision, load_weights=False, **params)
        self.model_id = model
        self.info = {"model_id": model, "revision": revision, "task": self.pipe.task,
                     "max_context": self.pipe.max_length, "dtype": dtype or "float32", "max_sequences": max_sequences,
                     "max_client_batch_size": max_client_batch_size,
                     "chat_template": self.pipe.templates.templates is not None}  # fmt: skip
        self.max_batch, self.max_body, self.max_in_flight = max_client_batch_size, max_body_bytes, max_in_flight
        self.timeout_s, self.api_key = request_timeout_s, api_key
        self.in_flight = 0
        self.metrics = GenerationMetrics()

    # -- routes -----------------------------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completions", self._completions)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, "chat_completions", self._chat_completions)

    @api.post("/")
    async def predict_root(self, request: Request):
        return await self._handle(request, "predict", self._predict)

    @api.post("/predict")
    async def predict(self, request: Request):
        return await self._handle(request, "predict", self._predict)

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
                result = await asyncio.wait_for(handler(body, start), timeout=self.timeout_s)
            except BaseException:
                self.in_flight -= 1
                raise
        except asyncio.CancelledError:  # the client went away: Serve cancels this task, the handler its sequences
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
        if isinstance(result, _EventStream):  # the in-flight slot and the request's metrics go with the stream
            return _EventResponse(self._sse(route, start, result), lambda: self._close(route, start, result))
        self.in_flight -= 1
        self.metrics.request(route, 200, None, time.perf_counter() - start)
        return result

    async def _sse(self, route: str, start: float, stream: _EventStream):
        """Server-sent events of a streamed answer; a failure after the first event is sent as an error event.
        Until it ends (or the client goes away: 499) the stream holds its in-flight slot."""
        try:
            for event in stream.opening:
                yield _event(event)
            chunk = stream.first
            while chunk is not None:
                for event in stream.events(chunk):
                    yield _event(event)
                remaining = self.timeout_s - (time.perf_counter() - start)
                chunk = await asyncio.wait_for(stream.tokens.next(), timeout=max(remaining, 0))
            for event in stream.closing():
                yield _event(event)
            yield "data: [DONE]\n\n"
            stream.status, stream.kind = 200, None
        except TimeoutError:
            stream.status, stream.kind = 408, "timeout"
            yield _event({"error": f"the request took longer than {self.timeout_s} s", "error_type": "timeout"})
        except ServeError as e:
            stream.status, stream.kind = e.status, e.kind
            yield _event({"error": e.message, "error_type": e.kind})
        except Exception:
            logger.exception("internal error while streaming %s", route)
            stream.status, stream.kind = 500, "internal"
            yield _event({"error": "internal error; see the server log", "error_type": "internal"})
        finally:
            self._close(route, start, stream)

    def _close(self, route: str, start: float, stream: _EventStream) -> None:
        """A stream's end, once: its sequences cancelled if still running, its slot freed, its request counted."""
        if stream.closed:
            return
        stream.closed = True
        stream.tokens.close()
        self.in_flight -= 1
        self.metrics.request(route, stream.status, stream.kind, time.perf_counter() - start)

    def _prepare(self, items: list, parameters: dict, names=()) -> tuple[list[dict], dict, dict, GenerationParams]:
        """Features (prompt ids, ...) of each item and the (forward, postprocess) parameters of the request, checked:
        each prompt plus its new tokens must fit the model's context. 422 naming the field (as `names` rename it)."""
        try:
            pre, fwd, post = call_params(self.pipe, parameters)
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
            raise ServeError(422, message, "validation") from None
        sequences = len(features) * resolved.num_return_sequences
        if sequences > self.max_batch:
            raise ServeError(422, f"{len(features)} prompts x {resolved.num_return_sequences} sequences = "
                                  f"{sequences} sequences, more than the maximum of {self.max_batch} per request",
                             "validation")  # fmt: skip
        return features, fwd, post, resolved

    def _open(self, features: list[dict], fwd: dict, start: float) -> _TokenStream:
        self.metrics.prompt_tokens += sum(len(f["input_ids"]) for f in features)
        response = self.model_stream.generate.remote([list(f["input_ids"]) for f in features], fwd)
        return _TokenStream(response, self.metrics, start)

    async def _generate(self, features: list[dict], fwd: dict, choices: list[_Choice], start: float) -> None:
        """Run the sequences to the end, filling `choices`; cancelled with this task (timeout, client gone)."""
        tokens = self._open(features, fwd, start)
        try:
            while (chunk := await tokens.next()) is not None:
                for index, token, reason in chunk:
                    choices[index].push(token, reason)
        finally:
            tokens.close()

    # -- the formats -------------------------------------------------------------------------------------------
    async def _predict(self, body, start: float):
        request = parse(PredictRequest, body)
        single = isinstance(request.inputs, str) or chat.is_chat(request.inputs)
        items = [request.inputs] if single else request.inputs
        if not isinstance(items, list) or not items:
            raise ServeError(422, "inputs: expected a prompt, a chat or a non-empty list of them", "validation")
        features, fwd, post, resolved = self._prepare(items, request.parameters)
        n = resolved.num_return_sequences
        choices = [_Choice(self.pipe.decode) for _ in range(len(features) * n)]
        await self._generate(features, fwd, choices, start)
        answers = []
        for i, f in enumerate(features):
            mine = choices[i * n : (i + 1) * n]
            outputs = {**f, "generated_ids": [c.ids for c in mine], "finish_reasons": [c.finish_reason for c in mine]}
            answers.append(to_plain(self.pipe.postprocess_item([outputs], post)))
        return answers[0] if single else answers

    async def _completions(self, body, start: float):
        request = parse(CompletionRequest, body)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ServeError(422, "prompt: empty list; send at least one prompt", "validation")
        max_tokens = request.max_tokens if request.max_tokens is not None else COMPLETION_MAX_TOKENS
        return await self._openai(request, prompts, prompts, _pipeline_parameters(request, max_tokens), start, False)

    async def _chat_completions(self, body, start: float):
        request = parse(ChatCompletionRequest, body)
        if request.max_tokens is not None and request.max_completion_tokens is not None:
            raise ServeError(422, "max_tokens, max_completion_tokens: give one of them", "validation")
        messages = [m.model_dump() for m in request.messages]
        parameters = _pipeline_parameters(request, request.max_tokens or request.max_completion_tokens)
        return await self._openai(request, [messages], [""], parameters, start, True)

    async def _openai(self, request: _OpenAIOptions, items: list, contexts: list[str], parameters: dict,
                      start: float, is_chat: bool):  # fmt: skip
        features, fwd, _, resolved = self._prepare(items, parameters, OPENAI_NAMES)
        n = resolved.num_return_sequences
        choices = [_Choice(self.pipe.decode, resolved.stop_strings, contexts[i // n], incremental=request.stream)
                   for i in range(len(features) * n)]  # fmt: skip
        kind = "chat.completion" if is_chat else "text_completion"
        head = {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": request.model or self.model_id}  # fmt: skip
        prompt_tokens = sum(len(f["input_ids"]) for f in features)

        def usage() -> dict:
            done = sum(len(c.ids) for c in choices)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        if not request.stream:
            await self._generate(features, fwd, choices, start)
            return {**head, "choices": [_answer(i, c.output, c.finish_reason, is_chat) for i, c in enumerate(choices)],
                    "usage": usage()}  # fmt: skip
        head["object"] = "chat.completion.chunk" if is_chat else "text_completion"
        tokens = self._open(features, fwd, start)
        try:
            first = await tokens.next()
        except BaseException:
            tokens.close()
            raise
        opening = [{**head, "choices": [_delta(i, "", None, is_chat, {"role": "assistant"})]}
                   for i in range(len(choices)) if is_chat]  # fmt: skip

        def events(chunk: list) -> list[dict]:
            return [{**head, "choices": [_delta(i, text, choices[i].finish_reason, is_chat)]}
                    for i, text in _deltas(choices, chunk).items()]  # fmt: skip

        def closing() -> list[dict]:
            include = request.stream_options is not None and request.stream_options.include_usage
            return [{**head, "choices": [], "usage": usage()}] if include else []

        return _EventStream(tokens, first, opening, events, closing)


# -- building the application -----------------------------------------------------------------------------
INGRESS_ARGS = ("revision", "dtype", "max_sequences", "max_client_batch_size", "max_body_bytes", "max_in_flight",
                "request_timeout_s", "api_key")  # fmt: skip
SERVER_ARGS = ("revision", "dtype", "device", "max_sequences", "max_batch_tokens", "kv_cache_tokens", "threads")
DEPLOYMENT_ARGS = ("num_gpus", "model_replicas", "autoscaling", "max_ongoing_requests", "ingress_replicas")
# Numbers arrive as strings from `serve run module:app key=value`.
NUMERIC_ARGS = {
    "max_sequences": int, "max_batch_tokens": int, "kv_cache_tokens": int, "threads": int, "max_client_batch_size": int,
    "max_body_bytes": int, "max_in_flight": int, "request_timeout_s": float, "num_gpus": float, "model_replicas": int,
    "max_ongoing_requests": int, "ingress_replicas": int,
}  # fmt: skip


def generation_deployment_options(args: dict, gpus: float, max_sequences: int) -> dict:
    """`GenerationServer.options(...)` from the args (pops what it uses): replicas or autoscaling, resources, and
    an ongoing-stream limit that lets the engine fill: at least `max_sequences` streams by default."""
    max_ongoing = args.pop("max_ongoing_requests", None)
    max_ongoing = max(8, max_sequences) if max_ongoing is None else max_ongoing
    if isinstance(max_ongoing, bool) or not isinstance(max_ongoing, int) or max_ongoing < 1:
        raise ValueError(f"max_ongoing_requests must be a positive integer, got {max_ongoing!r}")
    return replica_options(args, gpus, max_ongoing)


def build_generation_app(args: dict):
    """The application for `serve run deploy.generation:build_generation_app key=value ...` or a config's `args:`.

    args: model (a Hub id or a folder), and optionally task ("text-generation"), revision, dtype, device, num_gpus,
    model_replicas or autoscaling (Serve's autoscaling_config for the model deployment), max_ongoing_requests,
    ingress_replicas, max_sequences (sequences running at once in the engine), max_batch_tokens (prompt tokens
    prefilled per step), kv_cache_tokens, threads, max_client_batch_size (sequences per request), max_body_bytes,
    max_in_flight, request_timeout_s, api_key, and the pipeline's default parameters under `params`.
    """
    args = dict(args)
    task, model = args.pop("task", "text-generation"), args.pop("model", None)
    if task != "text-generation":
        raise ValueError(f"build_generation_app serves task 'text-generation', got {task!r}; use deploy.app:build_app")
    if model is None:
        raise ValueError("build_generation_app needs model= (a Hub id or a folder)")
    unknown = sorted(set(args) - {"params", *INGRESS_ARGS, *SERVER_ARGS, *DEPLOYMENT_ARGS})
    if unknown:
        known = sorted({"task", "model", "params", *INGRESS_ARGS, *SERVER_ARGS, *DEPLOYMENT_ARGS})
        raise ValueError(f"unknown argument(s) {unknown}; known: {', '.join(known)}")
    for name, kind in NUMERIC_ARGS.items():
        if args.get(name) is not None and not isinstance(args[name], kind):
            try:
                args[name] = kind(args[name])
            except (TypeError, ValueError):
                wanted = "an integer" if kind is int else "a number"
                raise ValueError(f"{name} must be {wanted}, got {args[name]!r}") from None
    params = dict(args.pop("params", {}) or {})
    gpus = args.pop("num_gpus", 1.0 if torch.cuda.is_available() else 0.0)
    max_sequences = args.setdefault("max_sequences", 64)
    options = generation_deployment_options(args, gpus, max_sequences)
    server = GenerationServer.options(**options).bind(model, **{k: args[k] for k in SERVER_ARGS if k in args})
    ingress = GenerationIngress.options(num_replicas=args.pop("ingress_replicas", 1))
    return ingress.bind(server, model, **{k: args[k] for k in INGRESS_ARGS if k in args}, **params)

"""The ingress every Serve application shares: a plain class with the request -> response steps, and its HTTP face.

    HTTP (FastAPI, in the Serve replica) -> Call -> Ingress.handle(route, call) -> Reply -> HTTP response
    the OpenAI router (another application) -> ServeIngress.relay(route, body, headers) -> the same handle()

`Ingress` holds what does not depend on the task: the bearer token, the in-flight limit (a stream holds its slot
until it ends), reading the body under its size limit (JSON, or raw bytes on the Hugging Face route), the model
id a request asks for, the timeout, the mapping of errors to HTTP answers, the request metrics, and the
health / info / metrics / model-list answers. An application subclasses it with its routes' handlers
(`deploy/app.py`, `deploy/generation.py`); nothing here needs Ray running, so tests call `handle()` directly with
fake model handles.

Errors follow TEI / OpenAI: `{"error": "...", "error_type": "..."}` with a 4xx status for a bad request (never
500): 422 validation, 413 body over the limit, 415 a body type the route or the task does not read, 401 without
the configured bearer token, 404 an unknown model, 408 on timeout, 503 with Retry-After when busy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.metrics import Metrics
from deploy.openai_schemas import model_list

logger = logging.getLogger(__name__)

MODEL_HEADER = "serve_multiplexed_model_id"  # Serve's own header: its proxy routes multiplexed requests on it too
BINARY_TYPES = ("application/octet-stream", "image/", "audio/")  # a body of these types is one input of raw bytes
TEXT_PROCESSOR = "text"  # the processor kind of tasks whose inputs are text (pipelines/processors)


# -- errors and request bodies --------------------------------------------------------------------------------------
class ServeError(Exception):
    """An error answered to the client with `status` and `{"error": message, "error_type": kind}`."""

    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def validation_error(message: str) -> ServeError:
    return ServeError(422, message, "validation")


class Body(BaseModel):
    """A request body: unknown fields are refused (422 naming them), not ignored."""

    model_config = ConfigDict(extra="forbid")


class PredictRequest(Body):
    """Hugging Face Inference API: one input or a list; `parameters` are the task's (`top_k`, ...)."""

    inputs: Any = Field(description="a text, a dict (QA, text pairs), a chat, raw bytes, or a list of them")
    parameters: dict[str, Any] = Field(default_factory=dict)


def parse(model: type[BaseModel], body):
    """`body` validated as `model`; 422 naming the first fields that are wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise validation_error(detail or str(e)) from None


def query_parameters(query: Mapping[str, str]) -> dict:
    """Task parameters from a query string (a binary body has no room for them), as the HF Inference API takes
    them: each value read as JSON where it is JSON (`top_k=2` -> 2, `flag=true` -> True), else kept as a string."""
    out = {}
    for name, value in query.items():
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


# -- what travels between the HTTP layer and the ingress logic -------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """An ingress replica's limits (build arguments of the same names)."""

    max_client_batch_size: int = 64  # inputs (or generated sequences) per request
    max_body_bytes: int = 2_000_000
    max_in_flight: int = 128  # requests (a stream until it ends) one ingress replica holds at once
    request_timeout_s: float = 60.0
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <api_key>`
    allow_image_urls: bool = False  # image inputs given as http(s) URLs are fetched by the server (off: SSRF)

    def __post_init__(self):
        for name in ("max_client_batch_size", "max_body_bytes", "max_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.request_timeout_s, bool) or not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be a positive number of seconds, got {self.request_timeout_s!r}")


class Call:
    """One request as the ingress logic sees it: headers (lower-case names), query parameters and a body read on
    demand under a size limit, so that auth and the in-flight check come before reading it."""

    def __init__(self, body: bytes | AsyncIterator[bytes] = b"", headers: Mapping | None = None, query=None):
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.query = dict(query or {})
        self._body = body

    @classmethod
    def json(cls, body, headers: Mapping | None = None) -> Call:
        """A JSON request (tests, the OpenAI router)."""
        return cls(json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})})

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    async def read(self, limit: int) -> bytes:
        """The body; 413 over `limit` bytes, checked before reading where the length is declared, else as it
        arrives (a body without a length is not read past the limit)."""
        size = self.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise ServeError(413, f"request body of {size} bytes is over the limit of {limit}", "payload_too_large")
        if isinstance(self._body, (bytes, bytearray)):
            chunks = [bytes(self._body)]
        else:
            chunks, total = [], 0
            async for chunk in self._body:
                total += len(chunk)
                if total > limit:
                    raise ServeError(413, f"request body over the limit of {limit} bytes", "payload_too_large")
                chunks.append(chunk)
        raw = b"".join(chunks)
        if len(raw) > limit:
            raise ServeError(413, f"request body of {len(raw)} bytes is over the limit of {limit}", "payload_too_large")
        return raw


@dataclass
class Incoming:
    """A request past the checks, for a route's handler: its body (parsed JSON, or `{"inputs": bytes,
    "parameters": from the query}`), the model it asks for ("" for the application's default) and when it began."""

    body: Any
    model_id: str
    started: float
    route: str = ""
    raw: bytes = b""  # the body as it came
    headers: dict = field(default_factory=dict)


class Stream(Protocol):
    """What a handler returns to answer with server-sent events: `events()` yields JSON-able events (a string is
    sent as it is, e.g. OpenAI's "[DONE]"); `close()` stops the work behind it (called once, however it ends)."""

    def events(self) -> AsyncIterator: ...

    def close(self) -> None: ...


@dataclass
class Reply:
    """An answer: a status and a JSON body, or `text` (metrics), or a `stream` of events."""

    status: int
    body: Any = None
    headers: dict = field(default_factory=dict)
    text: str | None = None
    stream: HeldStream | None = None

    def body_error_kind(self) -> str | None:
        """The error type of an error answer (either shape), for the metrics; None for a success."""
        if self.status < 400 or not isinstance(self.body, dict):
            return None
        kind = self.body.get("error_type")
        return kind if isinstance(kind, str) else "error"


# -- the ingress logic --------------------------------------------------------------------------------------------------
class Ingress:
    """The request -> response steps of an application, without Ray: `handle(route, call)` answers a `Reply`.

    A subclass sets `routes` ({route name: handler method name}; the handler takes an `Incoming` and returns a
    JSON-able answer or a `Stream`), `openai_routes` (the OpenAI routes it answers, for the model list) and
    calls `__init__` with its limits, metrics, served model ids and the pipeline that tells its task.
    """

    routes: dict[str, str] = {}
    bytes_routes: tuple[str, ...] = ("predict",)  # routes that take a raw binary body as one input
    openai_routes: tuple[str, ...] = ()

    def __init__(self, pipe, limits: Limits, metrics: Metrics, default: str, served=(), info: dict | None = None):
        self.pipe, self.limits, self.metrics = pipe, limits, metrics
        self.default = default  # the model id of requests that name none ("" where a request must name one)
        self.served = sorted(set(served) | ({default} if default else set()))
        self.in_flight = 0
        self.created = int(time.time())
        task = {"task": pipe.task} if pipe is not None else {}
        self.info = {**task, "served_model_name": default, **(info or {})}

    def error_body(self, message: str, kind: str) -> dict:
        """The body of an error answer (TEI's shape; the OpenAI root answers OpenAI's)."""
        return {"error": message, "error_type": kind}

    # -- answers without a body ----------------------------------------------------------------------------------
    def health(self) -> Reply:
        return Reply(200, {"status": "ok"})

    def get_info(self) -> Reply:
        return Reply(200, self.info)

    def get_metrics(self) -> Reply:
        return Reply(200, text=self.metrics.render())

    def served_models(self) -> list[dict]:
        """The models this application serves, with the task and the OpenAI routes that answer for them."""
        return [{"id": m, "task": self.pipe.task, "routes": list(self.openai_routes)} for m in self.served]

    def get_models(self) -> Reply:
        """OpenAI `GET /v1/models` for this application alone."""
        return Reply(200, model_list(self.served_models(), self.created))

    def accepts_bytes(self) -> bool:
        """Whether the task reads raw bytes (an image, an audio file): its processor is not the text one."""
        return self.pipe.processor_kind != TEXT_PROCESSOR

    # -- the request path --------------------------------------------------------------------------------------
    async def handle(self, route: str, call: Call) -> Reply:
        """Auth, the in-flight limit, the body, the model id, the route's handler under the timeout; errors as
        documented answers. A stream keeps its in-flight slot, and is counted, until it ends."""
        start = time.perf_counter()
        try:
            self._check_auth(call)
            if self.in_flight >= self.limits.max_in_flight:
                raise ServeError(
                    503,
                    f"server busy: {self.in_flight} requests in flight (the most this replica accepts); retry later",
                    "overloaded",
                    {"Retry-After": "1"},
                )
            self.in_flight += 1
            try:
                incoming = await self._incoming(route, call, start)
                handler = getattr(self, self.routes[route])
                result = await asyncio.wait_for(handler(incoming), timeout=self.limits.request_timeout_s)
            except BaseException:
                self.in_flight -= 1
                raise
        except asyncio.CancelledError:  # the client went away: Serve cancels this task and the model call
            self.metrics.request(route, 499, "cancelled", time.perf_counter() - start)
            raise
        except ServeError as e:
            self.metrics.request(route, e.status, e.kind, time.perf_counter() - start)
            return self._error(e)
        except TimeoutError:
            self.metrics.request(route, 408, "timeout", time.perf_counter() - start)
            return self._error(self._timeout())
        except Exception:  # a bug or a broken model, not a bad request: logged, answered as such
            logger.exception("internal error on %s", route)
            self.metrics.request(route, 500, "internal", time.perf_counter() - start)
            return self._error(_internal())
        if isinstance(result, Reply):  # a handler that answers its own status (the OpenAI root relaying an answer)
            self.in_flight -= 1
            self.metrics.request(route, result.status, result.body_error_kind(), time.perf_counter() - start)
            return result
        if hasattr(result, "events") and hasattr(result, "close"):
            return Reply(200, stream=HeldStream(self, route, start, result))
        self.in_flight -= 1
        self.metrics.request(route, 200, None, time.perf_counter() - start)
        return Reply(200, result)

    def _error(self, error: ServeError) -> Reply:
        return Reply(error.status, self.error_body(error.message, error.kind), headers=error.headers)

    def _check_auth(self, call: Call) -> None:
        key = self.limits.api_key
        if key and call.headers.get("authorization") != f"Bearer {key}":
            raise ServeError(401, "missing or wrong bearer token (Authorization: Bearer <key>)", "authentication")

    async def _incoming(self, route: str, call: Call, start: float) -> Incoming:
        raw = await call.read(self.limits.max_body_bytes)
        kind = call.content_type
        if kind.startswith(BINARY_TYPES):
            body = {"inputs": raw, "parameters": query_parameters(call.query)}
            if route not in self.bytes_routes:
                raise ServeError(
                    415,
                    f"a {kind} body is read only by POST /predict (and /); this route reads JSON "
                    "(Content-Type application/json)",
                    "unsupported_media_type",
                )
            if not self.accepts_bytes():
                raise ServeError(
                    415,
                    f'this application\'s task {self.pipe.task!r} reads text: send JSON ({{"inputs": ...}}, '
                    "Content-Type application/json); a raw body (application/octet-stream, image/*, audio/*) is "
                    "read by tasks whose inputs are bytes",
                    "unsupported_media_type",
                )
        else:
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise validation_error(f"the body is not valid JSON: {e}") from None
        return Incoming(body, self._model_id(call, body), start, route, raw, call.headers)

    def _model_id(self, call: Call, body) -> str:
        """The model a request asks for: the header `serve_multiplexed_model_id`, else an OpenAI body's `model`;
        404 for one this application does not serve; "" for the default model."""
        model_id = call.headers.get(MODEL_HEADER, "")
        if not model_id and isinstance(body, dict) and isinstance(body.get("model"), str):
            model_id = body["model"]
        if model_id and model_id not in self.served:
            raise ServeError(
                404, f"unknown model {model_id!r}; this application serves: {', '.join(self.served)}", "model_not_found"
            )
        return "" if model_id == self.default else model_id

    def _timeout(self) -> ServeError:
        return ServeError(408, f"the request took longer than {self.limits.request_timeout_s} s", "timeout")


def _internal() -> ServeError:
    """A bug or a broken model, not a bad request: the caller has logged it."""
    return ServeError(500, "internal error; see the server log", "internal")


class HeldStream:
    """A handler's `Stream` while it holds its in-flight slot: `events()` applies the request's timeout to each
    event and turns a failure after the first event into an error event; `close()` (once, however the stream
    ends, even if it never started) stops the work, frees the slot and counts the request: 499 until it ends well.
    """

    def __init__(self, ingress: Ingress, route: str, start: float, stream: Stream):
        self.ingress, self.route, self.start, self.stream = ingress, route, start, stream
        self.status, self.kind, self.closed = 499, "cancelled", False

    async def events(self) -> AsyncIterator:
        try:
            events = self.stream.events().__aiter__()
            while True:
                remaining = self.ingress.limits.request_timeout_s - (time.perf_counter() - self.start)
                try:
                    event = await asyncio.wait_for(events.__anext__(), timeout=max(remaining, 0))
                except StopAsyncIteration:
                    break
                yield event
            self.status, self.kind = 200, None
        except TimeoutError:
            yield self._failed(self.ingress._timeout())
        except ServeError as e:
            yield self._failed(e)
        except Exception:
            logger.exception("internal error while streaming %s", self.route)
            yield self._failed(_internal())
        finally:
            self.close()

    def _failed(self, error: ServeError) -> dict:
        self.status, self.kind = error.status, error.kind
        return self.ingress.error_body(error.message, error.kind)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.close()
        self.ingress.in_flight -= 1
        self.ingress.metrics.request(self.route, self.status, self.kind, time.perf_counter() - self.start)

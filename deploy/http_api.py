"""The HTTP face of an `Ingress` inside a Serve replica: a FastAPI app whose routes hand each request to the
replica's `core` (an `deploy.ingress.Ingress`), and the methods the OpenAI router calls through a handle.

    api = http_api("title", "description", {"predict": ("/", "/predict"), ...})

    @serve.deployment(...)
    @serve.ingress(api)
    class MyIngress(ServeIngress):
        def __init__(self, model_server, ...):
            self.core = MyIngressLogic(model_server, ...)

Every application also answers `GET /health`, `/info`, `/metrics` (Prometheus text), `/v1/models` (OpenAI's model
list, this application's models) and `/docs`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from deploy.ingress import Call, Reply

PROMETHEUS_TEXT = "text/plain; version=0.0.4"
GET_ROUTES = {"/health": "health", "/info": "get_info", "/metrics": "get_metrics", "/v1/models": "get_models"}


def sse(event) -> str:
    """One server-sent event; a string (OpenAI's "[DONE]") as it is. json.dumps escapes to ASCII: no U+2028 or
    U+0085 for a client that splits lines on them."""
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


class EventStreamResponse(StreamingResponse):
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


def to_response(reply: Reply) -> Response:
    if reply.stream is not None:
        stream = reply.stream
        return EventStreamResponse((sse(e) async for e in stream.events()), stream.close)
    if reply.text is not None:
        return PlainTextResponse(reply.text, status_code=reply.status, media_type=PROMETHEUS_TEXT)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def _core():
    """The `Ingress` of the replica serving this request."""
    return serve.get_replica_context().servable_object.core


def _post_route(route: str):
    async def endpoint(request: Request) -> Response:
        call = Call(request.stream(), request.headers, request.query_params)
        return to_response(await _core().handle(route, call))

    endpoint.__name__ = route
    return endpoint


def _get_route(answer: str):
    async def endpoint() -> Response:
        reply = getattr(_core(), answer)()
        return to_response(await reply if inspect.isawaitable(reply) else reply)

    endpoint.__name__ = answer
    return endpoint


def http_api(title: str, description: str, routes: dict[str, tuple[str, ...]]) -> FastAPI:
    """A FastAPI app with a POST route per {route name: paths} (each handled by the core's `handle(name, call)`)
    and the GET routes every application has."""
    api = FastAPI(title=title, description=description)
    for route, paths in routes.items():
        for path in paths:
            api.add_api_route(path, _post_route(route), methods=["POST"], name=f"{route} {path}")
    for path, answer in GET_ROUTES.items():
        api.add_api_route(path, _get_route(answer), methods=["GET"], name=answer)
    return api


class ServeIngress:
    """The methods of an ingress deployment that the OpenAI router (`deploy/router.py`) calls through a handle;
    the deployment class sets `self.core`."""

    core = None

    def served_models(self) -> list[dict]:
        return self.core.served_models()

    async def relay(self, route: str, body: bytes, headers: dict):
        """Answer a request the router received: first `{"status", "headers", "body"}` (body None for a stream),
        then the stream's events, if any. A router that goes away cancels this generator, and so the work."""
        reply = await self.core.handle(route, Call(body, headers))
        yield {"status": reply.status, "headers": reply.headers, "body": reply.body, "stream": reply.stream is not None}
        if reply.stream is not None:
            try:
                async for event in reply.stream.events():
                    yield event
            finally:
                reply.stream.close()

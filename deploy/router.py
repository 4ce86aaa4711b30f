"""One OpenAI-compatible root for every model a Serve config serves, as vLLM, ray.serve.llm and infinity answer:

    OpenAI(base_url="http://127.0.0.1:8000/v1").embeddings.create(model="sentence-transformers/all-MiniLM-L6-v2", ...)

    GET  /v1/models                -> every served model id, with its task, application and OpenAI routes
    POST /v1/embeddings            -> routed by the body's `model` to the application that serves it
    POST /v1/completions           -> the same
    POST /v1/chat/completions      -> the same (streams pass through as server-sent events)

The router is an application of its own at route prefix `/` (the applications keep their prefixes and their
Hugging Face / TEI routes: Serve routes each path to the longest prefix that matches). It asks each application's
ingress for the models it serves (`ServeIngress.served_models`) and relays a request, body and headers as they
came, to the ingress of the application serving its `model` (`ServeIngress.relay`), which answers exactly as under
its own prefix. Errors are in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: an unknown
`model` is 404 with code `model_not_found`, a model that does not answer the route 404 `route_not_supported`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ray import serve

from deploy import openai_schemas as oai
from deploy.common import COMMON_ARGS, LIMIT_ARGS, read_args
from deploy.http_api import http_api
from deploy.ingress import MODEL_HEADER, Incoming, Ingress, Limits, Reply, ServeError, validation_error
from deploy.metrics import Metrics

logger = logging.getLogger(__name__)

REFRESH_S = 5.0  # an unknown model asks the applications again at most this often (they may have started since)


class Relayed:
    """An application's streamed answer passed through (a `deploy.ingress.Stream`)."""

    def __init__(self, first_events: list, rest: AsyncIterator, close: Callable[[], None]):
        self.first_events, self.rest, self._close = first_events, rest, close

    async def events(self):
        for event in self.first_events:
            yield event
        async for event in self.rest:
            yield event

    def close(self) -> None:
        self._close()


class Router(Ingress):
    """The OpenAI root's request -> response steps, without Ray: `list_models(app)` gives an application's models
    ([{"id", "task", "routes"}]); `relay(app, route, body, headers)` an async iterator over its answer, first
    `{"status", "headers", "body", "stream"}`, then the stream's events, with `aclose()`."""

    routes = {route: "route" for route in oai.OPENAI_PATHS}
    bytes_routes = ()

    def __init__(
        self,
        applications: Callable[[], Awaitable[list[str]]],
        list_models: Callable[[str], Awaitable[list[dict]]],
        relay: Callable[[str, str, bytes, dict], AsyncIterator],
        limits: Limits,
    ):
        super().__init__(None, limits, Metrics(), "", info={"served_model_name": None})
        self.applications, self.list_models, self.relay = applications, list_models, relay
        self.table: dict[str, dict] = {}  # model id -> {"id", "task", "routes", "application"}
        self.refreshed = -REFRESH_S

    def error_body(self, message: str, kind: str) -> dict:
        return oai.error(message, kind, kind if kind in ("model_not_found", "route_not_supported") else None)

    async def refresh(self) -> None:
        """Ask every application for its models; one that does not answer (starting, or not ours) is skipped."""
        table = {}
        for app in await self.applications():
            try:
                models = await self.list_models(app)
            except Exception as e:  # an application without our ingress, or one still starting
                logger.info("application %r lists no models (%s)", app, type(e).__name__)
                continue
            for model in models:
                table.setdefault(model["id"], {**model, "application": app})
        self.table, self.refreshed = table, time.monotonic()
        self.served = sorted(table)

    async def models(self) -> list[dict]:
        if time.monotonic() - self.refreshed >= REFRESH_S:
            await self.refresh()
        return [self.table[m] for m in sorted(self.table)]

    async def get_models(self) -> Reply:
        """`GET /v1/models`: every model of every application, with its task, application and OpenAI routes."""
        return Reply(200, oai.model_list(await self.models(), self.created))

    def _model_id(self, call, body) -> str:  # the router checks the model itself, against every application
        return body.get("model", "") if isinstance(body, dict) and isinstance(body.get("model"), str) else ""

    async def route(self, incoming: Incoming) -> Reply | Relayed:
        route = incoming.route
        model = await self._model(incoming, route)
        headers = {k: v for k, v in incoming.headers.items() if k in ("authorization", "content-type")}
        answer = self.relay(model["application"], route, incoming.raw, {**headers, MODEL_HEADER: model["id"]})
        head = await answer.__anext__()
        if not head.get("stream"):
            return Reply(head["status"], self._openai_error(head["body"]), headers=head["headers"])
        return Relayed([], answer, lambda: _close_later(answer))

    async def _model(self, incoming: Incoming, route: str) -> dict:
        model_id = incoming.model_id
        known = await self.models()
        if not model_id:
            answering = [m["id"] for m in known if route in m["routes"]]
            if len(answering) != 1:
                raise validation_error(
                    f"model: required (the id of a served model); {oai.OPENAI_PATHS[route]} is answered by: "
                    f"{', '.join(answering) or 'no model'}"
                )
            model_id = answering[0]
        if model_id not in self.table and time.monotonic() - self.refreshed >= 0.5:
            await self.refresh()  # a model whose application started since the last look
        if model_id not in self.table:
            served = ", ".join(sorted(self.table)) or "none"
            raise ServeError(404, f"The model {model_id!r} does not exist; served models: {served}", "model_not_found")
        model = self.table[model_id]
        if route not in model["routes"]:
            raise ServeError(
                404,
                f"model {model_id!r} serves task {model['task']!r}, which {oai.OPENAI_PATHS[route]} does not answer; "
                f"its OpenAI routes: {', '.join(oai.OPENAI_PATHS[r] for r in model['routes']) or 'none'}",
                "route_not_supported",
            )
        return model

    def _openai_error(self, body):
        """An application's error answer in OpenAI's shape; any other body as it is."""
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return self.error_body(body["error"], body.get("error_type", "error"))
        return body


def _close_later(answer) -> None:
    """Stop relaying a stream (the client went away or it ended): cancels the application's generator."""
    cancel = getattr(answer, "cancel", None)
    if cancel is not None:
        cancel()


# -- the deployment -----------------------------------------------------------------------------------------------
api = http_api("ray-pipelines OpenAI root", __doc__.split("\n")[0], {r: (p,) for r, p in oai.OPENAI_PATHS.items()})


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIRouter:
    """The OpenAI root's replica: a `Router` over the Serve handles of the applications' ingresses."""

    def __init__(self, applications: list[str] | None = None, limits: dict | None = None):
        own = serve.get_replica_context().app_name

        async def names() -> list[str]:
            if applications is not None:
                return list(applications)
            status = serve.status()  # every application of this Serve instance: what one config deploys
            return sorted(name for name in status.applications if name != own)

        async def list_models(app: str) -> list[dict]:
            return await serve.get_app_handle(app).served_models.remote()

        def relay(app: str, route: str, body: bytes, headers: dict):
            return serve.get_app_handle(app).options(stream=True).relay.remote(route, body, headers)

        self.core = Router(names, list_models, relay, Limits(**(limits or {})))


def build_router(args: dict | None = None):
    """The application for `import_path: deploy.router:build_router` (route prefix `/`) in a Serve config.

    args (optional): applications (the names of the applications to route to; default every other application of
    the Serve instance) and the limits (max_client_batch_size, max_body_bytes, max_in_flight, request_timeout_s,
    api_key)."""
    schema = {"applications": list, **{k: COMMON_ARGS[k] for k in LIMIT_ARGS}}
    args = read_args("deploy.router:build_router", dict(args or {}), schema)
    applications = args.pop("applications", None)
    if applications is not None and (not applications or not all(isinstance(a, str) for a in applications)):
        raise ValueError(f"applications must be a non-empty list of application names, got {applications!r}")
    limits = {k: args.pop(k) for k in LIMIT_ARGS if k in args}
    Limits(**limits)
    return OpenAIRouter.bind(applications, limits)

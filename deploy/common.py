"""What the Serve applications share: the error convention, request reading and checking, and replica settings.

Errors follow TEI / OpenAI: `{"error": "...", "error_type": "..."}` with a 4xx status for a bad request (never
500), 413 for a body over the limit, 401 without the configured bearer token, 408 on timeout, 503 with
Retry-After when busy. Everything here is a plain function or class: the ingress deployments import it, so
Serve's pickling of those classes never needs these definitions by value.
"""

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServeError(Exception):
    """An error answered to the client with `status` and `{"error": message, "error_type": kind}`."""

    def __init__(self, status: int, message: str, kind: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "error_type": self.kind}, status_code=self.status,
                            headers=self.headers)  # fmt: skip


class Body(BaseModel):
    """A request body: unknown fields are refused (422 naming them), not ignored."""

    model_config = ConfigDict(extra="forbid")


class PredictRequest(Body):
    """Hugging Face Inference API: one input or a list; `parameters` are the task's (`top_k`, ...)."""

    inputs: Any = Field(description="a text, a dict (QA, text pairs), a chat, or a list of them")
    parameters: dict[str, Any] = Field(default_factory=dict)


def install_error_handlers(api) -> None:
    """FastAPI's own validation errors (a route's typed parameters) in our format."""

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return JSONResponse({"error": str(exc), "error_type": "validation"}, status_code=422)


def check_auth(request: Request, api_key: str | None) -> None:
    if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
        raise ServeError(401, "missing or wrong bearer token (Authorization: Bearer <key>)", "authentication")


def busy(in_flight: int) -> ServeError:
    return ServeError(503, f"server busy: {in_flight} requests in flight (the most this replica accepts); retry "
                           "later", "overloaded", {"Retry-After": "1"})  # fmt: skip


def timeout_response(timeout_s: float) -> JSONResponse:
    return JSONResponse({"error": f"the request took longer than {timeout_s} s", "error_type": "timeout"},
                        status_code=408)  # fmt: skip


def internal_response() -> JSONResponse:
    """A bug or a broken model, not a bad request: the caller has logged it."""
    return JSONResponse({"error": "internal error; see the server log", "error_type": "internal"}, status_code=500)


async def read_json(request: Request, max_body: int):
    """The JSON body; 413 over `max_body` bytes (checked before reading where the length is declared), 422 if
    it is not JSON."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_body:
        raise ServeError(413, f"request body of {size} bytes is over the limit of {max_body}", "payload_too_large")
    raw = await request.body()
    if len(raw) > max_body:
        raise ServeError(413, f"request body of {len(raw)} bytes is over the limit of {max_body}", "payload_too_large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(422, f"the body is not valid JSON: {e}", "validation") from None


def parse(model: type[BaseModel], body):
    """`body` validated as `model`; 422 naming the first fields that are wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise ServeError(422, detail or str(e), "validation") from None


def call_params(pipe, parameters: dict) -> tuple[dict, dict, dict]:
    """The pipeline's construction-time parameters overlaid with a request's `parameters`."""
    return pipe.call_parameters(**parameters)


# -- replica settings ---------------------------------------------------------------------------------------------
def autoscaling(given, max_ongoing_requests: int) -> dict | None:
    """The model deployment's `autoscaling_config`, checked against its `max_ongoing_requests`.

    Keys are Serve's (`min_replicas`, `max_replicas`, `initial_replicas`, `target_ongoing_requests`,
    `upscale_delay_s`, `downscale_delay_s`, ...). `target_ongoing_requests` defaults to half of what a replica
    holds, half a full batch of small requests: Serve's default of 2 would add replicas while every batch runs
    nearly empty. A target above `max_ongoing_requests` can never be reached, so it is refused.
    """
    if given is None:
        return None
    from ray.serve.config import AutoscalingConfig

    if not isinstance(given, dict):
        raise ValueError(f"autoscaling must be a mapping of Serve autoscaling settings, got {given!r}")
    known = sorted(getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"autoscaling: unknown setting(s) {unknown}; Serve's settings: {known}")
    config = {"target_ongoing_requests": max(1, max_ongoing_requests // 2), **given}
    if config["target_ongoing_requests"] > max_ongoing_requests:
        raise ValueError(f"autoscaling target_ongoing_requests={config['target_ongoing_requests']} can never be "
                         f"reached: a model replica holds at most max_ongoing_requests={max_ongoing_requests}")  # fmt: skip
    try:
        AutoscalingConfig(**config)
    except Exception as e:  # pydantic's error names the field and the rule
        raise ValueError(f"autoscaling: {e}") from None
    return config


def replica_options(args: dict, gpus: float, max_ongoing: int) -> dict:
    """A model deployment's `.options(...)` (pops what it uses from build args): a fixed `model_replicas` or
    `autoscaling`, fractional CPUs without a GPU (they fit 2-core machines), and `max_ongoing`."""
    options = {
        "ray_actor_options": {"num_cpus": 1.0 if gpus else 0.25, "num_gpus": gpus},
        "max_ongoing_requests": max_ongoing,
    }
    scaling = autoscaling(args.pop("autoscaling", None), max_ongoing)
    if scaling is not None and "model_replicas" in args:
        raise ValueError("give either model_replicas (a fixed count) or autoscaling (a range), not both")
    if scaling is not None:
        options["autoscaling_config"] = scaling
    else:
        options["num_replicas"] = int(args.pop("model_replicas", 1))
    return options

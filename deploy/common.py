"""How every Serve application reads its build arguments and sizes its model deployment.

    args = read_args("deploy.app:build_app", given, ENCODER_ARGS)   # unknown or misspelt keys fail here, naming them
    runtime = replica_runtime(args)                                  # the model replicas' RuntimeConfig
    options = replica_options(args, max_ongoing)                     # ModelServer.options(...)

Build arguments arrive from a config's `args:` (typed YAML) or from `serve run module:app key=value` (strings):
`read_args` converts them to the kinds in the schema, and refuses a key the application does not read, with the
closest allowed one, before Serve starts anything (a leftover never reaches a replica). Task parameters go under
`params`; runtime options (device, dtype, threads, quantization) build one `RuntimeConfig` for the replicas that
hold the model.
"""

from __future__ import annotations

import difflib
import json

from pipelines.runtime import DEVICE_DEFAULTS, RuntimeConfig, accelerator_type

# name -> kind; a kind is a type or a tuple of types; str values are converted where the kind is a number,
# a boolean or a mapping.
COMMON_ARGS: dict[str, type | tuple] = {
    "task": str,
    "model": str,  # a Hub id or a folder: the default model
    "served_model_name": str,  # the id clients name in `model` (default: `model`)
    "revision": str,
    "params": dict,  # the task's default parameters
    # the model deployment
    "num_gpus": float,
    "model_replicas": int,
    "autoscaling": dict,
    "max_ongoing_requests": int,
    # the model replicas' runtime
    "device": str,
    "dtype": str,
    "threads": int,
    "quantization": str,
    # the ingress
    "ingress_replicas": int,
    "max_client_batch_size": int,
    "max_body_bytes": int,
    "max_in_flight": int,
    "request_timeout_s": float,
    "api_key": str,
}
RUNTIME_ARGS = ("device", "dtype", "threads", "quantization")
LIMIT_ARGS = ("max_client_batch_size", "max_body_bytes", "max_in_flight", "request_timeout_s", "api_key")


def read_args(app: str, given: dict, schema: dict[str, type | tuple]) -> dict:
    """`given` checked against `schema`: every key known (else ValueError naming it, the closest allowed one and the
    allowed ones), values of the schema's kind (strings from the command line converted). None means unset."""
    if not isinstance(given, dict):
        raise ValueError(f"{app}: build arguments must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        hints = [_hint(k, schema) for k in unknown]
        raise ValueError(f"{app}: unknown argument(s) {', '.join(hints)}; allowed: {', '.join(sorted(schema))}")
    return {name: _convert(name, value, schema[name]) for name, value in given.items() if value is not None}


def _hint(key: str, schema) -> str:
    close = difflib.get_close_matches(key, schema, 1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def _convert(name: str, value, kind):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return value
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            if int in kinds:
                return int(value)
            if float in kinds:
                return float(value)
            if bool in kinds and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if dict in kinds or list in kinds:
                parsed = json.loads(value)
                if isinstance(parsed, kinds):
                    return parsed
        except ValueError:
            pass
    wanted = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
        str: "a string",
    }
    raise ValueError(f"{name} must be {' or '.join(wanted[k] for k in kinds)}, got {value!r}")


def replica_runtime(args: dict) -> RuntimeConfig:
    """The model replicas' RuntimeConfig (pops the runtime options): on the accelerator when the replica has one."""
    return RuntimeConfig.create(**{k: args.pop(k, None) for k in RUNTIME_ARGS}).on_accelerator()


def replica_gpus(args: dict) -> float:
    """GPUs per model replica (pops `num_gpus`): one when the machine building the application has an accelerator."""
    return float(args.pop("num_gpus", 1.0 if accelerator_type() != "cpu" else 0.0))


def request_batch_tokens(args: dict, gpus: float) -> int:
    """Tokens of concurrent requests gathered into one model call (pops `max_batch_tokens`): DEVICE_DEFAULTS'."""
    default = DEVICE_DEFAULTS["cuda" if gpus else "cpu"].request_batch_tokens
    return int(args.pop("max_batch_tokens", default))


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
        raise ValueError(
            f"autoscaling target_ongoing_requests={config['target_ongoing_requests']} can never be "
            f"reached: a model replica holds at most max_ongoing_requests={max_ongoing_requests}"
        )
    try:
        AutoscalingConfig(**config)
    except Exception as e:  # pydantic's error names the field and the rule
        raise ValueError(f"autoscaling: {e}") from None
    return config


def replica_options(args: dict, gpus: float, max_ongoing: int) -> dict:
    """A model deployment's `.options(...)` (pops what it uses from build args): a fixed `model_replicas` or
    `autoscaling`, fractional CPUs without a GPU (they fit 2-core machines), and `max_ongoing`."""
    if isinstance(max_ongoing, bool) or not isinstance(max_ongoing, int) or max_ongoing < 1:
        raise ValueError(f"max_ongoing_requests must be a positive integer, got {max_ongoing!r}")
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

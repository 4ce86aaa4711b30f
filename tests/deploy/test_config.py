"""Serve settings checked without starting Serve: batches can fill, autoscaling agrees with the replica limit,
multiplexed model tables are whole."""

import pytest

from deploy.app import SMALL_REQUEST_TOKENS, build_app, model_deployment_options, model_ongoing_requests


def test_default_holds_a_full_batch_of_small_requests():
    """Serve's defaults (5 ongoing, batches of 10) never fill a batch; ours is sized from the token budget."""
    assert SMALL_REQUEST_TOKENS == 32  # one short sentence with its special tokens
    assert model_ongoing_requests(4096) == 128  # 4096 / 32 requests of 32 tokens fill the batch
    assert model_ongoing_requests(16384) == 512  # 16384 / 32
    assert model_ongoing_requests(64) == 8  # never fewer than 8


def test_a_limit_that_cannot_fill_a_batch_is_refused_naming_both_numbers():
    """A max_ongoing_requests too small to fill a batch is refused naming both numbers; a large enough one is kept."""
    with pytest.raises(ValueError, match=r"max_ongoing_requests=5 cannot fill a batch of max_batch_tokens=4096 \(128 "):
        model_ongoing_requests(4096, 5)
    assert model_ongoing_requests(4096, 200) == 200
    with pytest.raises(ValueError, match="positive integer"):
        model_ongoing_requests(4096, "many")


def test_autoscaling_defaults_to_half_a_full_batch_and_replaces_a_fixed_count():
    """Serve's default target of 2 ongoing requests would add replicas while batches run nearly empty."""
    options = model_deployment_options({"autoscaling": {"min_replicas": 1, "max_replicas": 4}}, 0, 4096)
    # target: half of the 128 ongoing requests a replica holds at 4096 tokens (see the test above)
    assert options["autoscaling_config"] == {"target_ongoing_requests": 64, "min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 128
    assert model_deployment_options({"model_replicas": 2}, 0, 4096)["num_replicas"] == 2
    given = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 10, "upscale_delay_s": 1}
    assert model_deployment_options({"autoscaling": given}, 0, 4096)["autoscaling_config"] == given


@pytest.mark.parametrize(
    "args, message",
    [
        (
            {"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 500}},
            r"target_ongoing_requests=500 can never be reached: a model replica holds at most max_ongoing_requests=128",
        ),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, r"max_replicas \(1\) must be greater than or equal"),
        ({"autoscaling": {"max_replicas": 2}, "model_replicas": 2}, "either model_replicas .* or autoscaling"),
        (
            {"autoscaling": {"max_replica": 2}},
            r"unknown setting\(s\) \['max_replica'\]; Serve's settings: .*'max_replicas'",
        ),
        ({"autoscaling": 4}, "autoscaling must be a mapping"),
    ],
)
def test_bad_autoscaling_settings_are_refused_before_serve_starts(args, message):
    """Unreachable targets, inverted ranges, a fixed count beside autoscaling and unknown keys fail at build time."""
    with pytest.raises(ValueError, match=message):
        model_deployment_options(args, 0, 4096)


def test_multiplexed_models_must_include_the_default():
    """A models table without the default model, or one that is not a mapping, is refused at build time."""
    with pytest.raises(ValueError, match=r"model='c' \(the default\) must be one of models: \['a', 'b'\]"):
        build_app({"task": "text-classification", "model": "c", "models": {"a": "x", "b": "y"}})
    with pytest.raises(ValueError, match="models must be a mapping, got \[.c.\]"):
        build_app({"task": "text-classification", "model": "c", "models": ["c"]})


def test_the_shipped_serve_config_is_valid_and_builds():
    """`serve run deploy/embeddings.yaml` must pass Serve's own schema and build_app's checks."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "embeddings.yaml").read_text())
    ServeDeploySchema(**config)
    assert config["http_options"]["host"] == "127.0.0.1"
    *apps, root = config["applications"]
    for app in apps:
        assert app["import_path"] == "deploy.app:build_app" and build_app(app["args"]) is not None
    assert (root["import_path"], root["route_prefix"]) == ("deploy.router:build_router", "/")


def test_text_generation_gets_the_generation_application(checkpoint):
    """build_app(task=text-generation) hands over to deploy.generation (its ingress streams OpenAI routes)."""
    app = build_app({"task": "text-generation", "model": str(checkpoint("gpt2", "causal-lm")), "max_sequences": 8})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"task": "text-generation", "model": "x", "max_batch_tokns": 8})

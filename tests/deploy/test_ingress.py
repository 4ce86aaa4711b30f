"""The Serve ingresses' request -> response steps without Ray: the plain classes of deploy/ingress.py, deploy/app.py,
deploy/generation.py and deploy/router.py called with `Call`s, their model calls answered in process."""

import asyncio
import json

import pytest
import torch

from deploy.app import EncoderIngress
from deploy.generation import GenerationIngress, GenerationServer
from deploy.ingress import MODEL_HEADER, Call, Limits
from deploy.router import Router
from pipelines import pipeline
from tests.checkpoints import PROMPTS, SENTENCES
from tests.processors import bytes_task


def run(coroutine):
    return asyncio.run(coroutine)


def _encoder(task, models: dict, default: str, **limits) -> EncoderIngress:
    """An EncoderIngress over `models` ({id: folder}) whose forward runs the weighted pipelines in process."""
    weighted = {m: pipeline(task, path) for m, path in models.items()}
    weightless = {m: pipeline(task, path, load_weights=False) for m, path in models.items()}

    async def forward(features, params, tokens, model_id):
        return weighted[model_id or default].run_model(features, params=params), 1, 0.0

    served = list(models) if len(models) > 1 else ()
    return EncoderIngress(lambda m: weightless[m or default], forward, Limits(**limits), default, served, {})


def _json(reply):
    assert reply.stream is None and reply.text is None
    return reply.status, reply.body


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return _encoder("sentence-embeddings", {"mini": str(checkpoint("bert"))}, "mini", max_client_batch_size=4)


def test_the_hf_route_answers_what_the_pipeline_answers(embedder, checkpoint):
    """POST /predict through the plain class gives the in-process pipeline's vectors; one input gives one answer."""
    status, body = _json(run(embedder.handle("predict", Call.json({"inputs": SENTENCES[:3]}))))
    expected = pipeline("sentence-embeddings", checkpoint("bert"))(SENTENCES[:3])
    assert status == 200
    torch.testing.assert_close(torch.tensor(body), torch.tensor(expected), atol=1e-6, rtol=0)
    status, one = _json(run(embedder.handle("predict", Call.json({"inputs": SENTENCES[0]}))))
    torch.testing.assert_close(torch.tensor(one), torch.tensor(expected[0]), atol=1e-6, rtol=0)


def test_openai_embeddings_name_the_served_model_and_count_tokens(embedder, checkpoint):
    """/v1/embeddings answers with the served model id and the tokens the model read (the tokenizer's count)."""
    status, body = _json(run(embedder.handle("embeddings", Call.json({"input": SENTENCES[:2], "model": "mini"}))))
    tokenizer = pipeline("sentence-embeddings", checkpoint("bert"), load_weights=False)
    tokens = sum(len(tokenizer.preprocess(s)["input_ids"]) for s in SENTENCES[:2])
    assert status == 200 and body["model"] == "mini" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize(
    "route, call, status, kind, words",
    [
        ("embeddings", Call.json({"input": "x", "model": "gpt-4"}), 404, "model_not_found", "'gpt-4'; this app"),
        ("predict", Call.json({"inputs": "x"}, {MODEL_HEADER: "other"}), 404, "model_not_found", "serves: mini"),
        ("predict", Call.json({"inputs": ["x"] * 5}), 422, "validation", "5 items, more than the maximum batch of 4"),
        ("predict", Call(b"{bad", {"content-type": "application/json"}), 422, "validation", "not valid JSON"),
        ("predict", Call(b"x" * 10, {"content-length": "3000000"}), 413, "payload_too_large", "3000000 bytes"),
        ("predict", Call(b"\x89PNG", {"content-type": "image/png"}), 415, "unsupported_media_type", "reads text"),
        ("embed", Call(b"\x89PNG", {"content-type": "image/png"}), 415, "unsupported_media_type", "/predict"),
        ("predict", Call.json({"inputs": "x", "parameters": {"top_k": 1}}), 422, "validation", "top_k"),
    ],
)
def test_bad_requests_get_their_documented_answer(embedder, route, call, status, kind, words):
    """Each bad request gets its 4xx with an error that names the problem; none reaches the model."""
    got, body = _json(run(embedder.handle(route, call)))
    assert (got, body["error_type"]) == (status, kind) and words in body["error"], body


def test_auth_and_the_in_flight_limit_come_before_the_body(checkpoint):
    """Without the bearer token: 401; with every slot taken: 503 with Retry-After; the counts are freed after."""
    ingress = _encoder("text-classification", {"c": str(checkpoint("bert", "sequence-classification"))}, "c")
    ingress.limits = Limits(api_key="k", max_in_flight=1)
    assert run(ingress.handle("predict", Call.json({"inputs": "x"}))).status == 401
    ingress.in_flight = 1
    reply = run(ingress.handle("predict", Call.json({"inputs": "x"}, {"authorization": "Bearer k"})))
    assert reply.status == 503 and reply.headers == {"Retry-After": "1"}
    ingress.in_flight = 0
    assert run(ingress.handle("predict", Call.json({"inputs": "x"}, {"authorization": "Bearer k"}))).status == 200
    assert ingress.in_flight == 0
    assert 'pipelines_requests_total{route="predict",status="503"} 1' in ingress.get_metrics().text


def test_a_raw_bytes_body_is_one_input_with_parameters_from_the_query(tmp_path):
    """A task whose inputs are bytes reads an application/octet-stream (or image/*, audio/*) body as one input,
    its parameters from the query string; the answer equals the computation from the checkpoint's tensors."""
    bytes_task.register()
    folder = bytes_task.make_checkpoint(tmp_path / "bytes")
    ingress = _encoder("byte-stats", {"b": str(folder)}, "b")
    data = b"RIFF$\x00\x00\x00WAVEfmt "
    status, body = _json(run(ingress.handle("predict", Call(data, {"content-type": "audio/wav"}))))
    want = bytes_task.reference(folder, data)
    assert status == 200 and (body["length"], body["label"]) == (want["length"], want["label"])
    assert body["score"] == pytest.approx(want["score"], abs=1e-5)
    call = Call(data, {"content-type": "application/octet-stream"}, query={"top_k": "2"})
    status, ranked = _json(run(ingress.handle("predict", call)))
    assert status == 200 and [r["label"] for r in ranked][0] == want["label"] and len(ranked) == 2
    call = Call(data, {"content-type": "application/octet-stream"}, query={"top_n": "2"})
    status, body = _json(run(ingress.handle("predict", call)))
    assert status == 422 and "allowed: top_k" in body["error"]


# -- text generation ------------------------------------------------------------------------------------------------
class LocalStream:
    """GenerationServer.generate run in this process, shaped as Serve's response generator."""

    def __init__(self, server, prompts, params):
        self.events = server.generate(prompts, params)

    def __anext__(self):
        return self.events.__anext__()

    def cancel(self):
        asyncio.get_running_loop().create_task(self.events.aclose())


@pytest.fixture(scope="module")
def generator(checkpoint):
    from pipelines.runtime import RuntimeConfig

    path = str(checkpoint("gpt2", "causal-lm"))
    server = GenerationServer.func_or_class(path, RuntimeConfig(batch_size=8))
    pipe = pipeline("text-generation", path, load_weights=False)
    ingress = GenerationIngress(pipe, lambda p, f: LocalStream(server, p, f), Limits(), "gpt2", {})
    return ingress, path


async def _collect(reply):
    return [event async for event in reply.stream.events()]


def test_completions_equal_greedy_decoding_in_process(generator):
    """/v1/completions with temperature 0 gives the pipeline's greedy continuation, plain and streamed."""
    ingress, path = generator
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "model": "gpt2"}
    status, answer = _json(run(ingress.handle("completions", Call.json(body))))
    local = pipeline("text-generation", path)(PROMPTS[0], max_new_tokens=6, do_sample=False, return_full_text=False)
    assert status == 200 and answer["choices"][0]["text"] == local[0]["generated_text"]
    assert answer["model"] == "gpt2" and answer["usage"]["completion_tokens"] == 6

    async def streamed():
        return await _collect(await ingress.handle("completions", Call.json({**body, "stream": True})))

    events = run(streamed())
    assert events[-1] == "[DONE]" and ingress.in_flight == 0
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == local[0]["generated_text"]


def test_generation_refuses_another_model_and_a_prompt_over_the_context(generator):
    """A `model` the application does not serve is 404 model_not_found; max_tokens over the context is 422."""
    ingress, _ = generator
    status, body = _json(run(ingress.handle("completions", Call.json({"prompt": "hi", "model": "gpt-4o"}))))
    assert (status, body["error_type"]) == (404, "model_not_found")
    status, body = _json(run(ingress.handle("completions", Call.json({"prompt": "hi", "max_tokens": 500}))))
    assert status == 422 and "max_tokens" in body["error"]


# -- the OpenAI root ------------------------------------------------------------------------------------------------
class FakeApps:
    """Two applications' ingresses as the router sees them through Serve handles."""

    models = {
        "emb": [{"id": "mini", "task": "sentence-embeddings", "routes": ["embeddings"]}],
        "gen": [{"id": "gpt2", "task": "text-generation", "routes": ["completions", "chat_completions"]}],
        "clf": [{"id": "sst2", "task": "text-classification", "routes": []}],
    }

    def __init__(self):
        self.relayed = []

    async def names(self):
        return sorted(self.models)

    async def list_models(self, app):
        return self.models[app]

    def relay(self, app, route, body, headers):
        self.relayed.append((app, route, json.loads(body), headers))

        async def answer():
            if json.loads(body).get("stream"):
                yield {"status": 200, "headers": {}, "body": None, "stream": True}
                yield {"choices": [{"text": "hi"}]}
                yield "[DONE]"
            elif route == "completions" and not json.loads(body).get("prompt"):
                yield {"status": 422, "headers": {}, "body": {"error": "prompt: empty", "error_type": "validation"}}
            else:
                yield {"status": 200, "headers": {}, "body": {"app": app}, "stream": False}

        return answer()


def test_the_router_lists_every_model_and_routes_by_model():
    """GET /v1/models lists each application's models with task and application; a request goes to the
    application serving its `model`, with the model id in Serve's multiplexing header."""
    apps = FakeApps()
    router = Router(apps.names, apps.list_models, apps.relay, Limits())
    listing = run(router.get_models()).body
    assert [(m["id"], m["task"], m["application"]) for m in listing["data"]] == [
        ("gpt2", "text-generation", "gen"),
        ("mini", "sentence-embeddings", "emb"),
        ("sst2", "text-classification", "clf"),
    ]
    status, body = _json(run(router.handle("embeddings", Call.json({"model": "mini", "input": "x"}))))
    assert (status, body) == (200, {"app": "emb"}) and apps.relayed[-1][3][MODEL_HEADER] == "mini"
    status, body = _json(run(router.handle("completions", Call.json({"prompt": "x"}))))  # one model answers it
    assert (status, body) == (200, {"app": "gen"})

    async def streamed():
        return await _collect(await router.handle("completions", Call.json({"model": "gpt2", "stream": True})))

    assert run(streamed()) == [{"choices": [{"text": "hi"}]}, "[DONE]"] and router.in_flight == 0


@pytest.mark.parametrize(
    "route, body, status, code, words",
    [
        ("embeddings", {"model": "text-embedding-3-small", "input": "x"}, 404, "model_not_found", "served models"),
        ("embeddings", {"model": "sst2", "input": "x"}, 404, "route_not_supported", "text-classification"),
        ("chat_completions", {"model": "mini", "messages": []}, 404, "route_not_supported", "/v1/embeddings"),
        ("completions", {"model": "gpt2", "prompt": ""}, 422, None, "prompt: empty"),
    ],
)
def test_router_errors_have_openai_shape(route, body, status, code, words):
    """Unknown models and models that do not answer the route get OpenAI's error shape with its code; an
    application's own error passes through in the same shape."""
    apps = FakeApps()
    router = Router(apps.names, apps.list_models, apps.relay, Limits())
    got, answer = _json(run(router.handle(route, Call.json(body))))
    assert got == status and answer["error"]["code"] == code and words in answer["error"]["message"], answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}

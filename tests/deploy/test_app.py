"""The Serve application on real Ray Serve over loopback (one instance for the module, stopped at the end):
routes answer exactly what the in-process pipeline answers; malformed and hostile requests get documented
4xx answers and never 500; overload, timeouts, auth and body limits; dynamic batching shows in /metrics;
multiplexed models with LRU; a model replica killed under load; a client that hangs up cancels its work;
autoscaling adds a replica under load."""

import base64
import functools
import http.server
import io
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
import torch
from ray import serve
from tokenizers import Tokenizer

from deploy.app import build_app
from deploy.router import build_router
from pipelines import pipeline
from tests.checkpoints import SENTENCES
from tests.image_checkpoints import make_image_checkpoint, random_image
from tests.test_clip_siglip import make_clip_checkpoint

QA_MODEL = Path(__file__).resolve().parents[1] / "data" / "qa_reference" / "bert"


@pytest.fixture(scope="module")
def server(checkpoint):
    """Serve on 127.0.0.1 with several applications side by side; yields {name: base URL, ...paths}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        emb, clf = checkpoint("bert"), checkpoint("bert", "sequence-classification")
        images = Path(tempfile.mkdtemp(prefix="serve-images-"))
        vit = make_image_checkpoint(images / "vit", "vit", "image-classification")
        clip = make_clip_checkpoint(images / "clip")
        classifiers = {
            family: str(checkpoint(family, "sequence-classification")) for family in ("bert", "roberta", "distilbert")
        }
        scaling = {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 0,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 1,
        }
        apps = {
            "emb": {
                "task": "sentence-embeddings",
                "model": str(emb),
                "served_model_name": "mini",
                "batch_wait_s": 0.05,
                "max_client_batch_size": 64,
                "max_body_bytes": 200_000,
            },
            "clf": {"task": "text-classification", "model": str(clf)},
            "qa": {"task": "question-answering", "model": str(QA_MODEL)},
            "busy": {"task": "text-classification", "model": str(clf), "batch_wait_s": 0.5, "max_in_flight": 2},
            "slow": {"task": "text-classification", "model": str(clf), "batch_wait_s": 1.0, "request_timeout_s": 0.2},
            "auth": {"task": "text-classification", "model": str(clf), "api_key": "s3cret"},
            "multi": {
                "task": "text-classification",
                "model": "bert",
                "models": classifiers,
                "max_models_per_replica": 2,
            },
            "pair": {"task": "text-classification", "model": str(clf), "model_replicas": 2},
            "wait": {"task": "text-classification", "model": str(clf), "batch_wait_s": 2.0},
            "auto": {"task": "text-classification", "model": str(clf), "batch_wait_s": 0.2, "autoscaling": scaling},
            "img": {"task": "image-classification", "model": str(vit), "max_body_bytes": 300_000},
            "imgurl": {
                "task": "image-classification",
                "model": str(vit),
                "allow_image_urls": True,
                "max_body_bytes": 300_000,
            },
            "zs": {"task": "zero-shot-image-classification", "model": str(clip)},
            "imgemb": {"task": "image-embeddings", "model": str(clip), "served_model_name": "clip-images"},
        }
        targets = [serve.RunTarget(build_app(args), name=name, route_prefix=f"/{name}") for name, args in apps.items()]
        targets.append(serve.RunTarget(build_router(), name="openai", route_prefix="/"))  # every app above
        serve.run_many(targets)
        paths = {"emb": emb, "clf": clf, "vit": vit, "clip": clip, **classifiers}
        yield {name: f"http://127.0.0.1:{port}/{name}" for name in apps} | {
            "paths": paths,
            "root": f"http://127.0.0.1:{port}",
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url, body=None, **kw):
    return requests.post(url, json=body, timeout=60, **kw) if "data" not in kw else requests.post(url, timeout=60, **kw)


def test_hf_route_equals_in_process(server):
    """POST /predict answers what the in-process pipeline answers: embeddings within 1e-6, classifier labels and scores with top_k."""
    paths = server["paths"]
    r = _post(server["emb"] + "/predict", {"inputs": SENTENCES})
    assert r.status_code == 200
    expected = pipeline("sentence-embeddings", paths["emb"])(SENTENCES)
    torch.testing.assert_close(torch.tensor(r.json()), torch.tensor(expected), atol=1e-6, rtol=0)
    r = _post(server["clf"], {"inputs": SENTENCES[0], "parameters": {"top_k": 2}})
    ref = pipeline("text-classification", paths["clf"])(SENTENCES[0], top_k=2)
    assert [a["label"] for a in r.json()] == [a["label"] for a in ref]
    assert [a["score"] for a in r.json()] == pytest.approx([a["score"] for a in ref], abs=1e-6)


def test_question_answering_dict_inputs(server):
    """Question answering takes dict inputs over HTTP and answers the pipeline's spans and scores, doc_stride passed through."""
    inputs = [
        {"question": "Where does John live?", "context": "My name is John and I live in New York. " * 30},
        {"question": "What is my name?", "context": "My name is John."},
    ]
    r = _post(server["qa"] + "/predict", {"inputs": inputs, "parameters": {"doc_stride": 32}})
    assert r.status_code == 200, r.text
    expected = pipeline("question-answering", QA_MODEL)(inputs, doc_stride=32)
    for got, ref in zip(r.json(), expected):
        assert (got["answer"], got["start"], got["end"]) == (ref["answer"], ref["start"], ref["end"])
        assert got["score"] == pytest.approx(ref["score"], abs=1e-6)


def test_openai_embeddings_and_tei_embed(server):
    """/v1/embeddings (float and base64) and TEI /embed give the pipeline's vectors; usage counts the tokenizer's tokens."""
    path = server["paths"]["emb"]
    expected = pipeline("sentence-embeddings", path)(SENTENCES[:3])
    r = _post(server["emb"] + "/v1/embeddings", {"input": SENTENCES[:3], "model": "mini"})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "list" and body["model"] == "mini"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    torch.testing.assert_close(
        torch.tensor([d["embedding"] for d in body["data"]]), torch.tensor(expected), atol=1e-6, rtol=0
    )
    tokens = sum(
        len(pipeline("sentence-embeddings", path, load_weights=False).preprocess(t)["input_ids"]) for t in SENTENCES[:3]
    )
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    r = _post(server["emb"] + "/v1/embeddings", {"input": SENTENCES[0], "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(vector, expected[0], atol=1e-6)
    r = _post(server["emb"] + "/embed", {"inputs": SENTENCES[:3]})
    torch.testing.assert_close(torch.tensor(r.json()), torch.tensor(expected), atol=1e-6, rtol=0)


def test_health_info_and_docs(server):
    """GET /health, /info (task, max input length), /docs and the OpenAPI paths answer."""
    assert requests.get(server["emb"] + "/health", timeout=10).json() == {"status": "ok"}
    info = requests.get(server["clf"] + "/info", timeout=10).json()
    assert info["task"] == "text-classification" and info["max_input_length"] > 0
    assert requests.get(server["clf"] + "/docs", timeout=10).status_code == 200
    assert "/v1/embeddings" in requests.get(server["emb"] + "/openapi.json", timeout=10).json()["paths"]


LONG = "word " * 5000
MALFORMED = [
    # (route, body or raw bytes, expected status)
    ("/predict", b"{bad json", 422),
    ("/predict", b"", 422),
    ("/predict", b"null", 422),
    ("/predict", b"[]", 422),
    ("/predict", b'"just a string"', 422),
    ("/predict", b"\xff\xfe\x00garbage", 422),
    ("/predict", {}, 422),
    ("/predict", {"inputs": None}, 422),
    ("/predict", {"inputs": []}, 422),
    ("/predict", {"inputs": [None]}, 422),
    ("/predict", {"inputs": 42}, 422),
    ("/predict", {"inputs": [1, 2, 3]}, 422),
    ("/predict", {"inputs": [["nested", ["junk"]]]}, 422),
    ("/predict", {"inputs": {"no": "text key"}}, 422),
    ("/predict", {"inputs": "ok", "parameters": "not a dict"}, 422),
    ("/predict", {"inputs": "ok", "parameters": {"top_k": "three"}}, 422),
    ("/predict", {"inputs": "ok", "parameters": {"unknown_option": 1}}, 422),
    ("/predict", {"inputs": "ok", "extra_field": 1}, 422),
    ("/predict", {"inputs": ["x"] * 65}, 422),
    ("/predict", {"inputs": ["x"] * 10_000}, 422),
    ("/predict", {"inputs": "x" * 300_000}, 413),
    ("/v1/embeddings", {}, 422),
    ("/v1/embeddings", {"input": None}, 422),
    ("/v1/embeddings", {"input": []}, 422),
    ("/v1/embeddings", {"input": [1, 2]}, 422),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422),
    ("/v1/embeddings", {"input": [["a"]]}, 422),
    ("/embed", {"inputs": LONG, "truncate": False}, 422),
    ("/embed", {"inputs": "x", "normalize": False}, 422),
    ("/embed", {"inputs": {"a": 1}}, 422),
    ("/embed", {"inputs": "x", "truncate": "maybe"}, 422),
]


@pytest.mark.parametrize("route, body, status", MALFORMED, ids=[f"{i}-{r}" for i, (r, _, _) in enumerate(MALFORMED)])
def test_malformed_requests_get_documented_4xx(server, route, body, status):
    """Each malformed body gets its documented 4xx (never 500) with an error naming the problem."""
    kw = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {}
    r = _post(server["emb"] + route, None if isinstance(body, bytes) else body, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] in ("validation", "payload_too_large") and r.json()["error"]


def test_the_server_keeps_serving_after_hostile_requests(server):
    """Empty, NUL, huge-emoji and bidi inputs are answered, and the server answers the next request."""
    weird = ["", " ", "\u0000", "🙂" * 500, "e\u0301" * 100, "\ud7ff", "a\u202eb", LONG]
    r = _post(server["emb"] + "/predict", {"inputs": weird})
    assert r.status_code == 200 and len(r.json()) == len(weird)
    assert _post(server["emb"] + "/predict", {"inputs": "still fine"}).status_code == 200


def test_too_long_input_names_the_counts(server):
    """truncate=false on an over-long input is 422 naming its index, its token count and the maximum; truncate defaults to true."""
    r = _post(server["emb"] + "/embed", {"inputs": ["short", LONG], "truncate": False})
    # the count of the checkpoint's own tokenizer.json (the tokenizers library, no truncation): 5000 x "word" + 2
    tokens = len(Tokenizer.from_file(str(server["paths"]["emb"] / "tokenizer.json")).encode(LONG).ids)
    assert (
        tokens == 5002
        and r.status_code == 422
        and f"inputs[1]: {tokens} tokens" in r.json()["error"]
        and "maximum" in r.json()["error"]
    )
    assert _post(server["emb"] + "/embed", {"inputs": LONG}).status_code == 200  # truncate defaults to true


@pytest.mark.slow
def test_overload_answers_503_with_retry_after_never_500(server):
    """Past max_in_flight, requests get 503 with Retry-After while the others get 200; never a 500."""
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _post(server["busy"], {"inputs": f"text {i}"}), range(12)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 503)


def test_a_raw_binary_body_to_a_text_task_is_415_naming_what_it_reads(server):
    """An image/png body reaches the ingress as bytes; a text task answers 415 saying it reads JSON text."""
    r = requests.post(
        server["clf"] + "/predict", data=b"\x89PNG\r\n", headers={"content-type": "image/png"}, timeout=30
    )
    assert (
        r.status_code == 415
        and r.json()["error_type"] == "unsupported_media_type"
        and "reads text" in r.json()["error"]
    )


@pytest.mark.slow
def test_timeout_answers_408(server):
    """A request past request_timeout_s gets 408 with error_type timeout."""
    r = _post(server["slow"], {"inputs": "hello"})
    assert r.status_code == 408 and r.json()["error_type"] == "timeout"


def test_bearer_token(server):
    """With api_key set, a missing or wrong bearer token is 401 and the right one is served."""
    assert _post(server["auth"], {"inputs": "hello"}).status_code == 401
    assert _post(server["auth"], {"inputs": "hello"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(server["auth"], {"inputs": "hello"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.slow
def test_concurrent_requests_are_batched_together(server):
    """Sixteen concurrent requests within the 50 ms batch window: the model served some of them together."""
    with ThreadPoolExecutor(16) as pool:
        assert all(
            r.status_code == 200 for r in pool.map(lambda i: _post(server["emb"], {"inputs": f"t {i}"}), range(16))
        )
    metrics = requests.get(server["emb"] + "/metrics", timeout=10).text
    counts = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")
    }
    singles = counts['pipelines_model_batch_requests_bucket{le="1"}']
    assert counts["pipelines_model_batch_requests_count"] > singles, metrics
    assert 'pipelines_requests_total{route="predict",status="422"}' in metrics


def _model_stats(app: str) -> dict:
    return serve.get_deployment_handle("ModelServer", app_name=app).get_stats.remote().result()


def _replica_actors(app: str) -> set[str]:
    prefix = f"SERVE_REPLICA::{app}#ModelServer#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def _running_replicas(app: str) -> int:
    deployment = serve.status().applications[app].deployments["ModelServer"]
    return deployment.replica_states.get("RUNNING", 0)


def test_multiplexed_models_selected_by_header_with_lru(server):
    """Three classifiers in one deployment, two held per replica: each answer is its own model's, and the
    replica loads and evicts in least-recently-used order."""
    header = "serve_multiplexed_model_id"
    order = [None, "roberta", "bert", "distilbert", "roberta"]
    for model_id in order:
        r = _post(server["multi"], {"inputs": SENTENCES[:3]}, headers={header: model_id} if model_id else {})
        assert r.status_code == 200, r.text
        expected = pipeline("text-classification", server["paths"][model_id or "bert"])(SENTENCES[:3])
        assert [a["label"] for a in r.json()] == [a["label"] for a in expected]
        assert [a["score"] for a in r.json()] == pytest.approx([a["score"] for a in expected], abs=1e-6)
    # bert (default) and roberta loaded; bert used again; distilbert evicts roberta; roberta evicts bert
    assert _model_stats("multi")["loads"] == ["bert", "roberta", "distilbert", "roberta"]
    r = _post(server["multi"], {"inputs": "x"}, headers={header: "gpt9"})
    assert r.status_code == 404 and r.json() == {
        "error": "unknown model 'gpt9'; this application serves: bert, distilbert, roberta",
        "error_type": "model_not_found",
    }
    assert requests.get(server["multi"] + "/info", timeout=10).json()["models"] == ["bert", "distilbert", "roberta"]


@pytest.mark.slow
def test_killing_one_model_replica_of_two_under_load(server):
    """A steady load while one of two model replicas is killed: at most 1% of requests fail (the ingress
    retries a request whose replica died) and Serve runs two healthy replicas again within 60 s."""
    statuses, stop = [], threading.Event()

    def client(i):
        while not stop.is_set():
            try:
                statuses.append(_post(server["pair"], {"inputs": f"steady load {i}"}).status_code)
            except requests.RequestException:
                statuses.append(-1)
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        served_before = len(statuses)
        name = sorted(_replica_actors("pair"))[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        while time.monotonic() - killed_at < 60:  # healthy: two running replicas, the killed one replaced
            time.sleep(0.5)
            replicas = _replica_actors("pair")
            if name not in replicas and len(replicas) == 2 and _running_replicas("pair") == 2:
                break
        recovered_s = time.monotonic() - killed_at
        time.sleep(2)  # and it keeps serving on both
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = sum(s != 200 for s in statuses)
    print(f"replica kill: {failed} of {len(statuses)} requests failed; two replicas again after {recovered_s:.1f} s")
    assert served_before > 20 and len(statuses) > served_before + 20, (served_before, len(statuses))
    assert failed <= 0.01 * len(statuses), (failed, len(statuses), sorted(set(statuses)))
    assert recovered_s < 60 and _running_replicas("pair") == 2 and name not in _replica_actors("pair")


@pytest.mark.slow
def test_a_client_that_hangs_up_cancels_its_model_work(server):
    """A request waiting 2 s for its batch is abandoned by its client after 0.5 s: Serve cancels it, the model
    replica never runs it, and the ingress counts it as cancelled (499); a request that stays is served."""
    before = _model_stats("wait")["requests"]
    with pytest.raises(requests.Timeout):
        requests.post(server["wait"], json={"inputs": "never mind"}, timeout=0.5)
    time.sleep(3)
    assert _model_stats("wait")["requests"] == before
    metrics = requests.get(server["wait"] + "/metrics", timeout=10).text
    assert 'pipelines_requests_total{route="predict",status="499"} 1' in metrics
    assert 'pipelines_errors_total{type="cancelled"} 1' in metrics
    assert _post(server["wait"], {"inputs": "i will wait"}).status_code == 200
    assert _model_stats("wait")["requests"] == before + 1


@pytest.mark.slow
def test_autoscaling_adds_a_model_replica_under_load(server):
    """More ongoing requests than the target of 2 per replica: Serve scales the model deployment from 1 to 2."""
    assert _running_replicas("auto") == 1
    stop = threading.Event()

    def client(i):
        while not stop.is_set():
            _post(server["auto"], {"inputs": f"load {i}"})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 45
        while _running_replicas("auto") < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert _running_replicas("auto") == 2


def test_one_openai_root_lists_and_routes_every_model(server):
    """`OpenAI(base_url=<root>/v1)`: the model list holds every application's models with their task; embeddings
    go to the application serving `model` and equal the in-process pipeline; an unknown model is NotFoundError
    with code model_not_found, at the root and under an application's own prefix alike."""
    import openai

    client = openai.OpenAI(base_url=server["root"] + "/v1", api_key="unused", max_retries=0)
    listed = {m.id: m.task for m in client.models.list().data}
    assert listed["mini"] == "sentence-embeddings" and listed["roberta"] == "text-classification"
    assert (
        listed[str(server["paths"]["clf"])] == "text-classification" and listed[str(QA_MODEL)] == "question-answering"
    )
    expected = pipeline("sentence-embeddings", server["paths"]["emb"])(SENTENCES[:2])
    answer = client.embeddings.create(model="mini", input=SENTENCES[:2])
    got = torch.tensor([d.embedding for d in answer.data])
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.code == "model_not_found"
    r = _post(server["emb"] + "/v1/embeddings", {"input": "x", "model": "text-embedding-3-small"})
    assert r.status_code == 404 and r.json()["error_type"] == "model_not_found"


def _png(seed: int, height: int = 30, width: int = 44) -> bytes:
    out = io.BytesIO()
    random_image(seed, height, width).save(out, format="PNG")
    return out.getvalue()


def test_image_requests_in_every_form_equal_in_process(server):
    """image-classification over HTTP: a raw image/png body (parameters in the query), base64 and a data URI in
    JSON, one or a list: each answers what the in-process pipeline answers for the same bytes."""
    png, vit = _png(1), str(server["paths"]["vit"])
    ref = pipeline("image-classification", vit)(png, top_k=3)
    raw = requests.post(server["img"] + "/predict?top_k=3", data=png, headers={"content-type": "image/png"}, timeout=60)
    b64 = base64.b64encode(png).decode()
    uri = _post(server["img"], {"inputs": f"data:image/png;base64,{b64}", "parameters": {"top_k": 3}})
    listed = _post(server["img"], {"inputs": [b64, b64], "parameters": {"top_k": 3}})
    for answer in (raw.json(), uri.json(), *listed.json()):
        assert [a["label"] for a in answer] == [a["label"] for a in ref]
        assert [a["score"] for a in answer] == pytest.approx([a["score"] for a in ref], abs=1e-6)


def test_zero_shot_and_image_embeddings_over_http(server):
    """zero-shot-image-classification with candidate_labels; CLIP image embeddings through /v1/embeddings (input
    strings as data URIs) equal the in-process image-embeddings pipeline."""
    png, clip = _png(2), str(server["paths"]["clip"])
    labels = ["a cat", "a dog", "a bird"]
    ref = pipeline("zero-shot-image-classification", clip)(png, candidate_labels=labels)
    b64 = base64.b64encode(png).decode()
    r = _post(server["zs"], {"inputs": b64, "parameters": {"candidate_labels": labels}})
    assert r.status_code == 200, r.text
    assert [a["label"] for a in r.json()] == [a["label"] for a in ref]
    assert [a["score"] for a in r.json()] == pytest.approx([a["score"] for a in ref], abs=1e-6)
    r = _post(server["imgemb"] + "/v1/embeddings", {"input": [f"data:image/png;base64,{b64}"], "model": "clip-images"})
    assert r.status_code == 200, r.text
    expected = pipeline("image-embeddings", clip)(png)
    torch.testing.assert_close(
        torch.tensor(r.json()["data"][0]["embedding"]), torch.tensor(expected), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b"this is not an image", {"content-type": "image/jpeg"}, 422, "not an image format"),
        (b"", {"content-type": "image/png"}, 422, "no image data"),
        ({"inputs": "/etc/hostname"}, None, 422, "never a path or a URL"),
        ({"inputs": "https://example.com/cat.jpg"}, None, 422, "is a URL"),
        ({"inputs": {"image": "x"}}, None, 422, "expected an image as a base64 string"),
        (b"x" * 400_000, {"content-type": "image/png"}, 413, "bytes"),
        (b"GIF89a", {"content-type": "text/plain"}, 422, "not valid JSON"),
        (
            {"inputs": [base64.b64encode(_png(5)).decode(), "http://127.0.0.1:1/x.png"]},
            None,
            422,
            "inputs[1]: 'http://127.0.0.1:1/x.png' is a URL",
        ),
    ],
    ids=["text-as-jpeg", "empty", "path", "url", "dict", "too-large", "text-body", "url-in-list"],
)
def test_bad_image_requests_are_named_4xx(server, body, headers, status, message):
    """Bad image requests get a 4xx naming what was received, never a 500; the server answers the next one."""
    if isinstance(body, bytes):
        r = requests.post(server["img"] + "/predict", data=body, headers=headers, timeout=60)
    else:
        r = _post(server["img"], body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert requests.post(server["img"], data=_png(3), headers={"content-type": "image/png"}, timeout=60).ok


@pytest.fixture(scope="module")
def image_site(tmp_path_factory):
    """A local HTTP server (a thread) serving a PNG and a file larger than the "imgurl" app's 300,000 byte limit."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "cat.png").write_bytes(_png(4))
    (folder / "huge.png").write_bytes(b"x" * 400_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_image_urls_are_fetched_only_where_the_application_allows_them(server, image_site):
    """allow_image_urls: the ingress fetches the URL and answers as for its bytes; a missing one or one larger than
    max_body_bytes is a 422 naming the URL; the default application refuses the same URL without fetching it."""
    ref = pipeline("image-classification", str(server["paths"]["vit"]))(_png(4), top_k=2)
    r = _post(server["imgurl"], {"inputs": [f"{image_site}/cat.png"], "parameters": {"top_k": 2}})
    assert r.status_code == 200, r.text
    assert [a["label"] for a in r.json()[0]] == [a["label"] for a in ref]
    assert [a["score"] for a in r.json()[0]] == pytest.approx([a["score"] for a in ref], abs=1e-6)
    for path, message in (("missing.png", "could not be fetched"), ("huge.png", "larger than 300,000 bytes")):
        r = _post(server["imgurl"], {"inputs": f"{image_site}/{path}"})
        assert r.status_code == 422 and message in r.json()["error"] and path in r.json()["error"], r.text
    r = _post(server["img"], {"inputs": f"{image_site}/cat.png"})
    assert r.status_code == 422 and "does not fetch images" in r.json()["error"], r.text

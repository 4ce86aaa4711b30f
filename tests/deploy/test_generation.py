"""The text-generation Serve application on real Ray Serve over loopback (one instance for the module, stopped at the
end): OpenAI completions and chat completions and the HF route answer what the in-process pipeline answers (greedy
and seeded sampling); streamed events join to the same text; stop strings cut exactly; usage counts; concurrent
requests share the engine; malformed requests get documented 4xx and never 500; auth, overload, timeouts; a client
that goes away cancels its sequences in the engine."""

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import requests
from ray import serve

from deploy.generation import build_generation_app
from deploy.router import build_router
from pipelines import pipeline
from pipelines.hub import DEFAULT_CHAT_MODEL, import_folder

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "My name is John and I live in"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Where does John live?"}]
KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def paths(checkpoint, tmp_path_factory):
    """qwen2 (ChatML template), gpt2 (no template, context 128), and a slower gpt2 (512 wide, context 1024)."""
    made = checkpoint("gpt2", "causal-lm", n_positions=1024, n_embd=512, n_layer=4, n_inner=2048)
    slow = tmp_path_factory.mktemp("gpt2-slow") / "model"
    shutil.copytree(made, slow)  # our own copy: the tokenizer's context is raised to the model's
    config = json.loads((slow / "tokenizer_config.json").read_text())
    (slow / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1024}))
    return {"qwen": checkpoint("qwen2", "causal-lm"), "gpt2": checkpoint("gpt2", "causal-lm"), "slow": slow}


@pytest.fixture(scope="module")
def server(paths, smollm2_path):
    """Serve on 127.0.0.1 with four applications (three tiny models and the real SmolLM2 GGUF); yields {name: URL}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        apps = {
            "qwen": {"task": "text-generation", "model": str(paths["qwen"]), "served_model_name": "tiny"},
            "gpt2": {
                "model": str(paths["gpt2"]),
                "api_key": "s3cret",
                "max_client_batch_size": 8,
                "max_body_bytes": 100_000,
            },
            # no end-of-sequence token: every sequence runs to its max_tokens, about 10 ms a token
            "slow": {
                "model": str(paths["slow"]),
                "params": {"eos_token_id": []},
                "max_in_flight": 2,
                "request_timeout_s": 2.0,
                "max_sequences": 4,
            },
            "smol": {"model": str(smollm2_path), "served_model_name": "smollm2", "max_sequences": 8},
        }
        targets = [serve.RunTarget(build_generation_app(a), name=n, route_prefix=f"/{n}") for n, a in apps.items()]
        targets.append(
            serve.RunTarget(build_router({"applications": ["qwen", "smol"]}), name="openai", route_prefix="/")
        )
        serve.run_many(targets)
        yield {name: f"http://127.0.0.1:{port}/{name}" for name in apps} | {"root": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(paths):
    """The in-process pipelines the routes must agree with."""
    return {name: pipeline("text-generation", str(paths[name])) for name in ("qwen", "gpt2")}


def _post(url, body=None, **kw):
    if "data" in kw:
        return requests.post(url, timeout=60, **kw)
    return requests.post(url, json=body, timeout=60, **kw)


def _events(response) -> list:
    """The data of each server-sent event, parsed; "[DONE]" kept as is."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in response.content.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _joined(events: list, field: str = "text") -> dict[int, str]:
    """Per choice index, its streamed pieces joined."""
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            piece = choice[field] if field == "text" else choice["delta"].get("content", "")
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


def _reference(pipe, prompts, options: dict, n: int = 1):
    """(new text, new token ids, prompt token count) of each returned sequence, prompt-major, in process."""
    texts = pipe(prompts, return_full_text=False, num_return_sequences=n, **options)
    ids = pipe(prompts, return_tensors=True, num_return_sequences=n, **options)
    out = []
    for prompt, answers, tensors in zip(prompts, texts, ids):
        prompt_ids = pipe.preprocess(prompt)["input_ids"]
        for answer, tensor in zip(answers, tensors):
            new = tensor["generated_token_ids"][len(prompt_ids) :]
            out.append((answer["generated_text"], new, len(prompt_ids)))
    return out


def _finish_reason(pipe, new_ids: list[int]) -> str:
    """Without stop strings: "stop" when the last token is an end-of-sequence token, else "length"."""
    eos = pipe.generation_defaults.get("eos_token_id")
    return "stop" if new_ids[-1] in (eos if isinstance(eos, list) else [eos]) else "length"


def _stats(app: str) -> dict:
    return serve.get_deployment_handle("GenerationServer", app_name=app).get_stats.remote().result()


def _metrics(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    samples = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in samples}


# -- answers equal the in-process pipeline ------------------------------------------------------------------------
SAMPLING = [
    pytest.param({"temperature": 0}, {"do_sample": False}, 1, id="greedy"),
    pytest.param(
        {"temperature": 0.9, "top_p": 0.9, "seed": 5, "n": 2},
        {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 5},
        2,
        id="seeded-sampling",
    ),
]


@pytest.mark.parametrize("openai, options, n", SAMPLING)
def test_completions_equal_the_in_process_pipeline(server, local, openai, options, n):
    """Choices in prompt-major order, text = the pipeline's new text, usage = the tokenizer's counts."""
    r = _post(server["qwen"] + "/v1/completions", {"prompt": PROMPTS, "max_tokens": 12, "model": "tiny", **openai})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _reference(local["qwen"], PROMPTS, {"max_new_tokens": 12, **options}, n)
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == list(range(len(PROMPTS) * n))
    assert [c["text"] for c in body["choices"]] == [text for text, _, _ in expected]
    reasons = [_finish_reason(local["qwen"], ids) for _, ids, _ in expected]
    assert [c["finish_reason"] for c in body["choices"]] == reasons
    prompt_tokens = sum(count for _, _, count in expected[::n])
    completion_tokens = sum(len(ids) for _, ids, _ in expected)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@pytest.mark.parametrize("openai, options, n", SAMPLING)
def test_chat_completions_equal_the_in_process_pipeline(server, local, openai, options, n):
    """/v1/chat/completions (greedy and seeded sampling, n choices) answers the pipeline's chat replies, with usage and finish reasons."""
    r = _post(server["qwen"] + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 10, **openai})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = local["qwen"](CHAT, return_full_text=False, max_new_tokens=10, num_return_sequences=n, **options)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    messages = [{"role": "assistant", "content": e["generated_text"]} for e in expected]
    assert [c["message"] for c in body["choices"]] == messages
    prompt_ids = local["qwen"].preprocess(CHAT)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)


HF_CASES = [
    (PROMPTS, {"do_sample": False, "max_new_tokens": 8}),
    (PROMPTS[0], {"do_sample": False, "max_new_tokens": 5, "return_tensors": True}),
    (PROMPTS[1], {"max_new_tokens": 6, "seed": 3, "num_return_sequences": 2, "return_full_text": False}),
    (CHAT, {"max_new_tokens": 6, "seed": 1}),
    ([CHAT, CHAT[1:]], {"do_sample": False, "max_new_tokens": 4, "return_full_text": False}),
    (PROMPTS[2], {"do_sample": False, "max_new_tokens": 12, "stop_sequence": "e", "prefix": "Once. "}),
]


@pytest.mark.parametrize("inputs, parameters", HF_CASES, ids=[f"hf-{i}" for i in range(len(HF_CASES))])
def test_hf_route_equals_in_process(server, local, inputs, parameters):
    """POST /predict answers exactly what pipeline('text-generation') returns for prompts, chats and lists of them."""
    r = _post(server["qwen"] + "/predict", {"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.text
    assert r.json() == local["qwen"](inputs, **parameters)


def test_the_root_route_is_the_hf_route(server, local):
    """POST / answers as POST /predict."""
    body = {"inputs": PROMPTS[0], "parameters": {"do_sample": False, "max_new_tokens": 4}}
    assert _post(server["qwen"], body).json() == local["qwen"](PROMPTS[0], do_sample=False, max_new_tokens=4)


# -- streaming ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("openai", [{"temperature": 0}, {"temperature": 1.1, "seed": 4, "n": 2}], ids=["greedy", "n2"])
def test_streamed_completions_join_to_the_answer(server, openai):
    """Streamed completion chunks join to the plain answer, end with a finish reason, usage on request, then [DONE]."""
    body = {"prompt": PROMPTS[:2], "max_tokens": 14, **openai}
    whole = _post(server["qwen"] + "/v1/completions", body).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = _events(_post(server["qwen"] + "/v1/completions", streamed))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    chunks = events[:-2]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    assert len(chunks) > len(whole["choices"]), "streamed piece by piece, not in one event"
    assert _joined(events[:-1]) == {c["index"]: c["text"] for c in whole["choices"]}
    for choice in whole["choices"]:  # each choice's last event carries its finish reason, earlier ones none
        mine = [c for e in chunks for c in e["choices"] if c["index"] == choice["index"]]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]


def test_streamed_chat_joins_to_the_answer(server):
    """A streamed chat opens with the assistant role and its content deltas join to the plain answer."""
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    whole = _post(server["qwen"] + "/v1/chat/completions", body).json()
    events = _events(_post(server["qwen"] + "/v1/chat/completions", {**body, "stream": True}))
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _joined(events, "delta") == {0: whole["choices"][0]["message"]["content"]}
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


# -- stop strings -----------------------------------------------------------------------------------------------
def test_stop_strings_cut_exactly_before_the_stop(server, local):
    """OpenAI's convention: the text ends right before the first stop string, streamed or not, finish_reason
    "stop"; the pipeline (HF route) ends at the token that completed it and keeps it."""
    prompt = PROMPTS[1]
    free = local["qwen"](prompt, do_sample=False, max_new_tokens=24, return_full_text=False)[0]["generated_text"]
    at = next(i for i in range(len(free) // 3, len(free) - 1) if free[i : i + 2].isalpha())
    stop = free[at : at + 2]
    before = free[: free.index(stop)]
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": ["never here", stop]}
    r = _post(server["qwen"] + "/v1/completions", body).json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (before, "stop")
    assert r["usage"]["completion_tokens"] < 24
    events = _events(_post(server["qwen"] + "/v1/completions", {**body, "stream": True}))
    assert _joined(events) == {0: before} and events[-2]["choices"][0]["finish_reason"] == "stop"
    hf = local["qwen"](prompt, do_sample=False, max_new_tokens=24, return_full_text=False, stop_sequence=stop)
    assert hf[0]["generated_text"].startswith(before + stop)
    chat = _post(server["qwen"] + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "temperature": 0}).json()
    text = chat["choices"][0]["message"]["content"]
    if len(text) > 1:  # a stop string that is the whole answer but its first character
        cut = _post(
            server["qwen"] + "/v1/chat/completions",
            {"messages": CHAT, "max_tokens": 3, "temperature": 0, "stop": text[1:]},
        ).json()
        assert cut["choices"][0]["message"]["content"] == text[:1]


# -- concurrency, overload, timeouts, cancellation ----------------------------------------------------------------
def test_concurrent_requests_get_their_own_answers(server, local):
    """Concurrent requests sharing the engine each get their own greedy answer, equal to the in-process one."""
    bodies = [{"prompt": p, "max_tokens": 10, "temperature": 0} for p in PROMPTS * 2]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: _post(server["qwen"] + "/v1/completions", b), bodies))
    alone = [local["qwen"](b["prompt"], do_sample=False, max_new_tokens=10, return_full_text=False) for b in bodies]
    expected = [a[0]["generated_text"] for a in alone]
    assert [a.json()["choices"][0]["text"] for a in answers] == expected


def _open_stream(url: str, max_tokens: int = 900):
    """A streamed completion whose first event has arrived: (response, its lines, the first line). Keep the lines
    iterator: closing it (dropping the last reference) closes the connection."""
    r = requests.post(
        url + "/v1/completions",
        json={"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": True},
        stream=True,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    lines = r.iter_lines()
    return r, lines, next(filter(None, lines))


def _cancelled(before: dict, count: int = 1):
    """A condition: `count` more sequences were cancelled than in `before`, and none is left in the engine (the
    engine's thread drops a cancelled sequence between two steps)."""

    def condition():
        stats = _stats("slow")
        return stats["cancelled"] == before["cancelled"] + count and stats["running"] == 0

    return condition


def _wait_for(condition, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@pytest.mark.slow
def test_streams_share_the_engine_and_overload_answers_503(server):
    """Two long streams at once: both run in the engine together (continuous batching); a third request over
    max_in_flight=2 gets 503 with Retry-After; closing the streams frees their slots and sequences."""
    url = server["slow"]
    before = _stats("slow")
    first, first_lines, _ = _open_stream(url)
    second, second_lines, _ = _open_stream(url)
    try:
        assert _stats("slow")["running"] == 2
        busy = _post(url + "/predict", {"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert busy.status_code == 503 and busy.headers["Retry-After"] and busy.json()["error_type"] == "overloaded"
    finally:
        first.close()
        second.close()
    assert _wait_for(_cancelled(before, 2))
    assert _stats("slow")["max_running"] >= 2
    metrics = _metrics(url)  # each stream saw both sequences in the engine
    assert metrics["pipelines_engine_sequences_count"] > metrics['pipelines_engine_sequences_bucket{le="1"}']
    short = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    assert _wait_for(lambda: _post(url + "/predict", short).status_code == 200)  # the slots are free again


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_cancels_its_sequence(server):
    """The stream would run ~8 s; the client leaves after the first event: the sequence leaves the engine at once
    (not at the 2 s timeout), counted as cancelled, and the request as 499."""
    url = server["slow"]
    before = _stats("slow")
    response, lines, first = _open_stream(url)
    assert json.loads(first[len(b"data: ") :])["choices"][0]["finish_reason"] is None
    time.sleep(0.2)
    assert _stats("slow")["running"] == 1  # still generating while the client holds the connection
    response.close()
    left = time.monotonic()
    assert _wait_for(_cancelled(before), 3.0)
    assert time.monotonic() - left < 1.5
    assert _stats("slow")["finished"] == before["finished"]
    cancelled = 'pipelines_requests_total{route="completions",status="499"}'
    assert _wait_for(lambda: _metrics(url).get(cancelled, 0) >= 1, 3.0)


@pytest.mark.slow
def test_a_client_that_times_out_cancels_a_plain_request(server):
    """A non-streamed request whose client gives up after 0.5 s: cancelled then, not at the 2 s server timeout."""
    url = server["slow"]
    before, started = _stats("slow"), time.monotonic()
    with pytest.raises(requests.Timeout):
        requests.post(url + "/predict", json={"inputs": "hi", "parameters": {"max_new_tokens": 900}}, timeout=0.5)
    assert _wait_for(_cancelled(before), 3.0)
    assert time.monotonic() - started < 1.9
    assert _metrics(url)['pipelines_requests_total{route="predict",status="499"}'] == 1


@pytest.mark.slow
def test_timeout_answers_408_and_frees_the_engine(server):
    """A request past request_timeout_s gets 408 (an error event mid-stream) and its sequences leave the engine."""
    url = server["slow"]
    before = _stats("slow")
    r = _post(url + "/predict", {"inputs": "hi", "parameters": {"max_new_tokens": 1000}})
    assert r.status_code == 408 and r.json()["error_type"] == "timeout"
    assert _wait_for(_cancelled(before), 3.0)
    events = _events(_post(url + "/v1/completions", {"prompt": "hi", "max_tokens": 1000, "stream": True}))
    assert events[-1] == {"error": "the request took longer than 2.0 s", "error_type": "timeout"}
    assert len(events) > 2 and "choices" in events[0]  # tokens streamed before the timeout ended it
    assert _wait_for(_cancelled(before, 2), 3.0)


# -- errors -----------------------------------------------------------------------------------------------------
MALFORMED = [
    # (route, body or raw bytes, status, a word the error must contain)
    ("/v1/completions", b"{bad json", 422, "JSON"),
    ("/v1/completions", b"", 422, "JSON"),
    ("/v1/completions", b"[]", 422, "body"),
    ("/v1/completions", b"\xff\xfe\x00", 422, "JSON"),
    ("/v1/completions", {}, 422, "prompt"),
    ("/v1/completions", {"prompt": 42}, 422, "prompt"),
    ("/v1/completions", {"prompt": ""}, 422, "empty"),
    ("/v1/completions", {"prompt": []}, 422, "prompt"),
    ("/v1/completions", {"prompt": [1, 2]}, 422, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 422, "context of 128"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 422, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 422, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, 422, "n=2 needs sampling"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, 422, "maximum of 8"),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, 422, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, 422, "stop"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, 422, "seed"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "x" * 200_000}, 413, "limit"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 422, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 422, "chat template"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "max_completion_tokens": 2},
        422,
        "max_completion_tokens",
    ),
    ("/predict", {"inputs": None}, 422, "inputs"),
    ("/predict", {"inputs": []}, 422, "inputs"),
    ("/predict", {"inputs": 42}, 422, "prompt"),
    ("/predict", {"inputs": "hi", "parameters": "fast"}, 422, "parameters"),
    ("/predict", {"inputs": "hi", "parameters": {"max_new_token": 5}}, 422, "did you mean 'max_new_tokens'"),
    ("/predict", {"inputs": "hi", "parameters": {"do_sample": True, "temperature": -1}}, 422, "temperature"),
    ("/predict", {"inputs": "hi", "parameters": {"num_beams": 4}}, 422, "num_beams"),
    ("/predict", {"inputs": "word " * 300}, 422, "context is 128"),
    ("/predict", {"inputs": "hi", "stream": True}, 422, "stream"),
]


@pytest.mark.parametrize("route, body, status, word", MALFORMED, ids=[f"{i}-{m[0]}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_documented_4xx(server, route, body, status, word):
    """Each malformed body gets its documented 4xx (never 500) with an error naming the field in OpenAI's names."""
    if isinstance(body, bytes):
        r = _post(server["gpt2"] + route, data=body, headers={**KEY, "content-type": "application/json"})
    else:
        r = _post(server["gpt2"] + route, body, headers=KEY)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] in ("validation", "payload_too_large") and word in r.json()["error"], r.json()


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(server, local):
    """A prompt plus max_tokens over the model's context is 422 naming both numbers."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    count = len(local["gpt2"].preprocess(prompt)["input_ids"])
    r = _post(server["gpt2"] + "/v1/completions", {"prompt": prompt, "max_tokens": 100}, headers=KEY)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert (
        f"the prompt ({count} tokens) plus max_tokens=100 makes {count + 100} tokens, more than the model's "
        "context of 128" in r.json()["error"]
    )
    ok = _post(server["gpt2"] + "/v1/completions", {"prompt": prompt, "max_tokens": 128 - count}, headers=KEY)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == count


def test_bearer_token(server):
    """With api_key set, a missing or wrong bearer token is 401 and the right one is served."""
    body = {"prompt": "hi", "max_tokens": 2}
    assert _post(server["gpt2"] + "/v1/completions", body).status_code == 401
    wrong = _post(server["gpt2"] + "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["error_type"] == "authentication"
    assert _post(server["gpt2"] + "/v1/completions", body, headers=KEY).status_code == 200


def test_health_info_metrics_and_docs(server):
    """GET /health, /info, /metrics (tokens, time to first token) and /docs answer."""
    assert requests.get(server["qwen"] + "/health", timeout=10).json() == {"status": "ok"}
    info = requests.get(server["qwen"] + "/info", timeout=10).json()
    assert info["task"] == "text-generation" and info["max_context"] == 128 and info["chat_template"] is True
    assert requests.get(server["qwen"] + "/docs", timeout=10).status_code == 200
    assert {"/v1/completions", "/v1/chat/completions", "/predict"} <= set(
        requests.get(server["qwen"] + "/openapi.json", timeout=10).json()["paths"]
    )
    _post(server["qwen"] + "/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0})
    _post(server["qwen"] + "/v1/completions", {"prompt": ""})
    metrics = _metrics(server["qwen"])
    assert metrics['pipelines_requests_total{route="completions",status="200"}'] >= 1
    assert metrics['pipelines_requests_total{route="completions",status="422"}'] >= 1
    assert metrics['pipelines_errors_total{type="validation"}'] >= 1
    assert metrics["pipelines_prompt_tokens_total"] > 0 and metrics["pipelines_generated_tokens_total"] >= 3
    assert metrics["pipelines_time_to_first_token_seconds_count"] >= 1


# -- the shipped config --------------------------------------------------------------------------------------------
def test_the_shipped_serve_config_is_valid_and_builds(smollm2_path):
    """`serve run deploy/generation.yaml` must pass Serve's own schema and build_generation_app's checks."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    import_folder(smollm2_path, DEFAULT_CHAT_MODEL)  # the default model, as .ci/setup imports it
    config = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "generation.yaml").read_text())
    ServeDeploySchema(**config)
    assert config["http_options"]["host"] == "127.0.0.1"
    *apps, root = config["applications"]
    for app in apps:
        assert app["import_path"] == "deploy.generation:build_generation_app"
        assert build_generation_app(app["args"]) is not None
    assert (root["import_path"], root["route_prefix"]) == ("deploy.router:build_router", "/")
    assert build_router(root.get("args")) is not None


@pytest.mark.parametrize(
    "args, message",
    [
        ({"task": "text-generation"}, "needs model="),
        ({"model": "m", "task": "text-classification"}, "serves task 'text-generation'"),
        (
            {"model": "m", "max_sequence": 4},
            r"unknown argument\(s\) 'max_sequence' \(did you mean 'max_sequences'\?\); allowed: .*max_sequences",
        ),
        ({"model": "m", "model_replicas": 2, "autoscaling": {"max_replicas": 2}}, "either model_replicas"),
        ({"model": "m", "max_ongoing_requests": 0}, "max_ongoing_requests must be a positive integer"),
        ({"model": "m", "max_in_flight": "many"}, "max_in_flight must be an integer, got 'many'"),
    ],
)
def test_bad_build_arguments_are_refused_before_serve_starts(args, message):
    """Missing model, another task, misspelt keys, bad replica settings and non-numbers fail at build time, naming the key."""
    with pytest.raises(ValueError, match=message):
        build_generation_app(args)


def test_command_line_arguments_are_converted():
    """`serve run deploy.generation:build_generation_app model=m max_sequences=8 ...` passes strings."""
    app = build_generation_app({"model": "m", "max_sequences": "8", "request_timeout_s": "30", "max_in_flight": "4"})
    ingress = app._bound_deployment
    server = ingress.init_args[0]._bound_deployment
    assert ingress.init_kwargs["limits"] == {"request_timeout_s": 30.0, "max_in_flight": 4}
    assert server.init_args[1].batch_size == 8 and server.max_ongoing_requests == 8


def test_the_openai_client_reaches_the_root_and_streams(server, local):
    """`OpenAI(base_url=.../v1)` against the root: the model list, a greedy completion equal to the in-process
    pipeline's, a streamed chat joined to the plain one, and an unknown model as the client's NotFoundError."""
    import openai

    client = openai.OpenAI(base_url=server["root"] + "/v1", api_key="unused", max_retries=0)
    assert sorted((m.id, m.task) for m in client.models.list().data) == [
        ("smollm2", "text-generation"),
        ("tiny", "text-generation"),
    ]
    answer = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    ((text, _, _),) = _reference(local["qwen"], PROMPTS[:1], {"max_new_tokens": 8, "do_sample": False})
    assert answer.choices[0].text == text and answer.model == "tiny"
    chat = {"model": "tiny", "messages": CHAT, "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**chat).choices[0].message.content
    pieces = [
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True) if c.choices
    ]
    assert "".join(pieces) == whole
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="hi")
    assert e.value.code == "model_not_found" and "tiny" in e.value.message


def test_the_openai_client_chats_with_the_real_smollm2(server, smollm2_path):
    """The real SmolLM2 GGUF served through the root: the `openai` client's chat completion, plain and streamed, is
    the in-process pipeline's greedy answer (the oracle's "The capital of France is Paris.")."""
    import openai

    client = openai.OpenAI(base_url=server["root"] + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    local = pipeline("text-generation", model=smollm2_path)
    expected = local(messages, max_new_tokens=40, do_sample=False)[0]["generated_text"][-1]["content"]
    assert expected == "The capital of France is Paris."
    request = {"model": "smollm2", "messages": messages, "max_tokens": 40, "temperature": 0}
    answer = client.chat.completions.create(**request)
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(**request, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

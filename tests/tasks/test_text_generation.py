"""text-generation against transformers.pipeline on tiny random decoders: same outputs for every option that is
deterministic (greedy), reproducible sampling, streaming, concurrent callers sharing one engine, and clear errors."""

import threading

import pytest
import torch
import transformers

from pipelines import pipeline

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "short", "My name is John and I live in"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Where does John live?"}]
FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def pair(checkpoint):
    """(ours, transformers') pipelines per family, built once."""
    made = {}

    def get(family, **overrides):
        key = (family, repr(sorted(overrides.items())))
        if key not in made:
            path = str(checkpoint(family, "causal-lm", **overrides))
            made[key] = (pipeline("text-generation", path), transformers.pipeline("text-generation", model=path))
        return made[key]

    return get


def _plain(outputs):
    """transformers' token ids come as tensors or numpy ints: plain ints to compare."""
    if isinstance(outputs, list):
        return [_plain(o) for o in outputs]
    if isinstance(outputs, dict) and "generated_token_ids" in outputs:
        return {"generated_token_ids": [int(t) for t in outputs["generated_token_ids"]]}
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "options",
    [
        {"max_new_tokens": 12},
        {"max_new_tokens": 7, "return_full_text": False},
        {"max_new_tokens": 5, "return_tensors": True},
        {"max_length": 30},
        {"max_new_tokens": 10, "repetition_penalty": 1.7},
        {"max_new_tokens": 10, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 6, "prefix": "Once upon a time. "},
    ],
    ids=lambda o: ",".join(o),
)
def test_greedy_equals_transformers(pair, family, options):
    """Greedy generation equals transformers.pipeline's for each family and option, batched and single."""
    ours, ref = pair(family)
    options = {"do_sample": False, **options}
    assert ours(PROMPTS, **options) == _plain(ref(PROMPTS, **options))
    assert ours(PROMPTS[0], **options) == _plain(ref(PROMPTS[0], **options))


@pytest.mark.parametrize("family", ("llama", "mistral", "qwen2"))
def test_chat_equals_transformers(pair, family):
    """A chat gets the conversation back with the assistant's answer; one ending with an assistant message is
    continued (prefill); return_full_text=False gives the new text alone."""
    ours, ref = pair(family)
    for messages in (CHAT, CHAT + [{"role": "assistant", "content": "He lives in"}]):
        for options in ({}, {"return_full_text": False}):
            options = {"do_sample": False, "max_new_tokens": 8, **options}
            assert ours(messages, **options) == ref(messages, **options)
    assert ours([CHAT, CHAT[1:]], do_sample=False, max_new_tokens=4) == ref(
        [CHAT, CHAT[1:]], do_sample=False, max_new_tokens=4
    )


def test_stop_sequence_ends_at_the_same_token_as_transformers(pair):
    """stop_sequence ends generation at the same token as transformers does."""
    ours, ref = pair("llama")
    free = ours(PROMPTS[1], do_sample=False, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # a stop string the greedy text reaches halfway
    options = {"do_sample": False, "max_new_tokens": 20, "stop_sequence": stop, "return_full_text": False}
    got = ours(PROMPTS[1], **options)
    assert got == ref(PROMPTS[1], **options)
    assert stop in got[0]["generated_text"] and len(got[0]["generated_text"]) < len(free)


def test_rope_scaled_llama_equals_transformers(pair):
    """A Llama with linear RoPE scaling generates the same greedy tokens as transformers."""
    ours, ref = pair("llama", rope_scaling={"factor": 2.0, "rope_type": "linear"})
    assert ours(PROMPTS, do_sample=False, max_new_tokens=10) == ref(PROMPTS, do_sample=False, max_new_tokens=10)


def test_a_batch_equals_each_prompt_alone(pair):
    """Prompts of different lengths share the engine's running batch; each answer is what it is alone."""
    ours, _ = pair("qwen2")
    together = ours(PROMPTS * 3, do_sample=False, max_new_tokens=9)
    alone = [ours(p, do_sample=False, max_new_tokens=9) for p in PROMPTS * 3]
    assert together == alone


def test_sampling_is_reproducible_with_a_seed_and_top_k_1_is_greedy(pair):
    """A seed makes sampling repeatable and independent of batch neighbours; another seed differs; top_k=1 is greedy."""
    ours, _ = pair("llama")
    options = {"do_sample": True, "max_new_tokens": 12, "seed": 7, "temperature": 1.3}
    first = ours(PROMPTS, **options)
    assert ours(PROMPTS, **options) == first
    assert ours(PROMPTS[2], **options) == first[2], "a sequence's draws do not depend on its batch neighbours"
    assert ours(PROMPTS, **{**options, "seed": 8}) != first
    greedy = ours(PROMPTS, do_sample=False, max_new_tokens=12)
    assert ours(PROMPTS, do_sample=True, top_k=1, max_new_tokens=12, seed=3) == greedy
    three = ours(PROMPTS[0], do_sample=True, num_return_sequences=3, max_new_tokens=12, seed=1)
    assert len(three) == 3 and len({a["generated_text"] for a in three}) > 1


def test_stream_joins_to_the_generated_text(pair):
    """stream() yields several pieces that join to the generated text."""
    ours, _ = pair("gpt2")
    pieces = list(ours.stream(PROMPTS[1], do_sample=False, max_new_tokens=16))
    assert len(pieces) > 1
    assert (
        "".join(pieces)
        == ours(PROMPTS[1], do_sample=False, max_new_tokens=16, return_full_text=False)[0]["generated_text"]
    )


def test_concurrent_callers_share_the_engine_and_get_their_own_answers(pair):
    """Threads calling one pipeline at once share its engine and each gets its own greedy answer."""
    ours, _ = pair("mistral")
    expected = {p: ours(p, do_sample=False, max_new_tokens=10) for p in PROMPTS}
    got, threads = {}, []
    for p in PROMPTS:
        threads.append(
            threading.Thread(target=lambda p=p: got.__setitem__(p, ours(p, do_sample=False, max_new_tokens=10)))
        )
        threads[-1].start()
    for t in threads:
        t.join()
    assert got == expected


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda g: g(""), ValueError, "the prompt is empty"),
        (lambda g: g(42), TypeError, "expected a prompt string or a chat"),
        (lambda g: g("hi", max_new_tokens=-3), ValueError, "max_new_tokens"),
        (lambda g: g("hi", max_new_tokens=10**9), ValueError, "max_new_tokens"),
        (lambda g: g("hi", max_new_token=5), ValueError, "max_new_tokens"),
        (lambda g: g("hi", do_sample=True, temperature=-1.0), ValueError, "temperature"),
        (lambda g: g("word " * 300), ValueError, r"the prompt has \d+ tokens but the model's context is 128"),
        (lambda g: g([{"role": "user"}]), ValueError, "lacks 'content'"),
        (lambda g: g("hi", return_text=True, return_full_text=False), ValueError, "mutually exclusive"),
    ],
)
def test_bad_input_is_named(pair, call, error, message):
    """A bad prompt or parameter fails naming the problem, and the engine serves the next call."""
    ours, _ = pair("llama")
    with pytest.raises(error, match=message):
        call(ours)
    assert ours("still works", do_sample=False, max_new_tokens=2)  # the engine is not left broken


def test_a_failed_step_fails_its_sequences_and_the_engine_recovers(pair, monkeypatch):
    """Out of memory (or any error) in a step: the callers get the error, later calls work."""
    ours, _ = pair("gpt2")
    engine = ours.loop.engine
    real = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory")))
    with pytest.raises(torch.OutOfMemoryError):
        ours(PROMPTS, do_sample=False, max_new_tokens=5)
    monkeypatch.setattr(engine, "_decode", real)
    assert not engine.has_work()
    assert ours(PROMPTS[0], do_sample=False, max_new_tokens=5)

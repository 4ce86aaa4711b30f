"""The engine's KV cache: allocated once at the size the budget says, blocks reserved at admission and given back,
sequences on scattered blocks, and greedy parity with a plain full-recompute loop for packed prefill, prompts
prefilled in chunks, and a prompt of thousands of tokens."""

import dataclasses

import pytest
import torch
import transformers

from pipelines import layers
from pipelines.generation import engine as engine_module
from pipelines.generation.engine import BlockPool, Engine
from pipelines.models import gpt2, llama
from tests.checkpoints import PROMPTS, load_ours

VARIANTS = {
    "gpt2": ("gpt2", gpt2.GPT2LMHeadModel, {}),
    "llama": ("llama", llama.LlamaForCausalLM, {}),
    "mistral-window": ("mistral", llama.MistralForCausalLM, {"sliding_window": 5}),
    "qwen2-tied-windows": (
        "qwen2",
        llama.Qwen2ForCausalLM,
        {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "llama-dynamic": (
        "llama",
        llama.LlamaForCausalLM,
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    ),
}


@pytest.fixture(scope="module")
def variant(checkpoint):
    made = {}

    def get(name, **extra):
        key = (name, tuple(sorted(extra.items())))
        if key not in made:
            family, cls, options = VARIANTS[name]
            path = checkpoint(family, "causal-lm", **{**options, **extra})
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            made[key] = (load_ours(path, cls), [tokenizer(p)["input_ids"] for p in PROMPTS])
        return made[key]

    return get


def full_recompute(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by a plain loop: the whole sequence through the model at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_the_cache_is_the_budget_allocated_once(variant, monkeypatch):
    """The keys and values allocated are kv_cache_tokens x layers x 2 x kv heads x head size x element size
    (kv_cache_tokens rounded up to a whole block), made once: the same tensors through many admissions and
    finishes, every block back in the pool at the end."""
    model, prompts = variant("llama")
    made = []
    original = layers.KVCache.__init__

    def init(self, *args, **options):
        made.append(options)
        original(self, *args, **options)

    monkeypatch.setattr(layers.KVCache, "__init__", init)
    engine = Engine(model, max_length=64, kv_cache_tokens=100, block_size=16)
    engine.generate(prompts, [1, 7, 3, 12, 5])
    n_layers, n_kv, head_dim = model.config.cache_shape
    per_token = n_layers * 2 * n_kv * head_dim * torch.float32.itemsize
    assert engine.cache.k.nbytes + engine.cache.v.nbytes == 112 * per_token  # 100 positions -> 7 blocks of 16
    pointers = (engine.cache.k.data_ptr(), engine.cache.v.data_ptr())
    for _ in range(3):
        engine.generate(prompts[::-1], [4, 1, 9, 2, 6])
    assert len(made) == 1 and (engine.cache.k.data_ptr(), engine.cache.v.data_ptr()) == pointers
    assert engine.pool.free == list(range(7))


def test_default_budget_is_device_bytes_over_bytes_per_position(variant, monkeypatch):
    """Without kv_cache_tokens the cache holds DEVICE_DEFAULTS' kv_cache_bytes over the model's bytes per position,
    at most max_sequences x max_length; bfloat16 positions are half the size, so twice as many fit."""
    model, _ = variant("llama")
    n_layers, n_kv, head_dim = model.config.cache_shape
    per_token = 2 * n_layers * n_kv * head_dim * 4
    cpu = engine_module.DEVICE_DEFAULTS["cpu"]
    monkeypatch.setitem(engine_module.DEVICE_DEFAULTS, "cpu", dataclasses.replace(cpu, kv_cache_bytes=100 * per_token))
    assert Engine(model, max_length=64).kv_cache_tokens == 100
    assert Engine(model, max_length=64, dtype=torch.bfloat16).kv_cache_tokens == 200
    assert Engine(model, max_length=64, max_sequences=1).kv_cache_tokens == 64


def test_admission_waits_for_free_blocks_and_refuses_what_never_fits(variant):
    """With room for one reservation, the second sequence waits (holding nothing) until the first finishes and
    gives its blocks back, then runs and gets its tokens alone; a reservation larger than the whole budget is
    refused at add, naming kv_cache_tokens."""
    model, prompts = variant("gpt2")
    p0, p1 = prompts[3], prompts[2]
    engine = Engine(model, max_length=64, kv_cache_tokens=len(p0) + 6, block_size=4)
    alone = [engine.generate([p], 6)[0] for p in (p0, p1)]
    engine.add("a", p0, 6)
    engine.add("b", p1, 6)
    seen = []
    while engine.has_work():
        events = engine.step()
        seen.append(([s.seq_id for s in engine.running], [s.seq_id for s in engine.waiting], events))
    assert [running for running, _, _ in seen[:6]] == [["a"]] * 5 + [["b"]]
    assert all(waiting == ["b"] for _, waiting, _ in seen[:5])
    tokens = {k: [e.token_id for _, _, events in seen for e in events if e.seq_id == k] for k in "ab"}
    assert [tokens["a"], tokens["b"]] == alone
    with pytest.raises(ValueError, match=f"kv_cache_tokens={len(p0) + 6}"):
        engine.add("c", p0, 7)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral-window", "qwen2-tied-windows"])
@pytest.mark.parametrize("budget", [1000, 7, 3])
def test_packed_and_chunked_prefill_equal_full_recompute(variant, name, budget):
    """Greedy tokens of mixed-length prompts equal a plain full-recompute loop whether the prompts are prefilled
    packed together (budget 1000: one pass), in chunks packed with other prompts' (7), or a few tokens at a time
    over many steps (3), with sliding windows crossing chunk boundaries."""
    model, prompts = variant(name)
    prompts = prompts + [prompts[3] + prompts[2]]
    engine = Engine(model, max_length=64, max_batch_tokens=budget)
    assert engine.generate(prompts, 8) == [full_recompute(model, p, 8) for p in prompts]


def test_chunked_prefill_keeps_dynamic_rope_of_the_whole_prompt(variant):
    """Dynamic NTK: a prompt past max_position_embeddings=16 prefilled in chunks (and packed with others) gets
    the tokens of one prefill pass over it, because every chunk is rotated for the prompt's full length."""
    model, prompts = variant("llama-dynamic")
    prompts = [prompts[3] + prompts[2], prompts[0], prompts[3]]
    assert len(prompts[0]) > 16
    whole = [Engine(model, max_length=64).generate([p], 6)[0] for p in prompts]
    assert Engine(model, max_length=64, max_batch_tokens=5).generate(prompts, 6) == whole


@pytest.mark.parametrize("name", ["llama", "mistral-window"])
def test_a_prompt_of_thousands_of_tokens(variant, name):
    """A 3,000-token prompt on a model with 8,192 positions (and a 300-position window for Mistral), prefilled in
    512-token chunks while a short prompt runs beside it, gives the full-recompute loop's tokens."""
    model, prompts = variant(
        name, max_position_embeddings=8192, **({"sliding_window": 300} if "window" in name else {})
    )
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(3, model.config.vocab_size, (3000,), generator=g).tolist()
    engine = Engine(model, max_batch_tokens=512)
    assert engine.max_length == 8192
    out = engine.generate([prompts[2], long_prompt], 4)
    assert out == [full_recompute(model, prompts[2], 4), full_recompute(model, long_prompt, 4)]


@pytest.mark.parametrize("name", ["llama", "mistral-window"])
def test_scattered_blocks_equal_the_full_pass(variant, name):
    """A sequence whose blocks are neither consecutive nor in order (its keys gathered from several slices of
    the cache) gets the full forward pass's logits: a prefill chunk, a second chunk, then one token at a time."""
    model, _ = variant(name)
    ids = torch.randint(3, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    cache = layers.KVCache(*model.config.cache_shape, tokens=40, block_size=4, device="cpu", dtype=torch.float32)
    blocks = (7, 2, 5, 0, 9, 3)
    out = []
    with torch.no_grad():
        full = model(ids)
        for start, n in [(0, 6), (6, 5)] + [(t, 1) for t in range(11, 23)]:
            rows = layers.KVRows(cache, [layers.Segment(0, 0, n, start, blocks)])
            out.append(model(ids[:, start : start + n], torch.arange(start, start + n)[None], cache=rows))
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-4, rtol=1e-4)


def test_block_pool_prefers_one_run_and_falls_back_to_the_longest():
    """take(k) gives the shortest free run of k consecutive blocks (best fit); with none long enough, blocks of
    the longest runs first; give() returns them."""
    pool = BlockPool(12)
    a, b, c = pool.take(3), pool.take(2), pool.take(4)
    assert (a, b, c) == ((0, 1, 2), (3, 4), (5, 6, 7, 8))
    pool.give(b)  # free: 3-4 and 9-11
    assert pool.take(2) == (3, 4)  # the run of 2, not the run of 3
    pool.give(a)  # free: 0-2 and 9-11
    assert pool.take(3) == (0, 1, 2)
    pool.give([1])  # free: 1 and 9-11
    assert pool.take(4) == (9, 10, 11, 1) and len(pool) == 0
    with pytest.raises(ValueError, match="1 blocks asked for, 0 free"):
        pool.take(1)

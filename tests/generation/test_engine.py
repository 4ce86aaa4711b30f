"""The continuous-batching engine: greedy parity with transformers' generate, sequences joining and leaving,
stop conditions, KV-budget admission, packed and chunked prefill, per-row decode attention, abort, and clear
errors. tests/generation/test_kv_cache.py covers the cache itself: its size, blocks and full-recompute parity."""

import pytest
import torch
import transformers

from pipelines.generation.engine import Engine, TokenEvent
from pipelines.models import gpt2, llama
from tests.checkpoints import PROMPTS, load_ours, load_reference

N = 12  # new tokens per prompt
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
VARIANTS = {
    "gpt2": ("gpt2", gpt2.GPT2LMHeadModel, {}),
    "llama": ("llama", llama.LlamaForCausalLM, {}),
    "llama-linear": ("llama", llama.LlamaForCausalLM, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # Dynamic NTK: transformers rescales the rotary base at every step from the sequence length so far, and the
    # keys already cached keep the rotation they got, so generate() differs from one full forward over the same
    # tokens once past max_position_embeddings. The engine does what generate does, per sequence; the prompts
    # plus 12 new tokens run past max_position_embeddings=16.
    "llama-dynamic": (
        "llama",
        llama.LlamaForCausalLM,
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    ),
    "llama-llama3": ("llama", llama.LlamaForCausalLM, {"rope_scaling": LLAMA3}),
    "mistral-window": ("mistral", llama.MistralForCausalLM, {"sliding_window": 5}),
    "qwen2-tied-windows": (
        "qwen2",
        llama.Qwen2ForCausalLM,
        {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
}


class Setup:
    """A checkpoint folder, our model, the tokenized PROMPTS and the eos id of one variant."""

    def __init__(self, checkpoint, name):
        family, cls, options = VARIANTS[name]
        self.path = checkpoint(family, "causal-lm", **options)
        self.model = load_ours(self.path, cls)
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self.prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        self.eos = transformers.AutoConfig.from_pretrained(self.path).eos_token_id

    def engine(self, **options) -> Engine:
        return Engine(self.model, **{"max_length": 64, **options})

    def alone(self, n=N, eos=()) -> list[list[int]]:
        """Each prompt through its own engine run: the reference for batched runs."""
        engine = self.engine()
        return [engine.generate([p], n, eos_token_ids=eos)[0] for p in self.prompts]


@pytest.fixture(scope="module")
def setups(checkpoint):
    made = {}

    def get(name):
        if name not in made:
            made[name] = Setup(checkpoint, name)
        return made[name]

    return get


def _hf_generate(path, prompt, n, eos) -> list[int]:
    # A fresh model per prompt: transformers' dynamic rotary embedding keeps state between generate calls.
    model = load_reference(path, "causal-lm")
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[0, len(prompt) :].tolist()


def _run(engine: Engine, plan: dict[int, list]) -> dict:
    """Step the engine to the end; plan[i] = [(seq_id, prompt, max_new_tokens, options)] added before step i.
    Returns {seq_id: [events]}, checking that each sequence ends with exactly one finished event."""
    events: dict = {}
    i = 0
    while engine.has_work() or any(k >= i for k in plan):
        for seq_id, prompt, n, options in plan.get(i, []):
            engine.add(seq_id, prompt, n, **options)
            events[seq_id] = []
        for event in engine.step():
            assert not events[event.seq_id] or not events[event.seq_id][-1].finished
            events[event.seq_id].append(event)
        i += 1
    assert all(e[-1].finished and not any(x.finished for x in e[:-1]) for e in events.values() if e)
    return events


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_matches_transformers_generate(setups, name):
    """One prompt at a time, greedy tokens equal transformers' generate(do_sample=False) (eos stops both)."""
    setup = setups(name)
    engine = setup.engine()
    for prompt in setup.prompts:
        assert engine.generate([prompt], N, eos_token_ids=[setup.eos])[0] == _hf_generate(
            setup.path, prompt, N, setup.eos
        )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batch_equals_one_at_a_time(setups, name):
    """Prompts of different lengths and max_new_tokens in one run equal each alone. All five are prefilled in one
    packed pass (one row of every prompt's tokens, no padding), and the ones that finish early give their blocks
    back while the others decode on."""
    setup = setups(name)
    limits = [12, 3, 9, 1, 6]
    alone = [tokens[:n] for tokens, n in zip(setup.alone(), limits)]
    shapes = []
    handle = setup.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        assert setup.engine().generate(setup.prompts, limits) == alone
    finally:
        handle.remove()
    assert shapes[0] == (1, sum(map(len, setup.prompts)))
    assert [b for b, _ in shapes[1:]] == sorted((b for b, _ in shapes[1:]), reverse=True) and shapes[-1] == (1, 1)


@pytest.mark.parametrize("name", ["gpt2", "mistral-window", "llama-dynamic"])
def test_sequences_join_mid_generation(setups, name):
    """Sequences added while others are mid-generation get the same tokens as alone."""
    setup = setups(name)
    alone = setup.alone()
    p = setup.prompts
    plan = {0: [(0, p[0], N, {}), (1, p[3], N, {})], 3: [(2, p[1], N, {}), (3, p[4], N, {})], 5: [(4, p[2], N, {})]}
    events = _run(setup.engine(), plan)
    assert [[e.token_id for e in events[i]] for i in range(5)] == [alone[0], alone[3], alone[1], alone[4], alone[2]]
    assert all(events[i][-1].finish_reason == "length" for i in range(5))


def test_eos_stops_one_sequence_and_the_others_go_on(setups):
    """An eos id that greedy produces stops the sequences that produce it (emitted as their last token, reason
    'stop'); the others run to max_new_tokens (reason 'length')."""
    setup = setups("llama")
    full = setup.alone()
    candidates = [t for t in full[0] if any(t not in other for other in full[1:])]
    assert candidates, "no token of the first sequence is missing from the others"
    eos = candidates[0]
    expected = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in full]
    events = _run(setup.engine(), {0: [(i, p, N, {"eos_token_ids": [eos]}) for i, p in enumerate(setup.prompts)]})
    assert [[e.token_id for e in events[i]] for i in range(len(full))] == expected
    reasons = [events[i][-1].finish_reason for i in range(len(full))]
    assert reasons == ["stop" if eos in tokens else "length" for tokens in full]
    assert "length" in reasons and reasons[0] == "stop"


def test_stop_callable(setups):
    """stop(generated_ids) ends a sequence with reason 'stop' right after the token that made it true."""
    setup = setups("gpt2")
    full = setup.alone()[2]
    target = full[3:5]
    seen = []

    def stop(generated):
        seen.append(list(generated))
        return generated[-2:] == target

    events = _run(setup.engine(), {0: [("a", setup.prompts[2], N, {"stop": stop})]})["a"]
    first = next(i for i in range(1, len(full)) if full[i - 1 : i + 1] == target)
    assert [e.token_id for e in events] == full[: first + 1] and events[-1].finish_reason == "stop"
    assert seen == [full[: i + 1] for i in range(first + 1)]


def test_kv_budget_runs_sequences_in_waves(setups):
    """With a budget of the two largest reservations (in blocks of 4), sequences run in waves of at most two, the
    next one admitted only when a finished one gives its blocks back; the blocks held never exceed the cache's
    (kv_cache_tokens rounded up to a block); tokens are identical to each alone."""
    setup = setups("llama")
    blocks = sorted(-(-(len(p) + N) // 4) for p in setup.prompts)
    engine = setup.engine(kv_cache_tokens=4 * (blocks[-1] + blocks[-2]), block_size=4)
    for i, p in enumerate(setup.prompts):
        engine.add(i, p, N)
    out, most = {i: [] for i in range(len(setup.prompts))}, 0
    while engine.has_work():
        for event in engine.step():
            out[event.seq_id].append(event.token_id)
        held = [len(s.blocks) for s in engine.running]
        assert held == [-(-s.reserved // 4) for s in engine.running]
        assert sum(held) + len(engine.pool) == engine.cache.blocks == blocks[-1] + blocks[-2]
        most = max(most, len(engine.running))
    assert list(out.values()) == setup.alone()
    assert most == 2


def test_max_sequences_and_batch_token_budget(setups):
    """max_sequences caps the admitted sequences; max_batch_tokens caps the tokens of each packed prefill pass (one
    row), so the longest prompt is prefilled in chunks over several steps while the others decode; the tokens
    equal each prompt alone."""
    setup = setups("qwen2-tied-windows")
    longest = max(len(p) for p in setup.prompts)
    budget = longest // 3 + 1  # the longest prompt needs three passes
    shapes = []
    handle = setup.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        engine = setup.engine(max_sequences=3, max_batch_tokens=budget)
        for i, p in enumerate(setup.prompts):
            engine.add(i, p, N)
        out, most = {i: [] for i in range(len(setup.prompts))}, 0
        while engine.has_work():
            for event in engine.step():
                out[event.seq_id].append(event.token_id)
            most = max(most, len(engine.running))
    finally:
        handle.remove()
    assert list(out.values()) == setup.alone()
    assert most == 3
    prefills = [t for b, t in shapes if b == 1 and t > 1]
    assert max(prefills) <= budget and sum(prefills) >= sum(map(len, setup.prompts)) - len(setup.prompts)


def test_a_long_prompt_is_chunked_while_others_decode(setups):
    """A prompt longer than max_batch_tokens is prefilled over several steps while a running sequence decodes a
    token at every one of them; its first token comes with its last chunk; both equal their tokens alone."""
    setup = setups("mistral-window")
    p = setup.prompts
    long_prompt = p[3] + p[2] + p[3]
    engine = setup.engine(max_batch_tokens=8)
    engine.add("short", p[4], N)
    engine.step()  # prefills "short": its first token
    engine.add("long", long_prompt, 4)
    steps = []
    while engine.has_work():
        steps.append([(e.seq_id, e.token_id) for e in engine.step()])
    chunks = -(-len(long_prompt) // 8)
    assert [len(s) for s in steps[: chunks - 1]] == [1] * (chunks - 1)  # "short" decodes, "long" still prefills
    assert [seq for seq, _ in steps[chunks - 1]] == ["short", "long"]
    assert [t for s in steps for seq, t in s if seq == "long"] == engine.generate([long_prompt], 4)[0]
    assert [t for s in steps for seq, t in s if seq == "short"][chunks - 1 :] == setup.alone()[4][chunks:]


def test_lm_head_runs_only_at_needed_positions(setups):
    """Prefill and decode compute logits for one position per sequence, never for the whole prompt: the packed
    prefill (one row) at each prompt's last token, each decode step at its one token per row."""
    setup = setups("gpt2")
    shapes = []
    handle = setup.model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        setup.engine().generate(setup.prompts, 4)
    finally:
        handle.remove()
    C, n = setup.model.config.n_embd, len(setup.prompts)
    assert shapes == [(1, n, C)] + [(n, 1, C)] * 3


def test_decode_attends_to_each_rows_real_length(setups, monkeypatch):
    """A decode step attends row by row to exactly that row's cached positions (not the longest row's), and the
    keys and values it reads are views of the cache (no gather or copy): prompts of very different lengths."""
    setup = setups("llama")
    engine = setup.engine()
    for i, p in enumerate(setup.prompts):
        engine.add(i, p, 3)
    engine.step()  # the packed prefill: a first token each
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **options):
        calls.append((k.shape[2], k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr()))
        return sdpa(q, k, v, **options)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    engine.step()
    n_layers = setup.model.config.num_hidden_layers
    expected = [len(p) + 1 for p in setup.prompts] * n_layers  # prompt + first token, in row order per layer
    assert [length for length, _, _ in calls] == expected
    assert {(k, v) for _, k, v in calls} == {
        (engine.cache.k.untyped_storage().data_ptr(), engine.cache.v.untyped_storage().data_ptr())
    }


def test_abort(setups):
    """abort() drops a running or waiting sequence without events; the others are unaffected; ids are reusable."""
    setup = setups("gpt2")
    alone = setup.alone()
    engine = setup.engine(max_sequences=2)
    p = setup.prompts
    for i in range(3):
        engine.add(i, p[i], N)
    out = {i: [] for i in range(3)}
    for _ in range(3):
        for event in engine.step():
            out[event.seq_id].append(event.token_id)
    assert engine.abort(0) and engine.abort(2) and not engine.abort("unknown")  # 0 running, 2 still waiting
    assert not engine.abort(0)
    while engine.has_work():
        for event in engine.step():
            out[event.seq_id].append(event.token_id)
    assert out[1] == alone[1] and out[0] == alone[0][:3] and out[2] == []
    assert engine.generate([p[2]], N) == [alone[2]]


def test_context_limit_ends_with_length(setups):
    """A sequence stops at max_length tokens in all (prompt + generated) with reason 'length'."""
    setup = setups("gpt2")
    prompt = setup.prompts[3]
    engine = setup.engine(max_length=len(prompt) + 3)
    events = _run(engine, {0: [("a", prompt, 50, {})]})["a"]
    assert len(events) == 3 and events[-1] == TokenEvent("a", events[-1].token_id, True, "length")


def test_custom_select_sees_histories_and_states(setups):
    """select gets float32 logits (B, V), each row's prompt + generated ids, and the sampler states given to add."""
    setup = setups("llama")
    calls = []

    def select(logits, histories, states):
        calls.append((logits.dtype, logits.shape, [list(h) for h in histories], list(states)))
        return logits.argmin(dim=-1)

    engine = setup.engine(select=select)
    out = engine.generate(setup.prompts[:2], 3, sampler_states=["s0", "s1"])
    assert all(dtype == torch.float32 and shape[1] == setup.model.config.vocab_size for dtype, shape, _, _ in calls)
    history = {}
    for _, _, histories, states in calls:
        for h, s in zip(histories, states):
            i = int(s[1])
            assert h == setup.prompts[i] + out[i][: len(h) - len(setup.prompts[i])]
            history[i] = len(h)
    assert history == {0: len(setup.prompts[0]) + 2, 1: len(setup.prompts[1]) + 2}


def test_half_precision_cache(setups):
    """A bfloat16 model gets a bfloat16 cache and generates the requested number of tokens."""
    setup = setups("qwen2-tied-windows")
    model = load_ours(setup.path, llama.Qwen2ForCausalLM).to(torch.bfloat16)
    engine = Engine(model)
    out = engine.generate(setup.prompts, 5)
    assert engine.cache.k.dtype == torch.bfloat16 and [len(o) for o in out] == [5] * len(setup.prompts)


def test_errors_are_clear(setups):
    """Bad requests raise ValueError at add(), naming the limit; nothing is queued."""
    setup = setups("gpt2")
    engine = setup.engine(max_length=16, kv_cache_tokens=20)
    with pytest.raises(ValueError, match="max_length=16"):
        engine.add("long", list(range(3, 19)), 1)
    with pytest.raises(ValueError, match="kv_cache_tokens=20"):
        setup.engine(kv_cache_tokens=20).add("big", list(range(3, 13)), 11)
    with pytest.raises(ValueError, match="empty"):
        engine.add("e", [], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add("z", [3], 0)
    with pytest.raises(ValueError, match="vocab_size=400"):
        engine.add("v", [3, 400], 2)
    engine.add("a", [3, 4], 2)
    with pytest.raises(ValueError, match="already queued"):
        engine.add("a", [5], 2)
    with pytest.raises(ValueError, match="idle engine"):
        engine.generate([[3]], 1)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        setup.engine(max_batch_tokens=0)
    assert len(engine.waiting) == 1


def test_dynamic_rope_changes_generation_past_max_positions(setups):
    """Guards the dynamic-NTK parity test: past max_position_embeddings=16 its tokens differ from plain RoPE's
    for some prompts (same weights), so matching generate() there is a real check."""
    plain, dynamic = setups("llama").alone(), setups("llama-dynamic").alone()
    assert any(a != b for a, b in zip(plain, dynamic)) and plain[0] == dynamic[0]

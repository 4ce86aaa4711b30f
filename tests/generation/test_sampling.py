"""Generation parameters and token selection equal transformers': resolution, processors, seeds, stop strings."""

import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import StopStringCriteria

from pipelines.generation import sampling
from pipelines.generation.sampling import (
    PARAMETERS,
    GenerationParams,
    StopStrings,
    checkpoint_defaults,
    process,
    sampler_state,
    select,
    truncate_at_stop,
)

VOCAB = 40
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Stop! Hammer time, stopping now and then.",
    "Café crème, naïve résumé 😀 okay.",
    "The weather today is sunny, but tomorrow it may rain.",
] * 3


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2 style) with one special token, trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<|end|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def hf_pipeline(bpe):
    """transformers' text-generation pipeline on a tiny random GPT-2 that uses `bpe`: the oracle."""
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>", bos_token="<|end|>")
    config = transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_embd=32, n_head=4, n_layer=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    return transformers.pipeline("text-generation", model=model, tokenizer=hf_tok, device="cpu")


def _reference_resolution(pipe, defaults: dict, user: dict, prompt_length: int):
    """What transformers' pipeline + generate() make of `user` on a model whose generation config is `defaults`."""
    model = pipe.model
    model.generation_config = transformers.GenerationConfig(**defaults)
    kwargs = pipe._prepare_generate_kwargs(dict(user))
    has_default_max = kwargs.get("max_length") is None and model.generation_config.max_length is None
    has_default_min = kwargs.get("min_length") is None and model.generation_config.min_length is None
    config, _ = model._prepare_generation_config(None, **kwargs)
    inputs = torch.zeros(1, prompt_length, dtype=torch.long)
    return model._prepare_generated_length(config, has_default_max, has_default_min, "input_ids", prompt_length, inputs)


RESOLUTION_CASES = [
    ({}, {}),
    ({}, {"do_sample": False}),
    ({}, {"max_length": 30}),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [0, 3]}, {}),  # Llama-3 style config
    ({"do_sample": False}, {}),  # a checkpoint asking for greedy beats the pipeline's sampling default
    ({"max_length": 50}, {}),  # a checkpoint max_length turns off the pipeline's max_new_tokens
    ({"max_new_tokens": 40}, {"max_length": 30}),  # max_new_tokens wins over max_length, whoever set them
    ({}, {"max_new_tokens": 5, "min_new_tokens": 3, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "top_k": 0}),
    ({"temperature": 0.2, "top_k": 7}, {"do_sample": False}),
    ({}, {"num_return_sequences": 2, "top_p": 0.5, "temperature": 1.5}),
    ({}, {"min_length": 12, "max_new_tokens": 9}),
]


@pytest.mark.parametrize("defaults,user", RESOLUTION_CASES)
def test_resolution_matches_transformers(hf_pipeline, defaults, user):
    """User over checkpoint over pipeline defaults over global defaults, sampling defaults only while sampling."""
    prompt_length = 7
    ref = _reference_resolution(hf_pipeline, defaults, user, prompt_length)
    ours = GenerationParams.resolve(defaults, prompt_length, **user)
    assert ours.do_sample == ref.do_sample
    assert ours.new_tokens(prompt_length) == ref.max_length - prompt_length
    assert ours.min_tokens(prompt_length) == max(ref.min_length - prompt_length, 0)
    eos = ref.eos_token_id
    assert ours.eos_token_id == (tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ())
    for name in ("repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "min_new_tokens"):
        assert getattr(ours, name) == getattr(ref, name), name
    if ref.do_sample:  # sampling parameters only matter (and are only defaulted) while sampling
        for name in ("temperature", "top_k", "top_p"):
            assert getattr(ours, name) == pytest.approx(getattr(ref, name)), name


def test_generate_defaults_without_the_pipeline(hf_pipeline):
    """With no pipeline defaults, transformers' global max_length=20 counts new tokens, capped at the context."""
    params = GenerationParams.resolve({}, pipeline_defaults={}, max_context=64)
    assert not params.do_sample and params.max_new_tokens is None
    assert params.new_tokens(7) == 20 and params.new_tokens(50) == 14
    hf_pipeline.model.generation_config = transformers.GenerationConfig()
    ref = hf_pipeline.model._prepare_generated_length(
        hf_pipeline.model._prepare_generation_config(None)[0], True, True, "input_ids", 50, torch.zeros(1, 50)
    )
    assert ref.max_length - 50 == 14


def test_checkpoint_defaults(tmp_path, caplog, monkeypatch):
    """generation_config.json when present, else config.json; unknown keys ignored, unsupported ones logged once."""
    monkeypatch.setattr(sampling, "_WARNED", set())
    (tmp_path / "config.json").write_text('{"eos_token_id": 5, "n_positions": 64}')
    assert GenerationParams.resolve(checkpoint_defaults(tmp_path)).eos_token_id == (5,)
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "num_beams": 1, "use_cache": true}')
    params = GenerationParams.resolve(checkpoint_defaults(tmp_path))
    assert params.eos_token_id == () and not params.do_sample
    assert not caplog.records  # num_beams=1 changes nothing
    for _ in range(2):
        GenerationParams.resolve({"num_beams": 4, "length_penalty": 2.0})
    assert [r.getMessage() for r in caplog.records] == [
        "the checkpoint's generation config sets length_penalty=2.0, num_beams=4, which this implementation does not "
        "support; ignored"
    ]


# -- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "user,error,message",
    [
        (
            {"max_new_token": 5},
            ValueError,
            r"unknown generation parameter 'max_new_token'; did you mean 'max_new_tokens'",
        ),
        ({"foo": 1}, ValueError, r"unknown generation parameter 'foo'; known: max_new_tokens, max_length"),
        ({"num_beams": 4}, ValueError, r"'num_beams' is not supported here; supported: max_new_tokens"),
        ({"max_new_tokens": 0}, ValueError, r"max_new_tokens must be >= 1 and <= 1048576, got 0"),
        ({"max_new_tokens": -3}, ValueError, r"max_new_tokens must be >= 1 .*got -3"),
        ({"max_new_tokens": 10**9}, ValueError, r"max_new_tokens must be >= 1 and <= 1048576, got 1000000000"),
        ({"max_new_tokens": 5.0}, TypeError, r"max_new_tokens must be an integer, got 5.0"),
        ({"max_new_tokens": True}, TypeError, r"max_new_tokens must be an integer, got True"),
        ({"temperature": -0.5}, ValueError, r"temperature must be >= 0.0, got -0.5"),
        ({"temperature": "hot"}, TypeError, r"temperature must be a number, got 'hot'"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be a finite number, got nan"),
        ({"temperature": 0}, ValueError, r"temperature=0 with do_sample=True.*set do_sample=False"),
        ({"top_p": 1.5}, ValueError, r"top_p must be >= 0.0 and <= 1.0, got 1.5"),
        ({"top_p": -0.1}, ValueError, r"top_p must be >= 0.0 and <= 1.0, got -0.1"),
        ({"top_k": -1}, ValueError, r"top_k must be >= 0, got -1"),
        ({"top_k": 2.5}, TypeError, r"top_k must be an integer, got 2.5"),
        ({"repetition_penalty": 0}, ValueError, r"repetition_penalty must be > 0.0, got 0"),
        ({"repetition_penalty": -1.0}, ValueError, r"repetition_penalty must be > 0.0, got -1.0"),
        ({"do_sample": 1}, TypeError, r"do_sample must be True or False, got 1"),
        ({"no_repeat_ngram_size": -2}, ValueError, r"no_repeat_ngram_size must be >= 0, got -2"),
        ({"num_return_sequences": 0}, ValueError, r"num_return_sequences must be >= 1, got 0"),
        ({"num_return_sequences": 3, "do_sample": False}, ValueError, r"num_return_sequences=3 needs sampling"),
        ({"eos_token_id": "</s>"}, TypeError, r"eos_token_id must be a token id or a list of token ids"),
        ({"eos_token_id": [1, -2]}, TypeError, r"eos_token_id must be .*got \[1, -2\]"),
        ({"stop_strings": ["ok", 3]}, TypeError, r"stop_strings must be a string or a list of strings"),
        ({"stop_strings": ["ok", ""]}, ValueError, r"stop_strings must not contain an empty string"),
        ({"seed": "42"}, TypeError, r"seed must be an integer"),
        ({"min_new_tokens": -1}, ValueError, r"min_new_tokens must be >= 0, got -1"),
    ],
)
def test_validation_errors(user, error, message):
    """Each bad generation parameter is refused at resolve time with a message naming it and its allowed range."""
    with pytest.raises(error, match=message):
        GenerationParams.resolve({}, **user)


def test_length_errors_name_both_numbers():
    """Over the context: the prompt, the request and the context are all in the message; defaults shrink instead."""
    with pytest.raises(
        ValueError,
        match=r"prompt \(50 tokens\) plus max_new_tokens=20 makes 70 tokens, more than "
        r"the model's context of 64; ask for at most 14",
    ):
        GenerationParams.resolve({}, 50, 64, max_new_tokens=20)
    with pytest.raises(ValueError, match=r"the prompt has 64 tokens but the model's context is 64 tokens"):
        GenerationParams.resolve({}, 64, 64)
    with pytest.raises(ValueError, match=r"the prompt has 30 tokens but max_length=25 counts the prompt too"):
        GenerationParams.resolve({}, 30, max_length=25)
    with pytest.raises(ValueError, match=r"max_length=10000000000 asks for 9999999970 new tokens, more than the limit"):
        GenerationParams.resolve({}, 30, max_length=10**10)
    assert GenerationParams.resolve({}, 50, 64).new_tokens(50) == 14  # the pipeline's 256, shortened
    assert GenerationParams.resolve({"max_new_tokens": 100}, 50, 64).new_tokens(50) == 14  # the checkpoint's too


def test_checkpoint_values_are_validated_and_named():
    """A bad value from generation_config.json is refused naming the checkpoint as its source."""
    with pytest.raises(ValueError, match=r"top_p must be >= 0.0 and <= 1.0, got 2.0 \(from the checkpoint's gen"):
        GenerationParams.resolve({"top_p": 2.0, "do_sample": True})


def test_parameters_are_frozen_and_checked_on_construction():
    """GenerationParams is immutable, checks its fields when built, and covers every documented parameter."""
    params = GenerationParams(max_new_tokens=3)
    with pytest.raises(AttributeError):
        params.top_k = 3
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        GenerationParams(top_k=-1)
    assert set(PARAMETERS) <= set(GenerationParams.__dataclass_fields__)


# -- processors against transformers -------------------------------------------------------------------------------
def _reference_scores(logits, history, params: GenerationParams, prompt_length):
    """transformers' processors for one row, in the order of GenerationMixin._get_logits_processor."""
    procs = []
    if params.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        procs.append(lp.NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.min_new_tokens and params.eos_token_id:
        eos = list(params.eos_token_id)
        procs.append(lp.MinNewTokensLengthLogitsProcessor(prompt_length, params.min_new_tokens, eos))
    if params.do_sample:
        if params.temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(lp.TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(params.top_p))
    return lp.LogitsProcessorList(procs)(torch.tensor([history]), logits[None].clone())[0]


ROW_PARAMS = [
    GenerationParams(max_new_tokens=9, repetition_penalty=1.3),
    GenerationParams(max_new_tokens=9, repetition_penalty=0.7, no_repeat_ngram_size=2),
    GenerationParams(max_new_tokens=9, no_repeat_ngram_size=1, min_new_tokens=4, eos_token_id=(3, 5)),
    GenerationParams(max_new_tokens=9, do_sample=True, temperature=0.7),
    GenerationParams(max_new_tokens=9, do_sample=True, top_k=5, top_p=0.8, repetition_penalty=1.2),
    GenerationParams(max_new_tokens=9, do_sample=True, temperature=1.7, top_k=0, top_p=0.6, no_repeat_ngram_size=3),
    GenerationParams(max_new_tokens=9, do_sample=True, top_k=100, min_new_tokens=2, eos_token_id=(1,)),
    GenerationParams(max_new_tokens=9, do_sample=True, temperature=0.3, top_p=0.0),
]


def test_processors_match_transformers():
    """Every processor and warper, rows with different parameters and history lengths in one batch, within 1e-6."""
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for trial in range(20):
        logits = torch.randn(len(ROW_PARAMS), VOCAB, generator=gen) * 3
        histories = [[rng.randrange(8) for _ in range(rng.randrange(3, 15))] for _ in ROW_PARAMS]
        prompt_lengths = [rng.randrange(1, len(h) + 1) for h in histories]
        states = [sampler_state(p, n) for p, n in zip(ROW_PARAMS, prompt_lengths)]
        got = process(logits, histories, states)
        for i, params in enumerate(ROW_PARAMS):
            want = _reference_scores(logits[i], histories[i], params, prompt_lengths[i])
            torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-6, msg=f"trial {trial} row {i}")


def test_top_p_boundary_matches_transformers():
    """Probabilities 1/4, 1/4, 1/2 are exact: top_p=0.5 sits on a cumulative sum, where < and <= differ."""
    logits = torch.tensor([[0.0, 0.0, float(torch.log(torch.tensor(2.0)))] + [-float("inf")] * 3])
    for top_p in (0.5, 0.75, 0.25):
        params = GenerationParams(max_new_tokens=2, do_sample=True, top_p=top_p, top_k=0)
        want = lp.TopPLogitsWarper(top_p)(torch.tensor([[1]]), logits.clone())
        torch.testing.assert_close(process(logits, [[1]], [sampler_state(params, 1)]), want)
    half = GenerationParams(max_new_tokens=2, do_sample=True, top_p=0.5, top_k=0)
    assert process(logits, [[1]], [sampler_state(half, 1)]).isfinite().sum() == 1  # 1/4 + 1/4 <= 1 - 0.5: removed


def test_processors_match_transformers_own_list(hf_pipeline):
    """The order is transformers' own: its _get_logits_processor list for a config using every parameter."""
    model = hf_pipeline.model
    user = dict(
        do_sample=True,
        temperature=0.8,
        top_k=6,
        top_p=0.7,
        repetition_penalty=1.4,
        no_repeat_ngram_size=2,
        min_new_tokens=3,
        eos_token_id=[2, 4],
    )
    model.generation_config = transformers.GenerationConfig()
    config, _ = model._prepare_generation_config(None, **user)
    model._prepare_special_tokens(config, device="cpu")
    history = [1, 2, 3, 1, 2, 5, 6, 2, 2]
    processors = model._get_logits_processor(config, input_ids_seq_length=6, device="cpu")
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    want = processors(torch.tensor([history]), logits.clone())
    params = GenerationParams.resolve({}, **user)
    torch.testing.assert_close(process(logits, [history], [sampler_state(params, 6)]), want, atol=1e-6, rtol=1e-6)


# -- selection -----------------------------------------------------------------------------------------------------
def test_seeded_sampling_equals_transformers_draws():
    """One sequence with seed s draws what transformers draws after torch.manual_seed(s)."""
    params = GenerationParams(max_new_tokens=8, do_sample=True, top_k=10, temperature=0.9, seed=1234)
    state = sampler_state(params, 2)
    history, gen = [4, 5], torch.Generator().manual_seed(7)
    steps = [torch.randn(1, VOCAB, generator=gen) for _ in range(8)]
    ours = []
    for logits in steps:
        ours.append(int(select(logits, [history], [state])[0]))
        history.append(ours[-1])
    torch.manual_seed(1234)
    history, ref = [4, 5], []
    warpers = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(0.9), lp.TopKLogitsWarper(10)])
    for logits in steps:
        scores = warpers(torch.tensor([history]), logits.clone())
        ref.append(int(torch.multinomial(scores.softmax(-1), 1)[0, 0]))
        history.append(ref[-1])
    assert ours == ref


def _run(params_list, steps=6):
    """Generate `steps` tokens for each (params, seed stream) row together; each row's logits depend on its history."""
    states = [sampler_state(p, 2, index=0) for p in params_list]
    histories = [[1, 2] for _ in params_list]
    for _ in range(steps):
        logits = torch.stack(
            [torch.randn(VOCAB, generator=torch.Generator().manual_seed(sum(h) * 31 + len(h))) for h in histories]
        )
        for h, t in zip(histories, select(logits, histories, states).tolist()):
            h.append(t)
    return histories


def test_seed_gives_same_tokens_whatever_shares_the_batch():
    """A seeded sequence's tokens depend on its seed only, not on its batch neighbours or its row."""
    a = GenerationParams(max_new_tokens=9, do_sample=True, seed=11, top_p=0.9)
    b = GenerationParams(max_new_tokens=9, do_sample=True, seed=12, temperature=1.5)
    c = GenerationParams(max_new_tokens=9, repetition_penalty=1.2)
    alone = _run([a])[0]
    assert _run([b, a, c])[1] == alone
    assert _run([c, c, a])[2] == alone
    assert _run([b])[0] != alone  # a different seed gives different tokens (so the test can fail)


def test_return_sequences_get_distinct_generators():
    """Each returned sequence draws from its own generator derived from the seed; negative seeds map as torch.manual_seed does."""
    params = GenerationParams(max_new_tokens=9, do_sample=True, seed=5, num_return_sequences=3)
    draws = [torch.rand(4, generator=sampler_state(params, 1, index=i).generator).tolist() for i in range(3)]
    assert draws[0] == torch.rand(4, generator=torch.Generator().manual_seed(5)).tolist()
    assert draws[0] != draws[1] != draws[2]
    negative = GenerationParams(max_new_tokens=9, do_sample=True, seed=-7)  # remapped as torch.manual_seed does
    assert torch.equal(
        torch.rand(3, generator=sampler_state(negative, 1).generator),
        torch.rand(3, generator=torch.Generator().manual_seed(-7)),
    )
    torch.manual_seed(3)
    unseeded = GenerationParams(max_new_tokens=9, do_sample=True)
    first = torch.rand(2, generator=sampler_state(unseeded, 1).generator)
    torch.manual_seed(3)
    assert torch.equal(first, torch.rand(2, generator=sampler_state(unseeded, 1).generator))  # global seed rules


def test_top_k_one_and_top_p_zero_equal_greedy():
    """Sampling with top_k=1 or top_p=0 picks exactly the greedy tokens, penalties included."""
    gen, rng = torch.Generator().manual_seed(2), random.Random(2)
    greedy = GenerationParams(max_new_tokens=5, repetition_penalty=1.5, no_repeat_ngram_size=2)
    top_k1 = GenerationParams(
        max_new_tokens=5,
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        do_sample=True,
        top_k=1,
        temperature=2.0,
        seed=3,
    )
    top_p0 = GenerationParams(
        max_new_tokens=5, repetition_penalty=1.5, no_repeat_ngram_size=2, do_sample=True, top_p=0.0
    )
    for _ in range(30):
        logits = torch.randn(1, VOCAB, generator=gen).expand(3, -1)
        history = [rng.randrange(VOCAB) for _ in range(6)]
        states = [sampler_state(p, 3) for p in (greedy, top_k1, top_p0)]
        tokens = select(logits, [history] * 3, states).tolist()
        assert tokens[0] == tokens[1] == tokens[2]


def test_min_new_tokens_holds_back_eos():
    """The end-of-sequence token cannot be chosen before min_new_tokens tokens, and is chosen right after."""
    params = GenerationParams(max_new_tokens=6, min_new_tokens=3, eos_token_id=(7,))
    state, history = sampler_state(params, 2), [1, 2]
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 10.0
    for _ in range(4):
        history.append(int(select(logits, [history], [state])[0]))
    assert history[2:5] != [7, 7, 7] and 7 not in history[2:5] and history[5] == 7


def test_finish_reasons(bpe):
    """finish_reason is None while running, then 'stop' for eos or a stop string and 'length' at max_new_tokens."""
    stop = StopStrings(bpe, ["stop"])
    params = GenerationParams(max_new_tokens=3, eos_token_id=(0,), stop_strings=("stop",))
    state = sampler_state(params, 2, stop=stop)
    prompt = [5, 6]
    assert state.finish_reason(prompt) is None  # nothing generated yet
    assert state.finish_reason(prompt + [9]) is None
    assert state.finish_reason(prompt + [9, 0]) == "stop"
    assert state.finish_reason(prompt + [9, 9, 9]) == "length"
    assert state.finish_reason(prompt + bpe.encode(" stop").ids[:3]) == "stop"
    with pytest.raises(ValueError, match="need a StopStrings"):
        sampler_state(params, 2)


def test_select_checks_shapes():
    """select() refuses logits whose batch does not match its histories and states."""
    state = sampler_state(GenerationParams(max_new_tokens=2), 1)
    with pytest.raises(ValueError, match=r"expected logits \(B, V\) with B histories and B states"):
        select(torch.zeros(2, VOCAB), [[1]], [state])


# -- stop strings ---------------------------------------------------------------------------------------------------
def test_stop_strings_match_transformers_criteria(bpe):
    """On random token sequences (stop strings planted across token boundaries, partial UTF-8 bytes, special
    tokens), StopStrings fires exactly where transformers' StopStringCriteria does."""
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>")
    ascii_ids = [i for t, i in bpe.get_vocab().items() if t.isascii()]
    rng, vocab = random.Random(0), bpe.get_vocab_size()
    for stops in (["stop"], ["op", "Ham"], ["é", "😀"], ["<|end|>"], [" the", "x y"]):
        ours, ref, hits = StopStrings(bpe, stops), StopStringCriteria(hf_tok, stops), 0
        for trial in range(120):
            ids = [rng.choice(ascii_ids) if trial % 2 else rng.randrange(vocab) for _ in range(10)]
            if trial % 3 == 0:
                ids = ids[:5] + bpe.encode(rng.choice(["xx", "a "]) + stops[0] + rng.choice(["", "ping", "x"])).ids
            for n in range(1, len(ids) + 1):
                want = bool(ref(torch.tensor([ids[:n]]), None)[0])
                assert ours(ids[:n]) == want, (stops, [bpe.id_to_token(i) for i in ids[:n]])
                hits += want
        assert hits > 20  # stop strings did occur


def test_stop_string_across_tokens_and_not_in_prompt(bpe):
    """A stop string split across tokens is found at the token that completes it, never in the prompt; the window is its length plus two."""
    stop = StopStrings(bpe, "stopping")
    ids = bpe.encode("Hammer time, stopping now").ids
    pieces = [bpe.id_to_token(i) for i in ids]
    end = next(n for n in range(1, len(ids) + 1) if "stopping" in bpe.decode(ids[:n]))
    assert [stop(ids[:n]) for n in range(1, len(ids) + 1)] == [n == end for n in range(1, len(ids) + 1)], pieces
    assert stop.window == len("stopping") + 2
    prompt = bpe.encode("stopping").ids
    assert stop(prompt) and not stop(prompt + bpe.encode(" now").ids)  # complete before the last token: no stop
    prompt, generated = bpe.encode("Hammer time, stop").ids, bpe.encode("ping now").ids
    assert stop(prompt + generated[:2]) and not stop(generated[:2])  # "stop" + "pin" + "g": begun in the prompt
    assert stop.after(prompt)(generated[:2]) and not stop.after(prompt)(generated) and not stop.after(prompt)([])


def test_pipeline_stops_where_stop_strings_do(hf_pipeline, bpe):
    """transformers' pipeline with stop_sequence stops at the token where StopStrings first fires; its text keeps
    the stop string and the rest of that token, which truncate_at_stop cuts."""
    torch.manual_seed(3)
    hf_pipeline.model.generation_config = transformers.GenerationConfig(eos_token_id=0)
    free = hf_pipeline("The weather", max_new_tokens=30, do_sample=True, return_full_text=False)[0]["generated_text"]
    starts = [
        i
        for i in range(len(free) // 3, len(free) - 1)
        if free[i : i + 2].isascii() and free[i].isprintable() and free[i + 1].isprintable()
    ]
    target = free[starts[0] : starts[0] + 2]  # a stop string the sampled text reaches, midway
    stop = StopStrings(bpe, target)
    torch.manual_seed(3)
    out = hf_pipeline("The weather", max_new_tokens=30, do_sample=True, stop_sequence=target, return_tensors=True)
    ids = out[0]["generated_token_ids"]
    prompt_length = len(bpe.encode("The weather").ids)
    fired = [n for n in range(prompt_length + 1, len(ids) + 1) if stop(ids[:n])]
    assert fired == [len(ids)]
    torch.manual_seed(3)
    text = hf_pipeline("The weather", max_new_tokens=30, do_sample=True, stop_sequence=target)[0]["generated_text"]
    assert text == "The weather" + bpe.decode(ids[prompt_length:])
    cut = truncate_at_stop(text, target, start=len("The weather"))
    assert cut == text[: text.index(target, len("The weather"))] and target in text[len(cut) :]


def test_truncate_at_stop():
    """truncate_at_stop cuts before the earliest stop string (or after it with keep), ignoring stops inside the prompt."""
    assert truncate_at_stop("one two. three.", ["."]) == "one two"
    assert truncate_at_stop("one two. three.", [".", "two"]) == "one "
    assert truncate_at_stop("one two. three.", ".", keep=True) == "one two."
    assert truncate_at_stop("one two", ["!"]) == "one two"
    assert truncate_at_stop("Q: stop? A: go stop", "stop", start=10) == "Q: stop? A: go "  # the prompt's stop kept
    assert truncate_at_stop("say st|op now", "st|op", start=5) == "say s"  # begun in the prompt: cut at its end
    with pytest.raises(ValueError, match="empty string"):
        truncate_at_stop("x", [""])

"""Generation parameters and next-token selection, with the names and semantics of transformers' `generate`.

    GenerationParams.resolve(model defaults, **user)       one validated set of parameters per call
    sampler_state(params, prompt_length)                    per sequence: its limits and its own seeded generator
    select(logits, histories, states)                       one next token per row
    StopStrings(tokenizer, strings)(ids)                    has a stop string just been completed?

Resolution follows transformers 5 (`Pipeline._prepare_generate_kwargs` and `GenerationMixin.generate`): the user's
values win over the checkpoint's generation_config.json (or, without one, the generation keys of config.json), which
win over the text-generation pipeline's own defaults (`max_new_tokens=256, do_sample=True, temperature=0.7`; its
sampling defaults only while sampling, its `max_new_tokens` not once a `max_length` is set), which win over
transformers' global defaults (`max_length=20, top_k=50, top_p=1.0, temperature=1.0, ...`). `max_new_tokens` wins
over `max_length`; `max_length` counts the prompt; the global default `max_length=20` counts new tokens only.

Selection applies, per row and in transformers' order: repetition_penalty, no_repeat_ngram_size, min_length /
min_new_tokens (end-of-sequence suppressed until reached), then when sampling temperature, top_k, top_p, and a
softmax + multinomial draw with the row's own generator; greedy rows take the argmax. A sequence's tokens therefore
depend only on its seed and its logits, never on which other sequences share the batch; with one sequence and
`seed=s` the draws are those of transformers after `torch.manual_seed(s)`.

Deviations from transformers, all deliberate: a parameter given as None counts as not given (transformers then sets
it to None, switching e.g. top_k off; use top_k=0); integers are accepted for float parameters (transformers
rejects `temperature=2`); `min_length` counts each row's own prompt, not the padded batch width; a length limit that
nobody asked for (a default) is shortened to fit the model's context, while one the user set raises instead of
running past the context; `seed` is ours (transformers relies on the global `torch.manual_seed`).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.gguf import GGUFCheckpoint

logger = logging.getLogger(__name__)

# What the text-generation pipeline of transformers 5 adds when neither the user nor the checkpoint sets it
# (TextGenerationPipeline._default_generation_config).
TEXT_GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
# transformers' global defaults (GenerationConfig._get_default_generation_params) for the parameters we support.
GLOBAL_DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
}
PARAMETERS = (
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "num_return_sequences",
    "eos_token_id",
    "stop_strings",
    "seed",
)
_SAMPLING = ("temperature", "top_k", "top_p")
# transformers generation parameters we do not implement, with the value that leaves them without effect.
UNSUPPORTED = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "penalty_alpha": None,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "guidance_scale": None,
    "max_time": None,
    "token_healing": False,
    "dola_layers": None,
    "prompt_lookup_num_tokens": None,
    "watermarking_config": None,
}
# More new tokens than this is a typo, not a request (it would size a KV cache of millions of positions).
MAX_NEW_TOKENS = 1 << 20
_WARNED: set[str] = set()  # unsupported checkpoint settings already logged
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: sequence i of a seeded request gets seed + i * this


@dataclass(frozen=True)
class GenerationParams:
    """One request's generation parameters, resolved and validated (see the module docstring).

    `max_new_tokens` None means the limit is `max_length` (prompt included); `default_length` marks transformers'
    global `max_length=20`, which counts new tokens only. `fit_to_context` marks a limit nobody set (a default):
    it is shortened to fit `max_context` instead of raising. Use `new_tokens(prompt_length)` for the number of
    tokens a given prompt may generate.
    """

    max_new_tokens: int | None = None
    max_length: int = 20
    min_new_tokens: int | None = None
    min_length: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    eos_token_id: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    max_context: int | None = None
    default_length: bool = True
    fit_to_context: bool = True

    def __post_init__(self):
        for name in PARAMETERS:
            value = getattr(self, name)
            if value is not None or name not in ("max_new_tokens", "min_new_tokens", "seed"):
                object.__setattr__(self, name, _validate(name, value))
        _validate_context(self.max_context)
        self._check_combinations()

    @classmethod
    def resolve(
        cls,
        defaults: Mapping | None = None,
        prompt_length: int | None = None,
        max_context: int | None = None,
        *,
        pipeline_defaults: Mapping = TEXT_GENERATION_DEFAULTS,
        **user,
    ) -> GenerationParams:
        """The parameters of one call: `user` over the checkpoint's `defaults` (generation_config.json as a dict)
        over `pipeline_defaults` over transformers' global defaults. `max_context` is the model's maximum number of
        positions; with `prompt_length`, the length limit is checked for that prompt too."""
        _check_names(user)
        _check_names(pipeline_defaults)
        user = {k: v for k, v in user.items() if v is not None}
        model = _model_defaults(defaults or {})
        chosen = {**model, **user}
        added = {
            k: v
            for k, v in pipeline_defaults.items()
            if k not in chosen and not (k == "max_new_tokens" and "max_length" in chosen)
        }
        if not {**added, **chosen}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING}
        values = {**GLOBAL_DEFAULTS, **added, **chosen}
        for name, value in values.items():
            source = " (from the checkpoint's generation config)" if name in model and name not in user else ""
            values[name] = _validate(name, value, source)
        length_key = "max_new_tokens" if "max_new_tokens" in values else "max_length"
        params = cls(
            **values,
            max_context=max_context,
            default_length=length_key == "max_length" and "max_length" not in chosen,
            fit_to_context=length_key not in user,
        )
        if prompt_length is not None:
            params.new_tokens(prompt_length)
        return params

    def _check_combinations(self) -> None:
        if self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs sampling: greedy decoding "
                "(do_sample=False) gives one sequence; set do_sample=True or num_return_sequences=1"
            )
        if self.do_sample and self.temperature == 0:
            raise ValueError(
                "temperature=0 with do_sample=True: sampling needs a temperature > 0; for greedy "
                "decoding set do_sample=False"
            )

    def new_tokens(self, prompt_length: int) -> int:
        """How many tokens a prompt of `prompt_length` tokens may generate; ValueError where none fit."""
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"prompt_length must be a non-negative integer, got {prompt_length!r}")
        context = self.max_context
        if context is not None and prompt_length >= context:
            raise ValueError(
                f"the prompt has {prompt_length} tokens but the model's context is {context} tokens: "
                "no room left to generate; shorten the prompt"
            )
        if self.max_new_tokens is not None:
            count, name = self.max_new_tokens, f"max_new_tokens={self.max_new_tokens}"
        elif self.default_length:
            count, name = self.max_length, f"the default max_length={self.max_length} (new tokens)"
        else:
            count, name = self.max_length - prompt_length, f"max_length={self.max_length}"
            if count <= 0:
                raise ValueError(
                    f"the prompt has {prompt_length} tokens but max_length={self.max_length} counts "
                    "the prompt too: nothing left to generate; raise max_length or set max_new_tokens"
                )
        if context is not None and prompt_length + count > context:
            if not (self.fit_to_context or self.default_length):
                raise ValueError(
                    f"the prompt ({prompt_length} tokens) plus {name} makes {prompt_length + count} "
                    f"tokens, more than the model's context of {context}; ask for at most "
                    f"{context - prompt_length} new tokens or shorten the prompt"
                )
            logger.debug("%s shortened to %d tokens to fit the context of %d", name, context - prompt_length, context)
            count = context - prompt_length
        if count > MAX_NEW_TOKENS:
            raise ValueError(f"{name} asks for {count} new tokens, more than the limit of {MAX_NEW_TOKENS}")
        return count

    def min_tokens(self, prompt_length: int) -> int:
        """New tokens before end-of-sequence is allowed: min_new_tokens, else min_length minus the prompt."""
        if self.min_new_tokens is not None:
            return self.min_new_tokens
        return max(self.min_length - prompt_length, 0)


def checkpoint_defaults(folder) -> dict:
    """The generation defaults of a checkpoint folder as transformers reads them: generation_config.json, or when
    there is none, config.json (whose generation keys, eos_token_id for one, then apply)."""
    folder = Path(folder)
    if folder.suffix == ".gguf" and folder.is_file():  # transformers builds it from the config the metadata gives
        config = GGUFCheckpoint.open(folder).config()
        return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            with open(folder / name, encoding="utf-8") as f:
                return json.load(f)
    return {}


# -- validation ------------------------------------------------------------------------------------------------------
def _check_names(user: Mapping) -> None:
    for name in user:
        if name in PARAMETERS:
            continue
        if name in UNSUPPORTED:
            raise ValueError(f"generation parameter {name!r} is not supported here; supported: {', '.join(PARAMETERS)}")
        close = difflib.get_close_matches(name, PARAMETERS, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(f"unknown generation parameter {name!r}; {hint}known: {', '.join(PARAMETERS)}")


def _model_defaults(defaults: Mapping) -> dict:
    """The checkpoint's values we use; unsupported ones that would change the output are logged once."""
    if not isinstance(defaults, Mapping):
        raise TypeError(f"defaults must be a dict (a generation_config.json), got {type(defaults).__name__}")
    ignored = ", ".join(
        f"{k}={v!r}" for k, v in sorted(defaults.items()) if k in UNSUPPORTED and v is not None and v != UNSUPPORTED[k]
    )
    if ignored and ignored not in _WARNED:
        _WARNED.add(ignored)
        logger.warning(
            "the checkpoint's generation config sets %s, which this implementation does not support; ignored", ignored
        )
    return {k: v for k, v in defaults.items() if k in PARAMETERS and k != "seed" and v is not None}


# name -> (kind, lowest allowed, whether the lowest is allowed, highest allowed or None)
_RANGES = {
    "max_new_tokens": ("int", 1, True, MAX_NEW_TOKENS),
    "max_length": ("int", 1, True, None),
    "min_new_tokens": ("int", 0, True, None),
    "min_length": ("int", 0, True, None),
    "top_k": ("int", 0, True, None),
    "no_repeat_ngram_size": ("int", 0, True, None),
    "num_return_sequences": ("int", 1, True, None),
    "temperature": ("float", 0.0, True, None),
    "top_p": ("float", 0.0, True, 1.0),
    "repetition_penalty": ("float", 0.0, False, None),
}


def _validate(name: str, value, source: str = ""):
    """`value` as stored in GenerationParams; TypeError / ValueError naming the parameter, value and what is allowed."""
    if name in _RANGES:
        return _number(name, value, source, *_RANGES[name])
    if name == "do_sample":
        if not isinstance(value, bool):
            raise TypeError(f"do_sample must be True or False, got {value!r}{source}")
        return value
    if name == "eos_token_id":
        ids = [value] if _is_int(value) else value
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise TypeError(
                f"eos_token_id must be a token id or a list of token ids (integers >= 0), got {value!r}{source}"
            )
        return tuple(ids)
    if name == "stop_strings":
        return _stop_strings(value)
    if name == "seed":
        if not _is_int(value) or not -(2**63) <= value < 2**64:
            raise TypeError(f"seed must be an integer in [-2**63, 2**64), got {value!r}")
        return value
    raise AssertionError(name)


def _number(name, value, source, kind, low, low_allowed, high):
    allowed = (int,) if kind == "int" else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise TypeError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}{source}")
    if kind == "float" and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{source}")
    too_low = value < low or (value == low and not low_allowed)
    if too_low or (high is not None and value > high):
        bounds = f"{'>=' if low_allowed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bounds}, got {value!r}{source}")
    return float(value) if kind == "float" else value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_context(max_context):
    if max_context is not None and (not _is_int(max_context) or max_context < 1):
        raise ValueError(f"max_context must be a positive integer or None, got {max_context!r}")
    return max_context


def _stop_strings(value) -> tuple[str, ...]:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
        raise TypeError(f"stop_strings must be a string or a list of strings, got {value!r}")
    if any(s == "" for s in strings):
        raise ValueError(f"stop_strings must not contain an empty string, got {value!r}")
    return tuple(dict.fromkeys(strings))


# -- per-sequence state ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerState:
    """One sequence being generated: its parameters, prompt length, limits, own random generator and stop strings."""

    params: GenerationParams
    prompt_length: int
    max_new_tokens: int
    min_new_tokens: int
    generator: torch.Generator | None = None  # None for greedy decoding
    stop: StopStrings | None = None

    def finish_reason(self, history: Sequence[int]) -> str | None:
        """ "stop" (end-of-sequence token or stop string), "length" (limit reached) or None (go on), after a token."""
        generated = len(history) - self.prompt_length
        if generated > 0 and history[-1] in self.params.eos_token_id:
            return "stop"
        if generated > 0 and self.stop is not None and self.stop(history):
            return "stop"
        return "length" if generated >= self.max_new_tokens else None


def sampler_state(
    params: GenerationParams, prompt_length: int, *, index: int = 0, device="cpu", stop: StopStrings | None = None
) -> SamplerState:
    """The state of sequence `index` (of `num_return_sequences`) of one prompt. Its generator, on `device`, is
    seeded from `params.seed` (sequence 0 with the seed itself), or from torch's global generator without a seed."""
    if params.stop_strings and stop is None:
        raise ValueError(f"stop_strings {list(params.stop_strings)} need a StopStrings built with the tokenizer")
    generator = None
    if params.do_sample:
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if index == 0 else (seed + index * _SEED_MIX) % 2**64)
    return SamplerState(
        params, prompt_length, params.new_tokens(prompt_length), params.min_tokens(prompt_length), generator, stop
    )


# -- token selection ---------------------------------------------------------------------------------------------------
def select(logits: torch.Tensor, histories: Sequence[Sequence[int]], states: Sequence[SamplerState]) -> torch.Tensor:
    """The next token of each row (B,) from its last-position logits (B, V), its history (prompt + generated ids)
    and its state: processors and warpers as transformers, then argmax or a draw with the row's generator."""
    scores = process(logits, histories, states)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    greedy = [i for i, s in enumerate(states) if not s.params.do_sample]
    sampled = [i for i, s in enumerate(states) if s.params.do_sample]
    if greedy:
        tokens[greedy] = scores[greedy].argmax(dim=-1)
    if sampled:
        probs = scores[sampled].softmax(dim=-1)
        for row, i in enumerate(sampled):
            generator = states[i].generator  # None: torch's global generator
            device = probs.device if generator is None else generator.device
            tokens[i] = torch.multinomial(probs[row : row + 1].to(device), 1, generator=generator).item()
    return tokens


def process(logits: torch.Tensor, histories: Sequence[Sequence[int]], states: Sequence[SamplerState]) -> torch.Tensor:
    """The scores (B, V) float32 that transformers' logits processors and (when sampling) warpers give: the
    distribution `select` draws from after a softmax."""
    if logits.dim() != 2 or not logits.shape[0] == len(histories) == len(states):
        raise ValueError(
            f"expected logits (B, V) with B histories and B states, got logits {tuple(logits.shape)}, "
            f"{len(histories)} histories and {len(states)} states"
        )
    scores = logits.to(torch.float32, copy=True)
    penalize_repetition(scores, histories, [s.params.repetition_penalty for s in states])
    ban_repeated_ngrams(scores, histories, [s.params.no_repeat_ngram_size for s in states])
    early = [i for i, (h, s) in enumerate(zip(histories, states)) if len(h) - s.prompt_length < s.min_new_tokens]
    for i in early:
        eos = [t for t in states[i].params.eos_token_id if t < scores.shape[1]]
        scores[i, eos] = -math.inf
    sampled = [i for i, s in enumerate(states) if s.params.do_sample]
    if sampled:
        scores[sampled] = warp(scores[sampled], [states[i].params for i in sampled])
    return scores


def penalize_repetition(scores: torch.Tensor, histories: Sequence[Sequence[int]], penalties: Sequence[float]) -> None:
    """In place, the score of every token seen in a row's history: divided by its penalty if positive, else
    multiplied (transformers' RepetitionPenaltyLogitsProcessor); rows with penalty 1.0 untouched."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    if not rows:
        return
    vocab = scores.shape[1]
    ids = _padded([histories[i] for i in rows], vocab, scores.device).clamp(max=vocab)  # (R, L), pad = spare column
    padded = F.pad(scores[rows], (0, 1))  # (R, V + 1)
    seen = padded.gather(1, ids)
    penalty = torch.tensor([penalties[i] for i in rows], dtype=scores.dtype, device=scores.device)[:, None]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    scores[rows] = padded.scatter(1, ids, seen)[:, :vocab]


def ban_repeated_ngrams(scores: torch.Tensor, histories: Sequence[Sequence[int]], sizes: Sequence[int]) -> None:
    """In place, -inf for every token that would repeat an n-gram of the row's history (n = its size; 0 = off),
    as transformers' NoRepeatNGramLogitsProcessor (the prompt counts)."""
    vocab = scores.shape[1]
    for i, n in enumerate(sizes):
        history = histories[i]
        if n <= 0 or len(history) < n:
            continue
        ids = torch.tensor(history, dtype=torch.long, device=scores.device)
        windows = ids.unfold(0, n, 1)  # (L - n + 1, n)
        matches = (windows[:, :-1] == ids[len(history) + 1 - n :]).all(dim=-1)
        banned = windows[matches, -1]
        scores[i, banned[banned < vocab]] = -math.inf


def warp(scores: torch.Tensor, params: Sequence[GenerationParams]) -> torch.Tensor:
    """Temperature, then top_k, then top_p, per row (transformers' TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper with min_tokens_to_keep=1); removed tokens get -inf."""
    temperature = torch.tensor([p.temperature for p in params], dtype=scores.dtype, device=scores.device)
    scores = scores / temperature[:, None]
    vocab = scores.shape[1]
    rows = [i for i, p in enumerate(params) if p.top_k > 0]
    if rows:
        k = torch.tensor([min(params[i].top_k, vocab) for i in rows], device=scores.device)
        sub = scores[rows]
        kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # (R, 1) the k-th largest score
        scores[rows] = sub.masked_fill(sub < kth, -math.inf)
    rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if rows:
        sub = scores[rows]
        ordered, order = sub.sort(dim=-1, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        top_p = torch.tensor([params[i].top_p for i in rows], dtype=scores.dtype, device=scores.device)
        remove = cumulative <= (1 - top_p)[:, None]
        remove[:, -1] = False  # keep at least the most likely token
        scores[rows] = sub.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return scores


def _padded(rows: Sequence[Sequence[int]], pad: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


# -- stop strings ----------------------------------------------------------------------------------------------------
class StopStrings:
    """`stop(ids)` is True when a stop string has just been completed: it occurs in the decoded text of the last
    tokens of `ids` and ends inside the text of the last token. That is transformers' StopStringCriteria: the match
    may start in earlier tokens (or the prompt, when `ids` holds prompt + generated ids) and the last token may run
    past the stop string; a stop string already complete before the last token does not count, so one inside the
    prompt never stops generation. Special tokens are decoded as their text, so "</s>" can be a stop string.
    (One difference: a stop string holding U+FFFD also matches bytes that do not decode; transformers' never fires.)

    Only a tail of `ids` is decoded (one token per UTF-8 byte of the longest stop string, plus two), so a check costs
    two decodes of a few tokens whatever the length of the sequence.

    What transformers' text-generation pipeline returns with stop strings (`stop_sequence=...`, or `stop_strings`
    with `tokenizer=`): generation ends at the token completing the stop string and the text holds everything
    decoded, the stop string included, plus the rest of that last token if it runs past it (stop "ji" completed by
    the token "ic" gives "...jic"). `truncate_at_stop` cuts such a text exactly, for the OpenAI convention.
    """

    def __init__(self, tokenizer, strings):
        self.strings = _stop_strings(strings)
        if not self.strings:
            raise ValueError("StopStrings needs at least one stop string")
        self._decode = tokenizer.decode
        self.window = max(len(s.encode("utf-8")) for s in self.strings) + 2

    def __call__(self, ids: Sequence[int]) -> bool:
        if not ids:
            return False
        tail = list(ids[-self.window :])
        text = self._decode(tail, skip_special_tokens=False)
        last = max(text.rfind(s) + len(s) if s in text else -1 for s in self.strings)
        if last < 0:
            return False
        before = self._decode(tail[:-1], skip_special_tokens=False)
        shared = 0  # the text before the last token, as far as it agrees with `text` (byte tokens may differ)
        for a, b in zip(text, before):
            if a != b:
                break
            shared += 1
        return last > shared

    def after(self, prompt_ids: Sequence[int]) -> Callable[[Sequence[int]], bool]:
        """A check on the generated ids alone (the engine's `stop(generated_ids)`) that still sees the end of the
        prompt, so that a stop string begun in the prompt counts, as in transformers."""
        tail = list(prompt_ids[-self.window :])
        return lambda generated: len(generated) > 0 and self(tail + list(generated[-self.window :]))

    def __repr__(self) -> str:
        return f"StopStrings({list(self.strings)!r})"


def truncate_at_stop(text: str, stop_strings, *, start: int = 0, keep: bool = False) -> str:
    """`text` cut at its first stop string that ends after `start` (the length of a prompt the text begins with):
    before the stop string (the OpenAI convention), or just after it with `keep=True`. Unchanged if none occurs."""
    strings = _stop_strings(stop_strings)
    cut = None
    for s in strings:
        position = text.find(s, max(start - len(s) + 1, 0))
        if position >= 0:
            end = position + len(s) if keep else max(position, start)
            cut = end if cut is None else min(cut, end)
    return text if cut is None else text[:cut]

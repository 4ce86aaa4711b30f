"""Continuous batching for causal language models: sequences join and leave the running batch at every step.

    engine = Engine(model)                       # a loaded *ForCausalLM (gpt2.py, llama.py)
    engine.add("a", prompt_ids, max_new_tokens=32, eos_token_ids={2})
    while engine.has_work():
        for event in engine.step():              # TokenEvent(seq_id, token_id, finished, finish_reason)
            ...

One `step()` is one scheduler iteration: every running sequence decodes one token (a single forward pass over
all of them), then waiting sequences are admitted and prefilled (forward passes over their prompts, right-padded,
shortest first, each at most `max_batch_tokens` padded tokens), which also gives each its first token.

Admission is first come, first served under three limits: `max_sequences` running at once; `kv_cache_tokens`
of KV memory; and `max_batch_tokens` of prompt tokens admitted per step (a longer prompt is admitted alone).

The KV cache (`layers.KVCache`) belongs to the engine. Running sequence i owns slot i: when one finishes, the
last one's keys and values move into its slot, so a decode step attends to the view `k[:, :n, :, :length]`
with a per-row mask instead of gathering. Each slot therefore holds as many positions as the longest
reservation (prompt + max_new_tokens) among the running sequences, and admission keeps what that really costs,
(running + 1) x longest reservation, within `kv_cache_tokens` (which also bounds the sum of the reservations).
A sequence whose reservation alone exceeds it is refused at `add`. The cache is reallocated when the running
set needs another shape: slots rounded up to a power of two and positions to CACHE_BLOCK where the budget
allows, never more than `kv_cache_tokens` positions in all.

Token choice is pluggable: `select(logits (B, V) float32, histories, states) -> LongTensor (B,)`, where
histories[i] is row i's prompt + generated ids and states[i] the `sampler_state` given to `add` (opaque here).
The default is greedy argmax. `step()` keeps no global state, so one background thread may drive it; the
engine itself is not thread-safe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines import layers
from pipelines.runtime import DEVICE_DEFAULTS

CACHE_BLOCK = 256  # cache capacity grows in multiples of this many positions
FINISH_REASONS = ("stop", "length")

Select = Callable[[torch.Tensor, list, list], torch.Tensor]


def greedy(logits: torch.Tensor, histories: list[list[int]], states: list) -> torch.Tensor:
    """The most likely token of each row: logits (B, V) -> (B,)."""
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence `seq_id`; the last one has finished=True and finish_reason 'stop'
    (an eos id, emitted as the last token, or the `stop` callable) or 'length' (max_new_tokens or max_length)."""

    seq_id: Hashable
    token_id: int
    finished: bool = False
    finish_reason: str | None = None


@dataclass(eq=False)
class _Sequence:
    seq_id: Hashable
    tokens: list[int]  # prompt + generated so far, appended in place: the history `select` sees
    prompt_length: int
    max_new_tokens: int
    eos: frozenset[int]
    stop: Callable[[list[int]], bool] | None
    state: object
    generated: list[int] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        """KV positions this sequence may come to need: prompt + max_new_tokens."""
        return self.prompt_length + self.max_new_tokens

    def accept(self, token: int) -> str | None:
        """Append `token`; the finish reason if the sequence is now done."""
        self.tokens.append(token)
        self.generated.append(token)
        if token in self.eos:
            return "stop"
        if self.stop is not None and self.stop(self.generated):
            return "stop"
        if len(self.generated) >= self.max_new_tokens:
            return "length"
        return None


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class Engine:
    """Continuous-batching generation over one causal LM (see the module docstring).

    model: a loaded causal LM whose config has `max_input_length`, `cache_shape` and `vocab_size`.
    device, dtype: where the KV cache lives and its dtype (default: the model's embeddings').
    max_length: the longest sequence, prompt + generated (default: the model's `max_input_length`).
    max_batch_tokens (prompt tokens prefilled per step), max_sequences (sequences running at once): default from
    DEVICE_DEFAULTS for the cache's device.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        select: Select = greedy,
        max_batch_tokens: int | None = None,
        max_sequences: int | None = None,
        kv_cache_tokens: int | None = None,
        max_length: int | None = None,
    ):
        config = model.config
        self.model, self.select = model, select
        floats = [p for p in model.parameters() if p.is_floating_point()]
        self.device = torch.device(device) if device is not None else floats[0].device
        self.dtype = dtype or floats[0].dtype
        self.max_length = max_length or config.max_input_length
        defaults = DEVICE_DEFAULTS[self.device.type]
        self.max_batch_tokens = defaults.prefill_tokens if max_batch_tokens is None else max_batch_tokens
        self.max_sequences = max_sequences = defaults.max_sequences if max_sequences is None else max_sequences
        self.kv_cache_tokens = kv_cache_tokens or max_sequences * self.max_length
        for name in ("max_batch_tokens", "max_sequences", "kv_cache_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {getattr(self, name)}")
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # running[i] owns cache slot i
        self.sequences: dict[Hashable, _Sequence] = {}
        self.cache: layers.KVCache | None = None

    # -- the queue ------------------------------------------------------------------------------------------
    def add(
        self,
        seq_id: Hashable,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_ids=(),
        stop: Callable[[list[int]], bool] | None = None,
        sampler_state=None,
    ) -> None:
        """Queue a sequence. It stops at an id of `eos_token_ids` (emitted as its last token), when
        `stop(generated_ids)` is true (it gets the live list: copy it to keep it), after `max_new_tokens`, or at
        `max_length` tokens in all. `sampler_state` is handed to `select` with this sequence's row."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence id {seq_id!r} is already queued or running")
        prompt = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty: generation needs at least one token to start from")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in 0..{vocab - 1} (the model's vocab_size={vocab})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if len(prompt) >= self.max_length:
            raise ValueError(
                f"prompt of {len(prompt)} tokens leaves no room to generate: the model's context is "
                f"max_length={self.max_length} tokens, prompt and generated together"
            )
        max_new = min(max_new_tokens, self.max_length - len(prompt))
        seq = _Sequence(
            seq_id, prompt, len(prompt), max_new, frozenset(int(t) for t in eos_token_ids), stop, sampler_state
        )
        if seq.reserved > self.kv_cache_tokens:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + {max_new} new tokens can never fit the KV cache "
                f"budget of kv_cache_tokens={self.kv_cache_tokens}"
            )
        self.sequences[seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: Hashable) -> bool:
        """Drop a queued or running sequence (no event is emitted); False if it is unknown or already finished."""
        seq = self.sequences.get(seq_id)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
            del self.sequences[seq_id]
        else:
            with torch.inference_mode():  # the cache holds inference tensors
                self._release([seq])
        return True

    def reset(self) -> None:
        """Forget every sequence and the cache: the way back to a consistent engine after a failed step (a
        forward pass that ran out of memory leaves slots half written)."""
        self.waiting.clear()
        self.running, self.sequences, self.cache = [], {}, None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        eos_token_ids=(),
        stop=None,
        sampler_states: Sequence | None = None,
    ) -> list[list[int]]:
        """Run `prompts` to completion on an idle engine; the generated ids of each, in input order."""
        if self.has_work():
            raise ValueError("generate() needs an idle engine; drive step() yourself to mix with other sequences")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        states = list(sampler_states) if sampler_states is not None else [None] * len(prompts)
        if len(limits) != len(prompts) or len(states) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts, but {len(limits)} max_new_tokens and {len(states)} states")
        try:
            for i, prompt in enumerate(prompts):
                self.add(i, prompt, limits[i], eos_token_ids, stop, states[i])
            out: list[list[int]] = [[] for _ in prompts]
            while self.has_work():
                for event in self.step():
                    out[event.seq_id].append(event.token_id)
            return out
        finally:
            for seq_id in list(self.sequences):
                self.abort(seq_id)

    # -- one scheduler iteration ------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Decode one token for every running sequence, then admit and prefill waiting ones."""
        events: list[TokenEvent] = []
        with torch.inference_mode():
            if self.running:
                events += self._decode()
            admitted = self._admit()
            for group in self._prefill_groups(admitted):
                events += self._prefill(group)
        return events

    def _admit(self) -> list[_Sequence]:
        """Waiting sequences, first come first served, within max_sequences, kv_cache_tokens and max_batch_tokens."""
        admitted, tokens = [], 0
        longest = max((s.reserved for s in self.running), default=0)
        while self.waiting and len(self.running) + len(admitted) < self.max_sequences:
            seq = self.waiting[0]
            slots = len(self.running) + len(admitted) + 1
            if slots * max(longest, seq.reserved) > self.kv_cache_tokens:
                break
            if admitted and tokens + seq.prompt_length > self.max_batch_tokens:
                break
            admitted.append(self.waiting.popleft())
            tokens += seq.prompt_length
            longest = max(longest, seq.reserved)
        return admitted

    def _prefill_groups(self, admitted: list[_Sequence]) -> list[list[_Sequence]]:
        """Shortest prompts first, cut so that each padded batch holds at most max_batch_tokens."""
        groups: list[list[_Sequence]] = []
        for seq in sorted(admitted, key=lambda s: s.prompt_length):
            if groups and (len(groups[-1]) + 1) * seq.prompt_length <= self.max_batch_tokens:
                groups[-1].append(seq)
            else:
                groups.append([seq])
        return groups

    def _prefill(self, group: list[_Sequence]) -> list[TokenEvent]:
        """One forward pass over new sequences' prompts, right-padded; their keys and values fill new slots."""
        start = len(self.running)
        self.running.extend(group)
        self._reserve_cache()
        T = group[-1].prompt_length
        ids = torch.tensor([s.tokens + [0] * (T - s.prompt_length) for s in group], device=self.device)  # (B, T)
        lengths = torch.tensor([s.prompt_length for s in group], device=self.device)  # (B,)
        rows = self.cache.rows(start, T, prefill=True)
        logits = self.model(ids, None, lengths=lengths, cache=rows, last_only=True)  # (B, 1, V)
        return self._emit(group, logits)

    def _decode(self) -> list[TokenEvent]:
        """One token for every running sequence: its last token at its position, attending to its cached ones."""
        seqs = self.running
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # (n, 1)
        positions = [len(s.tokens) - 1 for s in seqs]
        rows = self.cache.rows(0, max(positions) + 1)
        pos = torch.tensor(positions, device=self.device)[:, None]  # (n, 1)
        logits = self.model(ids, pos, cache=rows, last_only=True)  # (n, 1, V)
        return self._emit(list(seqs), logits)

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Choose each row's next token, record it, and release the sequences that finished."""
        chosen = self.select(logits[:, -1].float(), [s.tokens for s in seqs], [s.state for s in seqs])
        events, done = [], []
        for seq, token in zip(seqs, chosen.tolist()):
            reason = seq.accept(token)
            events.append(TokenEvent(seq.seq_id, token, reason is not None, reason))
            if reason is not None:
                done.append(seq)
        self._release(done)
        return events

    # -- the KV cache -------------------------------------------------------------------------------------------
    def _reserve_cache(self) -> None:
        """A slot per running sequence, each as long as the longest reservation, within kv_cache_tokens."""
        n, longest = len(self.running), max(s.reserved for s in self.running)
        if self.cache is not None and self.cache.slots >= n and self.cache.capacity >= longest:
            return
        have = (self.cache.slots, self.cache.capacity) if self.cache is not None else (0, 0)
        round_slots = min(self.max_sequences, 1 << (n - 1).bit_length())
        round_capacity = min(self.max_length, _round_up(longest, CACHE_BLOCK))
        shapes = [(s, c) for s in (round_slots, n) for c in (round_capacity, longest)]  # (n, longest) fits: _admit
        options = [(max(s, have[0]), max(c, have[1])) for s, c in shapes] + shapes  # grow only, if the budget allows
        slots, capacity = next(o for o in options if o[0] * o[1] <= self.kv_cache_tokens)
        if self.cache is None:
            n_layers, n_kv, head_dim = self.model.config.cache_shape
            self.cache = layers.KVCache(
                n_layers, n_kv, head_dim, slots=slots, capacity=capacity, device=self.device, dtype=self.dtype
            )
        else:
            self.cache.resize(slots, capacity)

    def _release(self, done: list[_Sequence]) -> None:
        """Remove finished sequences; the last running ones move (with their cache rows) into the freed slots."""
        if not done:
            return
        gone = set(done)
        old = self.running
        n = len(old) - len(gone)
        holes = [i for i in range(n) if old[i] in gone]
        movers = [i for i in range(n, len(old)) if old[i] not in gone]
        if movers:
            self.cache.move(movers, holes, max(len(old[i].tokens) for i in movers))
        self.running = old[:n]
        for hole, mover in zip(holes, movers):
            self.running[hole] = old[mover]
        for seq in done:
            del self.sequences[seq.seq_id]

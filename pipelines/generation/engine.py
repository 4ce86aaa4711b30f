"""Continuous batching for causal language models: sequences join and leave the running batch at every step.

    engine = Engine(model)                       # a loaded *ForCausalLM (gpt2.py, llama.py)
    engine.add("a", prompt_ids, max_new_tokens=32, eos_token_ids={2})
    while engine.has_work():
        for event in engine.step():              # TokenEvent(seq_id, token_id, finished, finish_reason)
            ...

One `step()` is one scheduler iteration: every sequence past its prompt decodes one token (one forward pass over
all of them), then waiting sequences are admitted and up to `max_batch_tokens` prompt tokens are prefilled in one
more forward pass. That pass is packed: the prompts (or chunks of them) lie end to end in one row with their own
positions, no padding, each attending only to itself. A prompt longer than what is left of the budget is
prefilled in chunks over several steps, first come first served, while the running sequences keep decoding; its
first token comes with its last chunk.

The KV cache (`layers.KVCache`) is allocated once, at the first step, with `kv_cache_tokens` positions in blocks
of `block_size`: (n_layers, kv heads, positions, head size) for keys and for values. Its default is the device's
`DEVICE_DEFAULTS.kv_cache_bytes` over the bytes one position takes (2 x layers x kv heads x head size x the
element size), at most max_sequences x max_length. A sequence is given whole blocks when it is admitted, enough
for its prompt + max_new_tokens, and gives them back when it finishes: admission keeps the sum of these
reservations within the cache, so a running sequence never waits for memory and is never preempted. The pool
gives consecutive blocks where a free run is long enough, so a sequence's keys are usually one slice of the
cache, which attention reads in place; scattered blocks are gathered for that sequence alone.

Attention reads each sequence's real length: a decode step attends sequence by sequence to exactly its cached
positions (within its layer's sliding window), rather than to the longest row's length under a mask. On the
2-core CPU that was faster than both the padded batch and a gather into one (see the KVRows docstring in
layers.py and the numbers in BENCHMARKS.md).

Admission is first come, first served under three limits: `max_sequences` admitted at once (prefilling or
decoding); free blocks for the whole reservation; and something left of this step's `max_batch_tokens`. A
sequence whose reservation alone exceeds `kv_cache_tokens` is refused at `add`.

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
    blocks: tuple[int, ...] = ()  # the KV-cache blocks it owns while admitted
    prefilled: int = 0  # prompt tokens whose keys and values are in the cache

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


class BlockPool:
    """The free blocks of a KV cache of `n` blocks. `take(k)` gives the shortest free run of at least k
    consecutive blocks (best fit, so long runs stay whole), else the longest runs until k are found."""

    def __init__(self, n: int):
        self.free = list(range(n))  # sorted

    def __len__(self) -> int:
        return len(self.free)

    def take(self, k: int) -> tuple[int, ...]:
        if k > len(self.free):
            raise ValueError(f"{k} blocks asked for, {len(self.free)} free")
        runs, start = [], 0  # (length, index into free) of each run of consecutive free blocks
        for i in range(1, len(self.free) + 1):
            if i == len(self.free) or self.free[i] != self.free[i - 1] + 1:
                runs.append((i - start, start))
                start = i
        fits = [run for run in runs if run[0] >= k]
        chosen = [(k, min(fits)[1])] if fits else sorted(runs, reverse=True)
        taken: list[int] = []
        for length, at in chosen:
            taken += self.free[at : at + min(length, k - len(taken))]
            if len(taken) == k:
                break
        gone = set(taken)
        self.free = [b for b in self.free if b not in gone]
        return tuple(taken)

    def give(self, blocks: Sequence[int]) -> None:
        self.free = sorted(self.free + list(blocks))


class Engine:
    """Continuous-batching generation over one causal LM (see the module docstring).

    model: a loaded causal LM whose config has `max_input_length`, `cache_shape` and `vocab_size`.
    device, dtype: where the KV cache lives and its dtype (default: the model's embeddings').
    max_length: the longest sequence, prompt + generated (default: the model's `max_input_length`).
    max_batch_tokens (prompt tokens prefilled per step), max_sequences (sequences admitted at once): default from
    DEVICE_DEFAULTS for the cache's device. kv_cache_tokens: positions of the KV cache (default: DEVICE_DEFAULTS'
    kv_cache_bytes over the bytes per position, at most max_sequences x max_length). block_size: positions per
    cache block, the unit sequences are given.
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
        block_size: int = layers.BLOCK_SIZE,
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
        self.block_size = block_size
        if kv_cache_tokens is None:
            fits = defaults.kv_cache_bytes // self.bytes_per_position
            kv_cache_tokens = max(1, min(fits, max_sequences * self.max_length))
        self.kv_cache_tokens = kv_cache_tokens
        for name in ("max_batch_tokens", "max_sequences", "kv_cache_tokens", "max_length", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {getattr(self, name)}")
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # admitted (prefilling or decoding), in admission order
        self.sequences: dict[Hashable, _Sequence] = {}
        self.cache: layers.KVCache | None = None
        self.pool: BlockPool | None = None

    @property
    def bytes_per_position(self) -> int:
        """KV-cache bytes of one token: keys and values of every layer."""
        n_layers, n_kv, head_dim = self.model.config.cache_shape
        return 2 * n_layers * n_kv * head_dim * self.dtype.itemsize

    def _blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

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
                f"budget of kv_cache_tokens={self.kv_cache_tokens}; raise kv_cache_tokens or ask for fewer tokens"
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
            self._release([seq])
        return True

    def reset(self) -> None:
        """Forget every sequence and the cache: the way back to a consistent engine after a failed step (a
        forward pass that ran out of memory leaves blocks half written). The next step allocates it again."""
        self.waiting.clear()
        self.running, self.sequences, self.cache, self.pool = [], {}, None, None

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
        """Decode one token for every sequence past its prompt, then admit waiting ones and prefill a budget's
        worth of prompt tokens."""
        events: list[TokenEvent] = []
        with torch.inference_mode():
            self._reserve_cache()
            if any(s.generated for s in self.running):
                events += self._decode()
            self._admit()
            chunks = self._chunks()
            if chunks:
                events += self._prefill(chunks)
        return events

    def _reserve_cache(self) -> None:
        """The KV cache, allocated once: kv_cache_tokens positions in blocks of block_size."""
        if self.cache is None:
            n_layers, n_kv, head_dim = self.model.config.cache_shape
            self.cache = layers.KVCache(
                n_layers,
                n_kv,
                head_dim,
                tokens=self.kv_cache_tokens,
                block_size=self.block_size,
                device=self.device,
                dtype=self.dtype,
            )
            self.pool = BlockPool(self.cache.blocks)

    def _admit(self) -> None:
        """Waiting sequences, first come first served, while max_sequences, free blocks for the whole reservation
        and this step's prefill budget (what the sequences still prefilling leave of it) allow."""
        budget = self.max_batch_tokens - sum(s.prompt_length - s.prefilled for s in self.running if not s.generated)
        while self.waiting and len(self.running) < self.max_sequences and budget > 0:
            seq = self.waiting[0]
            need = self._blocks_for(seq.reserved)
            if need > len(self.pool):
                break
            seq.blocks = self.pool.take(need)
            self.running.append(self.waiting.popleft())
            budget -= seq.prompt_length

    def _chunks(self) -> list[tuple[_Sequence, int]]:
        """(sequence, prompt tokens to prefill now) in admission order, max_batch_tokens in all."""
        chunks, budget = [], self.max_batch_tokens
        for seq in self.running:
            if budget == 0:
                break
            if not seq.generated:
                n = min(seq.prompt_length - seq.prefilled, budget)
                chunks.append((seq, n))
                budget -= n
        return chunks

    def _prefill(self, chunks: list[tuple[_Sequence, int]]) -> list[TokenEvent]:
        """One packed forward pass over prompt chunks: one row, each chunk at its positions attending to its own
        sequence; the chunks that end their prompt give their sequence's first token."""
        ids, positions, segments, done = [], [], [], []
        for seq, n in chunks:
            start = seq.prefilled
            segments.append(layers.Segment(0, len(ids), n, start, seq.blocks, rope_length=seq.prompt_length))
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            seq.prefilled += n
            if seq.prefilled == seq.prompt_length:
                done.append(len(segments) - 1)
        rows = layers.KVRows(self.cache, segments, outputs=done)
        ids_t = torch.tensor([ids], device=self.device)  # (1, N)
        logits = self.model(ids_t, torch.tensor([positions], device=self.device), cache=rows, last_only=True)
        if not done:
            return []
        return self._emit([chunks[i][0] for i in done], logits[0])  # logits (1, k, V)

    def _decode(self) -> list[TokenEvent]:
        """One token for every sequence past its prompt: its last token at its position, attending to its cached
        ones."""
        seqs = [s for s in self.running if s.generated]
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # (n, 1)
        positions = [len(s.tokens) - 1 for s in seqs]
        rows = layers.KVRows(
            self.cache, [layers.Segment(i, 0, 1, p, s.blocks) for i, (s, p) in enumerate(zip(seqs, positions))]
        )
        pos = torch.tensor(positions, device=self.device)[:, None]  # (n, 1)
        logits = self.model(ids, pos, cache=rows, last_only=True)  # (n, 1, V)
        return self._emit(seqs, logits[:, -1])

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Choose each row's next token from logits (B, V), record it, and release the sequences that finished."""
        chosen = self.select(logits.float(), [s.tokens for s in seqs], [s.state for s in seqs])
        events, done = [], []
        for seq, token in zip(seqs, chosen.tolist()):
            reason = seq.accept(token)
            events.append(TokenEvent(seq.seq_id, token, reason is not None, reason))
            if reason is not None:
                done.append(seq)
        self._release(done)
        return events

    def _release(self, done: list[_Sequence]) -> None:
        """Remove finished (or aborted) admitted sequences; their blocks go back to the pool."""
        if not done:
            return
        gone = set(done)
        self.running = [s for s in self.running if s not in gone]
        for seq in done:
            self.pool.give(seq.blocks)
            seq.blocks = ()
            del self.sequences[seq.seq_id]

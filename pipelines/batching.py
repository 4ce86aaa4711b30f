"""Length-sorted, token-budgeted micro-batches with out-of-memory split-and-retry.

A list of features dicts goes in (a processor's `Layout` says how they pad and what their length is); they
are sorted by length, cut into micro-batches that respect both `batch_size` (count) and `max_batch_tokens`
(rows x padded length) and that end where lengths fall steeply (`plan_micro_batches`), padded to the longest
member, run, and the per-item outputs come back in input order. When a micro-batch runs out of memory it is halved and
retried, down to a single item; a single item that still does not fit raises `ItemOutOfMemoryError`
naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from pipelines.processors.layout import Layout

logger = logging.getLogger(__name__)

Features = dict
Outputs = dict[str, torch.Tensor]


class ItemOutOfMemoryError(RuntimeError):
    """A single item does not fit in memory even in a micro-batch of its own."""

    def __init__(self, item: int, length: int):
        super().__init__(f"out of memory on item {item} ({length} tokens) even in a micro-batch of its own")
        self.item, self.length = item, length


# Close a micro-batch before an item shorter than PADDING_CUT x its longest, once it holds MIN_FILL_FOR_CUT of
# batch_size or max_batch_tokens. A quarter of the CPU default of 2,048 tokens is 512: on the 2-core CPU a
# MiniLM encoder's cost per token is flat from about 512 tokens a call up, and 15-25% higher at 256 (bf16).
PADDING_CUT = 0.9
MIN_FILL_FOR_CUT = 0.25


def plan_micro_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into micro-batches, longest first; padded size (rows x longest) <= max_batch_tokens.

    Items are sorted by length, longest first (ties in input order), and taken in that order. A micro-batch
    is closed when it holds batch_size items, when the next item would take it past max_batch_tokens, or
    when the next item is shorter than PADDING_CUT x its longest, once it is at least MIN_FILL_FOR_CUT full
    (of batch_size or of max_batch_tokens, whichever it fills more): that cut keeps padding low where
    lengths fall steeply, without leaving micro-batches so small that per-call costs dominate. An item
    longer than the budget on its own still gets a micro-batch of one. Deterministic: the plan depends only
    on the arguments.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and _closes(len(current), lengths[current[0]], lengths[i], batch_size, max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _closes(rows: int, longest: int, next_length: int, batch_size: int, max_batch_tokens: int | None) -> bool:
    """Whether a micro-batch of `rows` items padded to `longest` (its first) is closed before the next item."""
    fill = rows / batch_size if max_batch_tokens is None else max(rows / batch_size, rows * longest / max_batch_tokens)
    over_tokens = max_batch_tokens is not None and (rows + 1) * longest > max_batch_tokens
    steep = next_length < PADDING_CUT * longest and fill >= MIN_FILL_FOR_CUT
    return rows == batch_size or over_tokens or steep


class MicroBatcher:
    """Runs `forward` over tokenized items in length-sorted micro-batches; see the module docstring.

    `token_outputs` names the outputs that have one row per token (B, T, ...); they are cut back to
    each item's own length, so that results never depend on what an item was batched with.
    """

    def __init__(
        self,
        forward: Callable[[Outputs], Outputs],
        *,
        layout: Layout,
        token_outputs: Sequence[str] = (),
        batch_size: int = 32,
        max_batch_tokens: int | None = None,
    ):
        self.forward = forward
        self.layout = layout
        self.token_outputs = frozenset(token_outputs)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens

    def run(self, items: Sequence[Features]) -> list[Outputs]:
        lengths = [self.layout.item_length(f) for f in items]
        results: list[Outputs | None] = [None] * len(items)
        for indices in plan_micro_batches(lengths, self.batch_size, self.max_batch_tokens):
            self._run(items, lengths, indices, results)
        return results  # type: ignore[return-value]

    def _run(self, items, lengths, indices: list[int], results: list) -> None:
        batch = self.layout.collate([items[i] for i in indices])
        try:
            outputs = self.forward(batch)
        except torch.OutOfMemoryError:
            del batch
            _free_device_memory()
            if len(indices) == 1:
                raise ItemOutOfMemoryError(indices[0], lengths[indices[0]]) from None
            half = len(indices) // 2
            logger.warning(
                "out of memory on a micro-batch of %d items; retrying as %d + %d",
                len(indices),
                half,
                len(indices) - half,
            )
            self._run(items, lengths, indices[:half], results)
            self._run(items, lengths, indices[half:], results)
            return
        padded = self.layout.padded_length(batch)
        for row, i in enumerate(indices):
            results[i] = {
                k: self.layout.cut(v[row], lengths[i], padded) if k in self.token_outputs else v[row]
                for k, v in outputs.items()
            }


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

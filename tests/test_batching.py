"""Micro-batch planning, padding and out-of-memory split-and-retry, on a fake forward (no model needed)."""

import pytest
import torch

from pipelines.batching import ItemOutOfMemoryError, MicroBatcher, plan_micro_batches
from pipelines.processors import Layout, Mask, Padded

TEXT = Layout({"input_ids": Padded(0), "attention_mask": Mask("input_ids")}, length="input_ids")


def test_plan_sorts_by_length_and_respects_both_limits():
    """Every micro-batch is within batch_size and the token budget (rows x longest), longest first."""
    lengths = [3, 50, 7, 7, 20, 1, 33, 12, 9, 2]
    plan = plan_micro_batches(lengths, batch_size=3, max_batch_tokens=60)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for batch in plan:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 60
    flat = [lengths[i] for b in plan for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_plan_cuts_where_lengths_fall_steeply():
    """A micro-batch ends before an item shorter than 0.9x its longest once it is a quarter full, so that
    short items are not padded to a long one: padded tokens 700 -> 460 for 441 real (one batch before)."""
    lengths = [100, 95, 91, 50, 48, 47, 10]
    plan = plan_micro_batches(lengths, batch_size=8, max_batch_tokens=1000)
    # By hand: 95 and 91 are >= 0.9 x 100 = 90, so they join 100. 50 < 90, and [100, 95, 91] is a quarter full
    # (3 / 8 = 0.375 of batch_size; 300 / 1000 of the budget): cut. 48 and 47 are >= 0.9 x 50 = 45; 10 < 45 with
    # [50, 48, 47] 3 / 8 full: cut. No batch reaches 8 rows or 1000 tokens, so only the steep cuts apply.
    assert plan == [[0, 1, 2], [3, 4, 5], [6]]
    # Padded tokens, rows x the batch's longest: 3 x 100 + 3 x 50 + 1 x 10 = 460, against 7 x 100 = 700 in one
    # batch; the real tokens are 100 + 95 + 91 + 50 + 48 + 47 + 10 = 441.
    assert sum(len(b) * max(lengths[i] for i in b) for b in plan) == 3 * 100 + 3 * 50 + 1 * 10 == 460
    assert sum(lengths) == 441


def test_plan_does_not_cut_below_a_quarter_full():
    """The steep-length cut never leaves a micro-batch under a quarter of both batch_size and the token
    budget: a lone long item keeps its shorter neighbours (a 1-row call would cost more than the padding)."""
    assert plan_micro_batches([100, 50, 50], batch_size=16, max_batch_tokens=1000) == [[0, 1, 2]]
    assert plan_micro_batches([100, 50, 50, 50], batch_size=16, max_batch_tokens=1000) == [[0, 1, 2], [3]]


def test_plan_cut_counts_rows_without_a_token_budget():
    """Without max_batch_tokens the quarter-full test counts rows of batch_size; ties keep input order."""
    lengths = [5, 10, 10, 5, 10, 5, 10, 5]
    assert plan_micro_batches(lengths, batch_size=8) == [[1, 2, 4, 6], [0, 3, 5, 7]]
    assert plan_micro_batches(lengths, batch_size=32) == [[1, 2, 4, 6, 0, 3, 5, 7]]


def test_plan_gives_an_oversized_item_a_batch_of_its_own():
    """An item longer than the whole budget is still run, alone."""
    assert plan_micro_batches([500, 4, 4], batch_size=8, max_batch_tokens=100) == [[0], [1, 2]]


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"batch_size": 2, "max_batch_tokens": 0}])
def test_plan_rejects_nonpositive_limits(bad):
    """A zero batch_size or token budget is a ValueError naming the limit, not a ZeroDivisionError in the fill ratio."""
    with pytest.raises(ValueError, match="must be"):
        plan_micro_batches([1, 2], **bad)


def _fake_forward(calls, oom_above=None):
    """Sum of ids per row and per-token ids+1; raises OOM when the padded batch exceeds `oom_above` tokens."""

    def forward(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        calls.append(tuple(ids.shape))
        if oom_above is not None and ids.numel() > oom_above:
            raise torch.OutOfMemoryError("fake")
        return {"total": (ids * mask).sum(dim=1), "per_token": ids + 1}

    return forward


def _items(lengths):
    return [{"input_ids": list(range(1, n + 1))} for n in lengths]


def test_batcher_restores_order_and_cuts_token_outputs():
    """Outputs come back in input order; per-token outputs are cut to each item's own length."""
    lengths = [19, 20, 18, 20]
    calls = []
    batcher = MicroBatcher(_fake_forward(calls), layout=TEXT, token_outputs=("per_token",), batch_size=2)
    out = batcher.run(_items(lengths))
    assert [o["total"].item() for o in out] == [n * (n + 1) // 2 for n in lengths]
    assert [o["per_token"].tolist() for o in out] == [list(range(2, n + 2)) for n in lengths]
    assert calls == [(2, 20), (2, 19)]  # items 1, 3 then 0, 2 (padded to 19)


def test_batcher_splits_on_out_of_memory_and_recovers():
    """A micro-batch that runs out of memory is halved and retried; results equal the unsplit run."""
    lengths = [10, 10, 10, 10, 9, 9]
    calls = []
    batcher = MicroBatcher(_fake_forward(calls, oom_above=16), layout=TEXT, batch_size=8)
    out = batcher.run(_items(lengths))
    assert [o["total"].item() for o in out] == [55, 55, 55, 55, 45, 45]
    # By hand: 9 is not < 0.9 x 10, so the plan is one batch of all six, padded to 10 (60 tokens > 16: out of
    # memory). A failed batch splits into its first len // 2 items and the rest, depth first; a sub-batch pads to
    # its own longest. [0..5] -> [0, 1, 2] (30) -> [0] (10, fits) and [1, 2] (20) -> [1], [2]; then [3, 4, 5]
    # (3 x 10) -> [3] (10, fits) and [4, 5] (2 x 9 = 18) -> [4], [5] (9 each).
    assert calls == [(6, 10), (3, 10), (1, 10), (2, 10), (1, 10), (1, 10), (3, 10), (1, 10), (2, 9), (1, 9), (1, 9)]


def test_batcher_names_the_item_that_never_fits():
    """An item that runs out of memory alone raises ItemOutOfMemoryError naming it."""
    batcher = MicroBatcher(_fake_forward([], oom_above=10), layout=TEXT, batch_size=4)
    with pytest.raises(ItemOutOfMemoryError, match=r"item 1 \(30 tokens\)") as e:
        batcher.run(_items([3, 30, 2]))
    assert e.value.item == 1

"""Micro-batch planning, padding and out-of-memory split-and-retry, on a fake forward (no model needed)."""

import pytest
import torch

from pipelines.batching import ItemOutOfMemoryError, MicroBatcher, collate, plan_micro_batches


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


def test_plan_gives_an_oversized_item_a_batch_of_its_own():
    """An item longer than the whole budget is still run, alone."""
    assert plan_micro_batches([500, 4, 4], batch_size=8, max_batch_tokens=100) == [[0], [1, 2]]


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"batch_size": 2, "max_batch_tokens": 0}])
def test_plan_rejects_nonpositive_limits(bad):
    with pytest.raises(ValueError, match="must be"):
        plan_micro_batches([1, 2], **bad)


def test_collate_pads_right_and_left():
    items = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1]}, {"input_ids": [8], "token_type_ids": [0]}]
    names = ("input_ids", "attention_mask", "token_type_ids")
    right = collate(items, names, pad_id=1)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    left = collate(items, names, pad_id=1, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


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
    lengths = [4, 1, 9, 3]
    calls = []
    batcher = MicroBatcher(_fake_forward(calls), input_names=("input_ids", "attention_mask"), pad_id=0,
                           token_outputs=("per_token",), batch_size=2)
    out = batcher.run(_items(lengths))
    assert [o["total"].item() for o in out] == [n * (n + 1) // 2 for n in lengths]
    assert [o["per_token"].tolist() for o in out] == [list(range(2, n + 2)) for n in lengths]
    assert calls == [(2, 9), (2, 3)]


def test_batcher_splits_on_out_of_memory_and_recovers():
    """A micro-batch that runs out of memory is halved and retried; results equal the unsplit run."""
    lengths = [8, 8, 8, 8, 2, 2]
    calls = []
    batcher = MicroBatcher(_fake_forward(calls, oom_above=16), input_names=("input_ids", "attention_mask"),
                           pad_id=0, batch_size=8)
    out = batcher.run(_items(lengths))
    assert [o["total"].item() for o in out] == [36, 36, 36, 36, 3, 3]
    assert calls[0] == (6, 8)  # tried whole, then halves until each fits
    assert max(r * t for r, t in calls[1:] if r * t <= 16) <= 16


def test_batcher_names_the_item_that_never_fits():
    """An item that runs out of memory alone raises ItemOutOfMemoryError naming it."""
    batcher = MicroBatcher(_fake_forward([], oom_above=10), input_names=("input_ids", "attention_mask"),
                           pad_id=0, batch_size=4)
    with pytest.raises(ItemOutOfMemoryError, match=r"item 1 \(30 tokens\)") as e:
        batcher.run(_items([3, 30, 2]))
    assert e.value.item == 1

"""Layouts: how features of each modality collate into a micro-batch (pad, mask, stack), and their checks."""

import numpy as np
import pytest
import torch

from pipelines.processors import Layout, Mask, Padded, Stacked


def test_token_ids_pad_right_and_left_with_their_mask():
    """input_ids pad with the pad id, other ids with 0, the mask marks real tokens, on either side."""
    items = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1]}, {"input_ids": [8], "token_type_ids": [0]}]
    fields = {"input_ids": Padded(1), "attention_mask": Mask("input_ids"), "token_type_ids": Padded(0)}
    right = Layout(fields, length="input_ids").collate(items)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    left = Layout(fields, length="input_ids", padding_side="left").collate(items)
    assert left["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_fields_the_items_lack_are_left_out():
    """A tokenizer without token types gives no token_type_ids: the batch has none, rather than zeros."""
    layout = Layout({"input_ids": Padded(0), "token_type_ids": Padded(0)}, length="input_ids")
    assert set(layout.collate([{"input_ids": [1, 2]}])) == {"input_ids"}


def test_frames_pad_along_the_first_axis():
    """Audio-like features (frames x bins, arrays) pad by frames with the rule's value; the mask follows frames."""
    layout = Layout({"features": Padded(-1.0, dtype=torch.float32), "mask": Mask("features")}, length="features")
    a, b = np.ones((3, 2), dtype=np.float32), np.full((1, 2), 2.0, dtype=np.float32)
    batch = layout.collate([{"features": a}, {"features": b}])
    assert batch["features"].shape == (2, 3, 2)
    assert batch["features"][1].tolist() == [[2.0, 2.0], [-1.0, -1.0], [-1.0, -1.0]]
    assert batch["mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert layout.item_length({"features": a}) == 3


def test_pixel_values_stack_and_have_no_length():
    """Fixed-shape features stack unpadded; without a length feature every item counts 1; shapes must agree."""
    layout = Layout({"pixel_values": Stacked()})
    images = [np.zeros((3, 4, 4), dtype=np.float64), np.ones((3, 4, 4), dtype=np.float64)]
    batch = layout.collate([{"pixel_values": x} for x in images])
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"].dtype == torch.float32
    assert layout.item_length({"pixel_values": images[0]}) == 1
    with pytest.raises(ValueError, match="one shape"):
        layout.collate([{"pixel_values": np.zeros((3, 4, 4))}, {"pixel_values": np.zeros((3, 5, 4))}])


def test_layout_checks_its_rules():
    """The length feature must be a padded field; the padding side is right or left."""
    with pytest.raises(ValueError, match="length feature 'pixel_values' must be a Padded field"):
        Layout({"pixel_values": Stacked()}, length="pixel_values")
    with pytest.raises(ValueError, match="padding_side must be one of"):
        Layout({"input_ids": Padded(0)}, length="input_ids", padding_side="middle")

"""Serve settings checked without starting Serve: the model replica's ongoing-request limit lets batches fill."""

import pytest

from deploy.app import SMALL_REQUEST_TOKENS, model_ongoing_requests


def test_default_holds_a_full_batch_of_small_requests():
    """Serve's defaults (5 ongoing, batches of 10) never fill a batch; ours is sized from the token budget."""
    assert model_ongoing_requests(4096) == 4096 // SMALL_REQUEST_TOKENS == 128
    assert model_ongoing_requests(16384) == 512
    assert model_ongoing_requests(64) == 8  # never fewer than 8


def test_a_limit_that_cannot_fill_a_batch_is_refused_naming_both_numbers():
    with pytest.raises(ValueError, match=r"max_ongoing_requests=5 cannot fill a batch of max_batch_tokens=4096 \(128 "):
        model_ongoing_requests(4096, 5)
    assert model_ongoing_requests(4096, 200) == 200
    with pytest.raises(ValueError, match="positive integer"):
        model_ongoing_requests(4096, "many")

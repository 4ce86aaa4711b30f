"""feature-extraction: per-token hidden states equal transformers.pipeline on the same checkpoints."""

import pytest
import torch
import transformers

from pipelines import pipeline
from tests.checkpoints import FAMILIES, SENTENCES
from tests.compare import assert_same_output


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_transformers(checkpoint, family):
    """Nested lists (1, tokens, hidden) per input, within 1e-4, for a list and a single string."""
    path = checkpoint(family, "sequence-classification")  # a head checkpoint: the base model is taken from it
    ours = pipeline("feature-extraction", model=path)
    ref = transformers.pipeline("feature-extraction", model=str(path))
    assert_same_output(ours(SENTENCES, batch_size=4), ref(SENTENCES))
    assert_same_output(ours(SENTENCES[0]), ref(SENTENCES[0]))


def test_return_tensors_and_truncation(checkpoint):
    """return_tensors gives (1, T, H) tensors; a text over the window is cut to the model maximum."""
    path = checkpoint("bert", "base")
    ours = pipeline("feature-extraction", model=path)
    ref = transformers.pipeline("feature-extraction", model=str(path))
    out = ours(SENTENCES[2], return_tensors=True)
    assert isinstance(out, torch.Tensor)
    assert_same_output(out, ref(SENTENCES[2], return_tensors=True))
    long = " ".join(["word"] * 500)
    assert ours(long, return_tensors=True).shape[1] == ours.max_length == 64
    assert_same_output(ours(long, truncation=True), ref(long, truncation=True))
    with pytest.raises(ValueError, match="more than the model's maximum of 64"):
        ours(long, truncation=False)

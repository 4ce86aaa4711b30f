"""fill-mask: outputs equal transformers.pipeline on the same tiny masked-LM checkpoints, every option."""

import pytest
import transformers

from pipelines import pipeline
from tests.checkpoints import FAMILIES
from tests.compare import assert_same_output


@pytest.fixture(scope="module", params=FAMILIES)
def pair_of_pipelines(request, checkpoint):
    path = checkpoint(request.param, "masked-lm")
    return pipeline("fill-mask", model=path), transformers.pipeline("fill-mask", model=str(path))


def texts(mask):
    return [
        f"Hello {mask}!",
        f"The quick brown {mask} jumps over the lazy dog.",
        f"{mask}",
        f"A café in Zürich serves {mask} coffee.",
        f"The {mask} fox {mask} over the {mask} dog.",
    ]


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 3}, {"top_k": 1}])
def test_batch_matches_transformers(pair_of_pipelines, kwargs):
    """Tokens, token strings, filled-in sequences equal and scores within 1e-4, one and several masks per input."""
    ours, ref = pair_of_pipelines
    inputs = texts(ref.tokenizer.mask_token)
    assert_same_output(ours(inputs, batch_size=2, **kwargs), ref(inputs, **kwargs))


def test_single_input_shapes_match_transformers(pair_of_pipelines):
    """One mask: a list of dicts; several masks: one list per mask (with special tokens kept in `sequence`)."""
    ours, ref = pair_of_pipelines
    one, several = texts(ref.tokenizer.mask_token)[1], texts(ref.tokenizer.mask_token)[4]
    assert isinstance(ours(one)[0], dict) and len(ours(several)) == 3
    assert_same_output(ours(one), ref(one))
    assert_same_output(ours(several, top_k=2), ref(several, top_k=2))


def test_targets_match_transformers(pair_of_pipelines):
    """Vocabulary targets, multi-token targets (first token), unknown and empty targets resolve as transformers."""
    ours, ref = pair_of_pipelines
    inputs = texts(ref.tokenizer.mask_token)
    in_vocab = ref.tokenizer.convert_ids_to_tokens([10, 20, 30, 40])
    for targets in [in_vocab, in_vocab[0], ["unbelievably", "Hello", " world"], ["xyzzy", "", "qqq", in_vocab[1]]]:
        for kwargs in [{}, {"top_k": 2}]:
            assert_same_output(ours(inputs, targets=targets, **kwargs), ref(inputs, targets=targets, **kwargs))


def test_targets_cap_top_k_and_count_once(checkpoint):
    """top_k is capped at the number of distinct targets; a duplicated target is scored once."""
    pipe = pipeline("fill-mask", model=checkpoint("bert", "masked-lm"))
    result = pipe("Hello [MASK]!", targets=["world", "world", "hello"], top_k=10)
    assert sorted(r["token_str"] for r in result) == ["hello", "world"]


def test_list_of_one_stays_a_list(pair_of_pipelines):
    """Deviation: a one-element list returns a one-element list (transformers unwraps it)."""
    ours, ref = pair_of_pipelines
    text = texts(ref.tokenizer.mask_token)[0]
    assert_same_output(ours([text]), [ref([text])])
    assert_same_output(list(ours(iter([text, text]))), ref([text, text]))


def test_forward_returns_only_top_k_per_mask(checkpoint):
    """The model step ships (masks, top_k) scores and ids per item, never (tokens, vocabulary) logits."""
    pipe = pipeline("fill-mask", model=checkpoint("bert", "masked-lm"))
    features = [pipe.preprocess_item(t, i)[0] for i, t in enumerate(["Hello [MASK]!", "The [MASK] fox [MASK] over."])]
    outputs = pipe.run_model(features, params={"top_k": 3})
    assert {k: tuple(v.shape) for k, v in outputs[1].items()} == {"scores": (2, 3), "token_ids": (2, 3)}
    assert outputs[0]["scores"].shape[-1] == 3


def test_truncation(checkpoint):
    """Long inputs are cut to the window (the mask kept); a mask cut off, or truncation off, is a ValueError."""
    pipe = pipeline("fill-mask", model=checkpoint("bert", "masked-lm"))
    assert len(pipe("Hello [MASK]!" + " word" * 100)) == 5
    with pytest.raises(ValueError, match=r"mask token '\[MASK\]' was cut off by truncation"):
        pipe("word " * 100 + "[MASK]")
    with pytest.raises(ValueError, match="more than the model's maximum"):
        pipe("Hello [MASK]!" + " word" * 100, tokenizer_kwargs={"truncation": False})


def test_bad_parameters_and_inputs_are_named(checkpoint):
    """Missing mask token, non-string inputs, bad top_k / targets / parameters raise errors naming them."""
    pipe = pipeline("fill-mask", model=checkpoint("roberta", "masked-lm"))
    with pytest.raises(ValueError, match="input #1: no mask token '<mask>' in input"):
        pipe(["Hello <mask>", "Hello world"])
    with pytest.raises(TypeError, match="input #0: expected a string, got int"):
        pipe(3)
    with pytest.raises(TypeError, match="unknown parameters.*'topk'.*allowed: top_k, targets"):
        pipe("<mask>", topk=2)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        pipe("<mask>", top_k=0)
    with pytest.raises(ValueError, match="no usable target"):
        pipe("<mask>", targets=["", ""])
    with pytest.raises(TypeError, match="targets must be a string or a list of strings"):
        pipe("<mask>", targets=[1])
    with pytest.raises(TypeError, match="tokenizer_kwargs supports truncation and max_length"):
        pipe("<mask>", tokenizer_kwargs={"padding": True})

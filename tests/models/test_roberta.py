"""RoBERTa and XLM-RoBERTa (BERT variants in pipelines/models/bert.py): parity with transformers on tiny
checkpoints, full-size key mapping, config errors."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from pipelines.models import bert
from tests.checkpoints import HEADS, SENTENCES, assert_parity, encode, load_ours, load_reference, make_checkpoint

SUFFIXES = {
    "base": "Model",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "masked-lm": "ForMaskedLM",
}
PREFIXES = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"}
FAMILIES = list(PREFIXES)
BATCH = [SENTENCES[1], SENTENCES[0], SENTENCES[2]]  # three lengths, so two rows are padded


def ours(family: str, head: str):
    return getattr(bert, PREFIXES[family] + SUFFIXES[head])


def theirs(family: str, head: str):
    return getattr(transformers, PREFIXES[family] + SUFFIXES[head])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        (family, head): make_checkpoint(tmp_path_factory.mktemp(f"{family}-{head}"), family, head)
        for family in FAMILIES
        for head in HEADS
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_parity_padded_batch(checkpoints, family, head):
    """Each class equals transformers on a right-padded batch (position ids, mask, heads, tied decoder)."""
    path = checkpoints[family, head]
    batch = encode(path, BATCH)
    assert batch["attention_mask"].sum(1).unique().numel() == 3
    assert_parity(load_ours(path, ours(family, head)), load_reference(path, head), head, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_sentence_pairs(checkpoints, family):
    """Pair inputs (<s> A </s></s> B </s>) match with no token_type_ids given, as the tokenizer produces none."""
    path = checkpoints[family, "question-answering"]
    batch = encode(path, [SENTENCES[0], SENTENCES[7]], [SENTENCES[1], SENTENCES[3]])
    assert_parity(
        load_ours(path, ours(family, "question-answering")),
        load_reference(path, "question-answering"),
        "question-answering",
        batch,
    )


def test_position_ids_skip_padding(checkpoints):
    """A padded row gives the same real-token outputs as the same sentence alone (positions count real tokens only)."""
    path = checkpoints["roberta", "base"]
    model = load_ours(path, bert.RobertaModel)
    padded, alone = encode(path, [SENTENCES[0], SENTENCES[2]]), encode(path, [SENTENCES[0]])
    n = int(alone["attention_mask"].sum())
    with torch.no_grad():
        row = model(padded["input_ids"], padded["attention_mask"])[0, :n]
        single = model(alone["input_ids"], alone["attention_mask"])[0]
    torch.testing.assert_close(row, single, atol=1e-5, rtol=1e-5)


def test_position_ids_follow_input_ids_under_left_padding(checkpoints):
    """Positions come from input_ids != pad (as in HF), not from the column index: a left-padded batch still matches."""
    path = checkpoints["roberta", "token-classification"]
    batch = encode(path, BATCH)
    order = torch.argsort(batch["attention_mask"], dim=1, stable=True)  # padding first, real tokens in order
    left = {k: torch.gather(v, 1, order) for k, v in batch.items()}
    assert (left["attention_mask"][:, 0] == 0).any()
    assert_parity(
        load_ours(path, bert.RobertaForTokenClassification),
        load_reference(path, "token-classification"),
        "token-classification",
        left,
    )


def test_roberta_is_a_bert_variant():
    """RoBERTa shares BERT's encoder and the two heads of the same shape; only the class's config switches positions
    to fairseq numbering (config.json cannot turn it on for BERT), and the encoder sits under `roberta`."""
    assert issubclass(bert.RobertaForTokenClassification, bert.BertForTokenClassification)
    assert issubclass(bert.RobertaForQuestionAnswering, bert.BertForQuestionAnswering)
    assert bert.BertConfig.from_hf({"padding_positions": True}).padding_positions is False
    assert bert.RobertaConfig.from_hf({"padding_positions": False}).padding_positions is True
    with torch.device("meta"):
        model = bert.RobertaForQuestionAnswering(bert.RobertaConfig(num_hidden_layers=1))
    assert isinstance(model.roberta, bert.BertModel) and not hasattr(model, "bert")
    assert model.roberta.embeddings.padding_idx == 1


def test_xlm_roberta_classes_are_roberta():
    """XLM-R classes share RoBERTa's config, names and checkpoint prefix (`roberta.`), so one table serves both."""
    assert bert.XLMRobertaForMaskedLM.config_class is bert.RobertaConfig
    assert bert.XLMRobertaForMaskedLM.tied_weights == bert.RobertaForMaskedLM.tied_weights
    assert issubclass(bert.XLMRobertaModel, bert.RobertaModel)


def test_tied_mlm_weights_are_omitted_and_filled(checkpoints):
    """transformers 5 writes lm_head.bias but neither decoder weight nor bias; `tied_weights` supplies both."""
    path = checkpoints["roberta", "masked-lm"]
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.bias" in keys
    assert not {"lm_head.decoder.weight", "lm_head.decoder.bias"} & keys
    model = load_ours(path, bert.RobertaForMaskedLM)
    torch.testing.assert_close(model.lm_head.decoder.weight, model.roberta.embeddings.word_embeddings.weight)
    torch.testing.assert_close(model.lm_head.decoder.bias, model.lm_head.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint(tmp_path, family):
    """A checkpoint split over several safetensors files with an index loads to the same outputs."""
    path = make_checkpoint(tmp_path, family, "token-classification", sharded=True)
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert_parity(
        load_ours(path, ours(family, "token-classification")),
        load_reference(path, "token-classification"),
        "token-classification",
        encode(path, BATCH),
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["sequence-classification", "masked-lm"])
def test_head_checkpoint_into_bare_model(checkpoints, family, head):
    """A head checkpoint loads into the bare model (prefix stripped, head keys dropped) and equals AutoModel."""
    path = checkpoints[family, head]
    assert_parity(load_ours(path, ours(family, "base")), load_reference(path), "base", encode(path, BATCH))


def test_bare_checkpoint_keys_get_the_prefix():
    """Keys of a bare RobertaModel checkpoint map into a head model; legacy names and buffers are handled."""
    rename = bert.RobertaForTokenClassification.weights_mapper.rename
    assert rename("embeddings.word_embeddings.weight") == "roberta.embeddings.word_embeddings.weight"
    assert rename("encoder.layer.0.output.LayerNorm.gamma") == "roberta.encoder.layer.0.output.LayerNorm.weight"
    assert rename("pooler.dense.weight") is None
    assert rename("roberta.embeddings.position_ids") is None
    assert rename("lm_head.dense.weight") is None
    assert rename("something.unknown") == "something.unknown"  # left for the loader to report
    assert bert.RobertaModel.weights_mapper.rename("roberta.pooler.dense.weight") is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_full_size_key_mapping(family, head):
    """Every key of a roberta-base-sized transformers model maps onto exactly our keys and shapes (meta device)."""
    config_class = transformers.RobertaConfig if family == "roberta" else transformers.XLMRobertaConfig
    hf_config = config_class(max_position_embeddings=514, num_labels=2 if head == "question-answering" else 3)
    with torch.device("meta"):
        hf = theirs(family, head)(hf_config)
        model = ours(family, head)(bert.RobertaConfig.from_hf(hf_config.to_dict()))
    mapped = {ours(family, head).weights_mapper.rename(k): v.shape for k, v in hf.state_dict().items()}
    mapped.pop(None, None)
    assert mapped == {k: v.shape for k, v in model.state_dict().items()}


def test_from_hf_rejects_unsupported():
    """from_hf raises ValueError naming an unsupported position_embedding_type, decoder use or missing pad id."""
    with pytest.raises(ValueError, match="relative_key"):
        bert.RobertaConfig.from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="add_cross_attention"):
        bert.RobertaConfig.from_hf({"add_cross_attention": True})
    with pytest.raises(ValueError, match="pad_token_id"):
        bert.RobertaConfig.from_hf({"pad_token_id": None})
    assert bert.RobertaConfig.from_hf({"id2label": {"1": "b", "0": "a"}}).id2label == ("a", "b")


def test_too_long_input_names_the_limit(checkpoints):
    """64 tokens fit 66 positions (they start after the pad id); 65 is a ValueError naming the limit."""
    model = load_ours(checkpoints["roberta", "base"], bert.RobertaModel)
    assert model(torch.full((1, 64), 5)).shape == (1, 64, 32)
    with pytest.raises(ValueError, match="max_position_embeddings=66"):
        model(torch.full((1, 65), 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_folder_agrees_with_tokenizers(checkpoints, family):
    """AutoTokenizer on a test folder gives the same ids as tokenizers.Tokenizer on its tokenizer.json."""
    path = checkpoints[family, "base"]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = SENTENCES + [f"Paris is the {hf.mask_token} of France."]
    assert hf(texts)["input_ids"] == [e.ids for e in tok.encode_batch(texts)]
    assert hf(SENTENCES[0], SENTENCES[1])["input_ids"] == tok.encode(SENTENCES[0], SENTENCES[1]).ids
    assert max(len(e.ids) for e in tok.encode_batch(SENTENCES)) <= 64

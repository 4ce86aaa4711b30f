"""sentence-embeddings: the real MiniLM against sentence-transformers, and every pooling mode on tiny models."""

import json

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from pipelines import pipeline
from pipelines.hub import DEFAULT_MODEL, import_folder
from tests.checkpoints import SENTENCES

LONG = " ".join(["A long text about trains, rivers and old libraries."] * 60)  # ~600 tokens, over 256


@pytest.fixture(scope="module")
def minilm_reference(minilm_path):
    return SentenceTransformer(str(minilm_path), device="cpu")


def test_minilm_matches_sentence_transformers(minilm_path, minilm_reference):
    """The real all-MiniLM-L6-v2: cosine >= 0.99999 with sentence-transformers, long texts truncated at 256."""
    embed = pipeline("sentence-embeddings", model=minilm_path)
    texts = [*SENTENCES, LONG, "  padded with spaces  ", ""]
    ours = torch.tensor(embed(texts, batch_size=4))
    ref = minilm_reference.encode(texts, convert_to_tensor=True)
    cosine = F.cosine_similarity(ours, ref.float(), dim=-1)
    assert cosine.min().item() >= 0.99999, cosine
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # Normalize module read
    assert embed.max_length == 256  # sentence_bert_config.json, not the tokenizer.json's fixed 128


def test_default_model_from_the_offline_cache(minilm_path, minilm_reference):
    """pipeline("embeddings") resolves the default Hub id offline once the bundled folder is imported."""
    import_folder(minilm_path, DEFAULT_MODEL)
    embed = pipeline("embeddings")
    ours = torch.tensor(embed(["a sentence", "another one"]))
    ref = minilm_reference.encode(["a sentence", "another one"], convert_to_tensor=True)
    assert F.cosine_similarity(ours, ref, dim=-1).min().item() >= 0.99999


def _sentence_transformers_folder(path, pooling, normalize=False, dense=None):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    if dense is not None:
        from safetensors.torch import save_file

        (path / "2_Dense").mkdir(exist_ok=True)
        config = {
            "in_features": dense.in_features,
            "out_features": dense.out_features,
            "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh",
        }
        (path / "2_Dense" / "config.json").write_text(json.dumps(config))
        save_file(
            {"linear.weight": dense.weight.data, "linear.bias": dense.bias.data}, path / "2_Dense" / "model.safetensors"
        )
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": "",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    return path


POOLINGS = [
    {"pooling_mode_cls_token": True},
    {"pooling_mode_max_tokens": True},
    {"pooling_mode_mean_sqrt_len_tokens": True},
    {"pooling_mode_weightedmean_tokens": True},
    {"pooling_mode_lasttoken": True},
    {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
    {"pooling_mode": "mean"},
]


@pytest.mark.parametrize("pooling", POOLINGS, ids=lambda p: "+".join(k.split("_")[-2] if "_" in k else p[k] for k in p))
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_pooling_modes_match_sentence_transformers(tmp_path, checkpoint, family, pooling):
    """Each pooling mode (and a concatenation), read from 1_Pooling/config.json, equals sentence-transformers."""
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(checkpoint(family, "base"), folder)
    _sentence_transformers_folder(folder, pooling, normalize=True)
    ours = torch.tensor(pipeline(model=folder)(SENTENCES, batch_size=3))  # task inferred from modules.json
    ref = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_dense_module_and_overrides(tmp_path, checkpoint):
    """A Dense stage (2_Dense) applies as in sentence-transformers; pooling/normalize can be overridden."""
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(checkpoint("bert", "base"), folder)
    torch.manual_seed(0)
    _sentence_transformers_folder(
        folder, {"pooling_mode_mean_tokens": True}, normalize=True, dense=torch.nn.Linear(32, 16)
    )
    ours = torch.tensor(pipeline("sentence-embeddings", model=folder)(SENTENCES))
    ref = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert ours.shape == (len(SENTENCES), 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    raw = pipeline("sentence-embeddings", model=folder, pooling="cls", normalize=False)
    assert not torch.allclose(torch.tensor(raw(SENTENCES)).norm(dim=-1), torch.ones(len(SENTENCES)))
    with pytest.raises(ValueError, match="unknown pooling mode 'avg'"):
        pipeline("sentence-embeddings", model=folder, pooling="avg")

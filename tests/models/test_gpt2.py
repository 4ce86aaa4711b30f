"""GPT-2 causal LM: parity with transformers, the KV-cache paths, Conv1D and legacy keys at load, config errors."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipelines import registry
from pipelines.loading import load_model
from pipelines.models import gpt2
from pipelines.runtime import RuntimeConfig
from tests.checkpoints import PROMPTS, SENTENCES, cached_logits, load_ours, load_reference

ATOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("gpt2", "causal-lm")


@pytest.fixture(scope="module")
def models(path):
    return load_ours(path, gpt2.GPT2LMHeadModel), load_reference(path, "causal-lm")


def _batch(path, texts):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    return tok(texts, padding=True, return_tensors="pt")


def test_full_sequence_logits_match(models, path):
    """Every position's logits equal transformers' on a right-padded batch (real positions compared)."""
    ours, ref = models
    batch = _batch(path, SENTENCES[:4])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.unique().numel() == 4
    with torch.no_grad():
        got = ours(batch["input_ids"], lengths=lengths)
        want = ref(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], **ATOL)


def test_last_only_is_the_last_real_token(models, path):
    """last_only gives (B, 1, V): the logits at each row's last real token, the lm_head run there only."""
    ours, _ = models
    batch = _batch(path, SENTENCES[:3])
    lengths = batch["attention_mask"].sum(1)
    with torch.no_grad():
        full = ours(batch["input_ids"], lengths=lengths)
        last = ours(batch["input_ids"], lengths=lengths, last_only=True)
    assert last.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[torch.arange(3), lengths - 1])


@pytest.mark.parametrize("prefill,chunk", [(1, 1), (5, 1), (4, 3)])
def test_cached_decoding_equals_full_forward(models, path, prefill, chunk):
    """Prefill then decode one token (or a chunk) at a time through the KV cache gives the full-pass logits."""
    ours, _ = models
    ids = _batch(path, [SENTENCES[2]])["input_ids"]
    with torch.no_grad():
        full = ours(ids)
    torch.testing.assert_close(cached_logits(ours, ids, prefill, chunk), full, **ATOL)


def test_padded_batch_equals_each_alone(models, path):
    """A right-padded batch of different lengths gives each row what it gets alone, with and without the cache."""
    ours, _ = models
    tok = transformers.AutoTokenizer.from_pretrained(path)
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    from pipelines import layers

    cache = layers.KVCache(*ours.config.cache_shape, slots=len(rows), capacity=T, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        plain = ours(ids, lengths=lengths)
        cached = ours(ids, lengths=lengths, cache=cache.rows(0, T, prefill=True))
        for i, r in enumerate(rows):
            alone = ours(torch.tensor([r]))[0]
            torch.testing.assert_close(plain[i, : len(r)], alone, **ATOL)
            torch.testing.assert_close(cached[i, : len(r)], alone, **ATOL)


def test_load_model_through_the_loader(models, path):
    """pipelines.loading.load_model: Conv1D weights transposed by the weights mapper's tensor hook, lm_head tied to wte."""
    ours = load_model(path, gpt2.GPT2LMHeadModel, RuntimeConfig.create())
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    ids = _batch(path, [SENTENCES[1]])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), models[1](ids).logits, **ATOL)


def test_legacy_bare_checkpoint_with_mask_buffers(models, path, tmp_path):
    """An openai-community/gpt2-style file (no `transformer.` prefix, attn.bias / attn.masked_bias buffers) loads."""
    state = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = load_model(tmp_path, gpt2.GPT2LMHeadModel, RuntimeConfig.create())
    ids = _batch(path, [SENTENCES[1]])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), models[1](ids).logits, **ATOL)


def test_attention_scale_options_match(checkpoint):
    """scale_attn_by_inverse_layer_idx (and scale_attn_weights=False) change the scores exactly as in transformers."""
    for options in ({"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}):
        path = checkpoint("gpt2", "causal-lm", **options)
        ids = torch.tensor([[5, 17, 33, 2, 99, 150, 7]])
        with torch.no_grad():
            got = load_ours(path, gpt2.GPT2LMHeadModel)(ids)
            torch.testing.assert_close(got, load_reference(path, "causal-lm")(ids).logits, **ATOL)


def test_full_size_key_mapping():
    """Every key of a gpt2-sized transformers model maps onto our keys, Conv1D shapes transposed (meta device)."""
    hf_config = transformers.GPT2Config()
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_config)
        ours = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_hf(hf_config.to_dict()))
    cls = gpt2.GPT2LMHeadModel
    theirs = {}
    for key, tensor in hf.state_dict().items():
        name = cls.weights_mapper.rename(key)
        if name is not None:
            theirs[name] = tuple(cls.weights_mapper.convert(name, tensor).shape)
    assert theirs == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.config.cache_shape == (12, 12, 64) and ours.config.max_input_length == 1024


def test_from_hf_rejects_unsupported():
    """from_hf raises ValueError naming what is not implemented; n_inner defaults to 4 * n_embd."""
    assert gpt2.GPT2Config.from_hf({"n_embd": 64, "n_head": 4}).n_inner == 256
    for key in ("reorder_and_upcast_attn", "add_cross_attention"):
        with pytest.raises(ValueError, match=key):
            gpt2.GPT2Config.from_hf({key: True})
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        gpt2.GPT2Config.from_hf({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="unsupported activation"):
        gpt2.GPT2Config.from_hf({"activation_function": "gelu_fancy"})
    with pytest.raises(ValueError, match="n_positions=128"):
        gpt2.GPT2LMHeadModel(gpt2.GPT2Config(n_positions=128, n_layer=1, n_embd=8, n_head=2, vocab_size=10))(
            torch.zeros(1, 129, dtype=torch.long)
        )


def test_registry_knows_the_architecture():
    """config.json's GPT2LMHeadModel resolves to our class under the causal-lm head (serving text-generation)."""
    assert registry.ARCHITECTURES["GPT2LMHeadModel"] == ("gpt2", "causal-lm")
    assert registry.MODEL_CLASSES["gpt2"]["causal-lm"] is gpt2.GPT2LMHeadModel
    assert registry.HEAD_TASKS["causal-lm"] == "text-generation"
    with pytest.raises(ValueError, match=r"model_type 'gpt2' has only \['causal-lm'\]"):
        registry.model_class("text-classification", {"model_type": "gpt2"})


def test_tokenizer_folder_agrees_with_tokenizers(path):
    """AutoTokenizer and tokenizers.Tokenizer give the same ids; no special tokens are added; eos is in config."""
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = SENTENCES + PROMPTS + ["text <|endoftext|> more"]
    assert hf(texts)["input_ids"] == [e.ids for e in ours.encode_batch(texts)]
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    assert ours.encode("<|endoftext|>").ids == [eos]
    assert ours.decode(ours.encode(SENTENCES[3]).ids) == SENTENCES[3]

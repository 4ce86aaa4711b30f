"""Llama, Mistral and Qwen2 causal LMs: parity with transformers across config variants (GQA, rotary scaling,
sliding windows, biases, tied embeddings), the KV-cache paths, loading, and config errors."""

import dataclasses
import importlib

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipelines import layers, registry
from pipelines.loading import CheckpointError, load_model
from pipelines.models import llama
from pipelines.runtime import RuntimeConfig
from tests.checkpoints import CHAT, PROMPTS, SENTENCES, cached_logits, load_ours, load_reference

ATOL = {"atol": 1e-4, "rtol": 1e-4}
CLASSES = {"llama": llama.LlamaForCausalLM, "mistral": llama.MistralForCausalLM, "qwen2": llama.Qwen2ForCausalLM}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
# (family, config overrides): each changes what the model computes; dynamic NTK only acts beyond
# max_position_embeddings, so that variant gets max_position_embeddings=16 and 24-token inputs.
VARIANTS = {
    "llama": ("llama", {}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic": (
        "llama",
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    ),
    "llama-llama3": ("llama", {"rope_scaling": LLAMA3}),
    "llama-biases-head_dim": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 16, "rope_theta": 500.0}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2-tied-windows": (
        "qwen2",
        {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, checkpoint):
    path = _variant_path(checkpoint, request.param)
    return (
        request.param,
        path,
        load_ours(path, CLASSES[VARIANTS[request.param][0]]),
        load_reference(path, "causal-lm"),
    )


def _ids(T: int = 24, B: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def test_full_sequence_logits_match(variant):
    """Every position's logits equal transformers' in float32 (24 tokens: past the window and max positions)."""
    _, _, ours, ref = variant
    ids = _ids(B=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, **ATOL)


def test_cached_decoding_equals_full_forward(variant):
    """Prefill, then one token at a time (and 3 at a time) through the KV cache, gives the full-pass logits.

    Dynamic NTK rescales the rotary base with the sequence length at every step while cached keys keep their
    rotation (as in transformers), so that variant is compared within max_position_embeddings=16 only."""
    name, _, ours, _ = variant
    ids = _ids(16 if name == "llama-dynamic" else 24, B=2)
    with torch.no_grad():
        full = ours(ids)
    torch.testing.assert_close(cached_logits(ours, ids, 6), full, **ATOL)
    torch.testing.assert_close(cached_logits(ours, ids, 2, chunk=3), full, **ATOL)


def test_padded_batch_equals_each_alone(variant):
    """A right-padded batch of different lengths gives each row what it gets alone, with and without the cache."""
    _, _, ours, _ = variant
    lengths = [24, 7, 1, 18]
    ids = _ids(B=4)
    cache = layers.KVCache(*ours.config.cache_shape, slots=4, capacity=24, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        plain = ours(ids, lengths=torch.tensor(lengths))
        cached = ours(ids, lengths=torch.tensor(lengths), cache=cache.rows(0, 24, prefill=True))
        last = ours(ids, lengths=torch.tensor(lengths), last_only=True)
        for i, n in enumerate(lengths):
            alone = ours(ids[i : i + 1, :n])[0]
            torch.testing.assert_close(plain[i, :n], alone, **ATOL)
            torch.testing.assert_close(cached[i, :n], alone, **ATOL)
            torch.testing.assert_close(last[i, 0], alone[-1], **ATOL)


def _variant_path(checkpoint, name):
    family, options = VARIANTS[name]
    return checkpoint(family, "causal-lm", **options)


def test_variants_change_the_output(checkpoint):
    """Guards the parity tests against passing vacuously: windows and rope scaling do change the logits."""
    ids = _ids()
    base = load_ours(_variant_path(checkpoint, "llama"), llama.LlamaForCausalLM)
    with torch.no_grad():
        reference = base(ids)
        for name in ("llama-linear", "llama-dynamic", "llama-llama3"):
            scaled = load_ours(_variant_path(checkpoint, name), llama.LlamaForCausalLM)
            assert not torch.allclose(scaled(ids), reference, atol=1e-3), name
        mistral = load_ours(_variant_path(checkpoint, "mistral-window"), llama.MistralForCausalLM)
        windowed = mistral(ids)
        for layer in mistral.model.layers:
            layer.self_attn.window = None
        mistral.model.config = dataclasses.replace(mistral.config, sliding_windows=(None, None))
        unwindowed = mistral(ids)
    torch.testing.assert_close(windowed[:, :5], unwindowed[:, :5])  # within the window: identical
    assert not torch.allclose(windowed[:, 5:], unwindowed[:, 5:], atol=1e-3)


def test_qwen2_tied_and_untied_heads(checkpoint):
    """tie_word_embeddings decides whether lm_head shares the embedding or comes from the checkpoint."""
    runtime = RuntimeConfig.create()
    tied = load_model(_variant_path(checkpoint, "qwen2-tied-windows"), llama.Qwen2ForCausalLM, runtime)
    untied = load_model(_variant_path(checkpoint, "qwen2-untied"), llama.Qwen2ForCausalLM, runtime)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    assert tied.config.sliding_windows == (None, 4) and untied.config.sliding_windows == (None, None)


@pytest.mark.parametrize("name", ["llama", "mistral-window", "qwen2-untied"])
def test_load_model_through_the_loader(checkpoint, name):
    """pipelines.loading.load_model builds, loads and places each family; logits equal transformers'."""
    path = _variant_path(checkpoint, name)
    ours = load_model(path, CLASSES[VARIANTS[name][0]], RuntimeConfig.create())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), load_reference(path, "causal-lm")(ids).logits, **ATOL)


def test_untied_checkpoint_without_head_is_an_error(checkpoint, tmp_path):
    """An untied model whose checkpoint lacks lm_head.weight fails loading, naming the key (no silent tie)."""
    path = _variant_path(checkpoint, "qwen2-untied")
    state = {k: v for k, v in load_file(path / "model.safetensors").items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(tmp_path, llama.Qwen2ForCausalLM, RuntimeConfig.create())


def test_rope_spellings_agree():
    """transformers 5's rope_parameters and the older rope_scaling + rope_theta (with `type`) resolve the same."""
    base = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
    new = llama.LlamaConfig.from_hf(
        {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}
    )
    old = llama.LlamaConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0})
    assert new == old
    plain = llama.LlamaConfig.from_hf({**base, "rope_theta": 500.0, "rope_scaling": None})
    assert plain.rotary.inv_freq == tuple(x * 2.0 for x in new.rotary.inv_freq)
    dynamic = llama.LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    assert (dynamic.rotary.dynamic_factor, dynamic.rotary.max_positions) == (4.0, 64)


ROTARY_CLASSES = {"llama": "LlamaRotaryEmbedding", "mistral": "MistralRotaryEmbedding", "qwen2": "Qwen2RotaryEmbedding"}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rotary_inverse_frequencies_match_transformers(family):
    """Our resolved inverse frequencies equal transformers' rotary module's for every supported rope type."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    hf_rotary = getattr(modeling, ROTARY_CLASSES[family])
    for scaling in (
        None,
        {"rope_type": "linear", "factor": 3.0},
        {"rope_type": "dynamic", "factor": 2.0},
        dict(LLAMA3, original_max_position_embeddings=32),
    ):
        hf_config = transformers.AutoConfig.for_model(
            family,
            hidden_size=256,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling=scaling,
            max_position_embeddings=64,
        )
        ours = CLASSES[family].config_class.from_hf(hf_config.to_dict())
        torch.testing.assert_close(torch.tensor(ours.rotary.inv_freq), hf_rotary(hf_config).inv_freq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_full_size_key_mapping(family):
    """A 7B-sized transformers model's keys and shapes equal ours, on the meta device (no memory)."""
    hf_config = transformers.AutoConfig.for_model(family, num_key_value_heads=8, num_hidden_layers=2, vocab_size=32000)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = CLASSES[family](CLASSES[family].config_class.from_hf(hf_config.to_dict()))
    theirs = {CLASSES[family].weights_mapper.rename(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert theirs == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours.config.cache_shape == (2, 8, hf_config.hidden_size // hf_config.num_attention_heads)


def test_legacy_and_bare_keys():
    """Old conversions' rotary_emb.inv_freq buffers are dropped; bare LlamaModel keys get the `model.` prefix."""
    rename = llama.LlamaForCausalLM.weights_mapper.rename
    assert rename("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert rename("layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert rename("embed_tokens.weight") == "model.embed_tokens.weight"
    assert rename("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize(
    "config,match",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type='yarn'.*supported: \('default', 'linear'"),
        ({"rope_parameters": {"rope_type": "linear"}}, "needs a `factor`"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"hidden_act": "gelu_fancy"}, "unsupported activation"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq'"),
    ],
)
def test_from_hf_rejects_unsupported(config, match):
    """from_hf raises ValueError naming the key and the supported values."""
    with pytest.raises(ValueError, match=match):
        llama.LlamaConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, **config})


def test_qwen2_windows_from_config():
    """Qwen2 windows: none unless use_sliding_window; then from max_window_layers on, or as layer_types say."""
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3, "sliding_window": 8}
    assert llama.Qwen2Config.from_hf(base).sliding_windows == (None, None, None)
    on = {**base, "use_sliding_window": True, "max_window_layers": 1}
    assert llama.Qwen2Config.from_hf(on).sliding_windows == (None, 8, 8)
    types = {**on, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    assert llama.Qwen2Config.from_hf(types).sliding_windows == (8, None, 8)
    with pytest.raises(ValueError, match="layer_types"):
        llama.Qwen2Config.from_hf({**on, "layer_types": ["chunked_attention"] * 3})
    assert llama.MistralConfig.from_hf({**base, "sliding_window": None}).sliding_windows == (None, None, None)
    assert llama.LlamaConfig.from_hf(base).sliding_windows == (None, None, None)


def test_registry_knows_the_architectures():
    """config.json architecture strings resolve to our classes under the causal-lm head."""
    for family, cls in CLASSES.items():
        assert registry.ARCHITECTURES[cls.__name__] == (family, "causal-lm")
        assert registry.MODEL_CLASSES[family]["causal-lm"] is cls


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tokenizer_folder_agrees_with_tokenizers(checkpoint, family):
    """AutoTokenizer and tokenizers.Tokenizer give the same ids (bos added for Llama/Mistral, byte fallback for
    unseen characters), and the chat template renders with the special tokens."""
    path = checkpoint(family, "causal-lm")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_file(str(path / "tokenizer.json"))
    texts = SENTENCES + PROMPTS + ["émoji 🤗 ünïcödé", "  two  spaces"]
    assert hf(texts)["input_ids"] == [e.ids for e in ours.encode_batch(texts)]
    ids = [e.ids for e in ours.encode_batch(texts)]
    assert [ours.decode(i) for i in ids] == [hf.decode(i, skip_special_tokens=True) for i in ids]
    assert [ours.decode(i) for i in ids[:-1]] == texts[:-1]  # (a leading space is dropped, as SentencePiece does)
    chat = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert CHAT[1]["content"] in chat and CHAT[3]["content"] in chat
    if family == "qwen2":
        assert chat.endswith("<|im_start|>assistant\n") and ours.token_to_id("<|im_end|>") is not None
    else:
        assert ours.encode("hi").ids[0] == 1 and "[INST]" in chat
        assert any(t.startswith("<0x") for t in ours.encode("🤗").tokens)  # byte fallback

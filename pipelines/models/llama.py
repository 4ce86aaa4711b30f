"""Llama, Mistral and Qwen2 causal language models: one decoder, three config readers, the checkpoint-name table.

The three families differ only in what config.json may ask for, all resolved once in `from_hf`: grouped-query
attention (`num_key_value_heads`), `head_dim`, projection biases (Llama's `attention_bias` / `mlp_bias`, Qwen2's
fixed q/k/v biases), sliding windows (Mistral's `sliding_window` on every layer, Qwen2's `use_sliding_window` from
layer `max_window_layers` on, or its `layer_types`), tied or untied embeddings, and rotary scaling (none, linear,
dynamic NTK, llama3) read from transformers 5's `rope_parameters` or the older `rope_scaling` + `rope_theta`.

`forward(input_ids, positions, lengths=, cache=, last_only=)` serves both a plain full-sequence pass and the
generation engine's prefill and decode steps (see `LlamaForCausalLM.forward`). Inference only, so no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# config.json keys LlamaConfig takes as they are; from_hf resolves the others.
PLAIN_KEYS = (
    "vocab_size",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def _rope_parameters(d: dict) -> dict:
    """The rotary settings of config.json as one flat dict with `rope_type` and `rope_theta`.

    transformers 5 writes `rope_parameters` (theta inside); older files `rope_scaling` (`type` or `rope_type`)
    beside a top-level `rope_theta`. As in transformers, `rope_scaling` wins when both are present.
    """
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters {sorted(params)} are not supported; give one flat dict")
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial!r} is not supported; supported: 1.0")
    return params


def _rotary(d: dict, head_dim: int, max_positions: int) -> layers.Rotary:
    """The layers.Rotary of config.json: inverse frequencies computed here, once."""
    params = _rope_parameters(d)
    kind, theta = params["rope_type"], float(params["rope_theta"])
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_parameters.rope_type={kind!r} is not supported; supported: {ROPE_TYPES}")
    if kind != "default" and not params.get("factor"):
        raise ValueError(f"rope_parameters.rope_type={kind!r} needs a `factor`, got {params.get('factor')!r}")
    inv_freq = layers.rope_inv_freq(theta, head_dim)
    if kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"rope_parameters.rope_type='llama3' needs {key!r}; it has {sorted(params)}")
        original = params.get("original_max_position_embeddings", max_positions)
        inv_freq = layers.llama3_inv_freq(
            inv_freq, params["factor"], params["low_freq_factor"], params["high_freq_factor"], original
        )
    dynamic = float(params["factor"]) if kind == "dynamic" else None
    return layers.Rotary(tuple(inv_freq.tolist()), theta, dynamic, max_positions)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases of q_proj, k_proj, v_proj
    o_bias: bool = False  # bias of o_proj
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer: keys within this many positions, or None (all)
    rotary: layers.Rotary = field(default_factory=lambda: layers.Rotary(()))  # resolved by from_hf

    @property
    def max_input_length(self) -> int:
        """The longest sequence (prompt + generated tokens) the model was trained for."""
        return self.max_position_embeddings

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size) of the KV cache."""
        return self.num_hidden_layers, self.num_key_value_heads, self.head_dim

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        """Read a config.json dict; ValueError naming the key and value for anything not implemented here."""
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method")
            raise ValueError(f"quantization_config (quant_method={method!r}) checkpoints are not supported")
        hidden, n_head = d.get("hidden_size", cls.hidden_size), d.get("num_attention_heads", cls.num_attention_heads)
        n_kv = d.get("num_key_value_heads") or n_head
        head_dim = d.get("head_dim") or hidden // n_head
        n_layers = d.get("num_hidden_layers", cls.num_hidden_layers)
        if n_head % n_kv:
            raise ValueError(f"num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_kv}")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary position embeddings")
        fields = {k: d[k] for k in PLAIN_KEYS if k in d}
        config = cls(
            **fields,
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            **cls._family_options(d, n_layers),
        )
        layers.activation(config.hidden_act)  # raises for an unknown activation
        return replace(config, rotary=_rotary(d, head_dim, config.max_position_embeddings))

    @classmethod
    def _family_options(cls, d: dict, n_layers: int) -> dict:
        """Biases and sliding windows: Llama has `attention_bias` (all four projections), `mlp_bias`, no windows."""
        bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": mlp_bias, "sliding_windows": (None,) * n_layers}


@dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    @classmethod
    def _family_options(cls, d: dict, n_layers: int) -> dict:
        """No biases; `sliding_window` (transformers' default 4096 when absent, null for none) on every layer."""
        window = d.get("sliding_window", 4096)
        return {"sliding_windows": (window,) * n_layers}


@dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    @classmethod
    def _family_options(cls, d: dict, n_layers: int) -> dict:
        """q/k/v biases; a window (only with `use_sliding_window`) on the layers `layer_types` names
        'sliding_attention', or when it is absent on layers from `max_window_layers` on."""
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        types = d.get("layer_types")
        if types is None:
            first = d.get("max_window_layers", 28)
            types = [
                "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layers)
            ]
        if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
            raise ValueError(
                f"layer_types={types!r} is not supported; give num_hidden_layers={n_layers} entries "
                "of 'full_attention' or 'sliding_attention'"
            )
        windows = tuple(window if t == "sliding_attention" else None for t in types)
        return {"qkv_bias": True, "sliding_windows": windows}


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        C, hs = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, hs
        self.window = config.sliding_windows[layer_idx]
        self.q_proj = nn.Linear(C, config.num_attention_heads * hs, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, config.num_key_value_heads * hs, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, config.num_key_value_heads * hs, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * hs, C, bias=config.o_bias)

    def forward(self, x: torch.Tensor, step: layers.DecoderStep, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = (
            proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh or nkv, T, hs)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        y = layers.causal_attention(q, k, v, step, self.layer_idx, self.window)  # (B, T, nh * hs)
        return self.o_proj(y)  # (B, T, C)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, H = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, H, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, H, bias=config.mlp_bias)
        self.down_proj = nn.Linear(H, C, bias=config.mlp_bias)
        self.act = layers.activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, step: layers.DecoderStep, cos: torch.Tensor, sin: torch.Tensor):
        x = x + self.self_attn(self.input_layernorm(x), step, cos, sin)  # (B, T, C)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm -> hidden states (B, T, C), or (B, 1, C) with last_only."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = layers.RotaryEmbedding(config.rotary)

    def forward(self, input_ids, positions=None, *, lengths=None, cache=None, last_only=False) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        step = layers.decoder_step(input_ids, positions, lengths, cache, self.config.sliding_windows, x.dtype)
        cos, sin = self.rotary_emb(step.positions, step.seq_lengths, x.dtype)  # (B, T, hs)
        for layer in self.layers:
            x = layer(x, step, cos, sin)
        if last_only:
            x = layers.last_tokens(x, step.lengths)  # (B, 1, C)
        return self.norm(x)


# Checkpoint names, one entry per deviation (see pipelines.loading.WeightsMapper for the order they apply in).
LLAMA_WEIGHTS = WeightsMapper(
    prefix="model.",
    base_parts=("embed_tokens", "layers", "norm"),  # a bare base-model checkpoint
    suffixes={".rotary_emb.inv_freq": None},  # computed from config.json, stored by old conversions
)


class LlamaForCausalLM(nn.Module):
    """The decoder and its language-model head; what the loader reads off the class: config, weights mapper, ties."""

    config_class = LlamaConfig
    weights_mapper = LLAMA_WEIGHTS
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}  # used when config.tie_word_embeddings

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, positions=None, *, lengths=None, cache=None, last_only=False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) at each row's last real token with `last_only` (the lm_head runs there only).

        input_ids (B, T), right-padded; positions (B, T) of the tokens (default 0..T-1; padding continues
        counting); lengths (B,) real tokens per row (default T); cache, the engine's `layers.KVRows` for these
        rows: the tokens' keys and values are written at their positions and attention reads the cache, or None
        for a self-contained pass over the tokens given.
        """
        h = self.model(input_ids, positions, lengths=lengths, cache=cache, last_only=last_only)  # (B, T or 1, C)
        return self.lm_head(h)


class MistralForCausalLM(LlamaForCausalLM):
    config_class = MistralConfig


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class = Qwen2Config

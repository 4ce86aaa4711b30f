"""GPT-2: config, decoder, language-model head and the checkpoint-name table.

Checkpoints store the attention and MLP projections as Conv1D weights (in_features, out_features); here they are
plain nn.Linear layers and the weights mapper's tensor hook transposes them once at load. The head is tied to `wte`.
`forward(input_ids, positions, lengths=, cache=, last_only=)` serves a plain full-sequence pass and the generation
engine's prefill and decode steps alike (see `GPT2LMHeadModel.forward`). Inference only, so no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 3072
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @property
    def max_input_length(self) -> int:
        """The longest sequence (prompt + generated tokens): one position embedding each."""
        return self.n_positions

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size) of the KV cache."""
        return self.n_layer, self.n_head, self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, d: dict) -> GPT2Config:
        """Read a config.json dict; ValueError naming the key and value for anything not implemented here."""
        for key in ("add_cross_attention", "reorder_and_upcast_attn"):
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r} is not supported; supported: false")
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method")
            raise ValueError(f"quantization_config (quant_method={method!r}) checkpoints are not supported")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "n_inner"}
        n_embd = fields.get("n_embd", cls.n_embd)
        config = cls(**fields, n_inner=d.get("n_inner") or 4 * n_embd)
        layers.activation(config.activation_function)  # raises for an unknown activation
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        return config


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        C = config.n_embd
        self.layer_idx, self.n_head = layer_idx, config.n_head
        scale = (C // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, step: layers.DecoderStep) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            for t in self.c_attn(x).split(C, dim=2)
        )
        y = layers.causal_attention(q, k, v, step, self.layer_idx, None, scale=self.scale)  # (B, T, C)
        return self.c_proj(y)


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = layers.activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))  # (B, T, C)


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, step: layers.DecoderStep) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Token and position embeddings, blocks and the final norm -> hidden states (B, T, C), or (B, 1, C)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, positions=None, *, lengths=None, cache=None, last_only=False) -> torch.Tensor:
        T, n_pos = input_ids.shape[1], self.config.n_positions
        if positions is None and T > n_pos:
            raise ValueError(f"sequence of {T} tokens is longer than n_positions={n_pos}")
        x = self.wte(input_ids)  # (B, T, C)
        step = layers.decoder_step(input_ids, positions, lengths, cache, (None,), x.dtype)
        x = x + self.wpe(step.positions)
        for block in self.h:
            x = block(x, step)
        if last_only:
            x = layers.last_tokens(x, step.lengths)  # (B, 1, C)
        return self.ln_f(x)


CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # stored (in, out), as Conv1D layers


def _conv1d_as_linear(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The checkpoint tensor for our key `name`: Conv1D weights transposed into nn.Linear's (out, in) once."""
    return tensor.t().contiguous() if name.endswith(CONV1D) else tensor


# Checkpoint names, one entry per deviation (see pipelines.loading.WeightsMapper for the order they apply in).
GPT2_WEIGHTS = WeightsMapper(
    prefix="transformer.",
    base_parts=("wte", "wpe", "h", "ln_f"),  # a bare GPT2Model checkpoint (openai-community/gpt2)
    suffixes={".attn.bias": None, ".attn.masked_bias": None},  # causal-mask buffers of old checkpoints
    tensor_hook=_conv1d_as_linear,
)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 and its tied language-model head; what the loader reads off the class: config, weights mapper, ties."""

    config_class = GPT2Config
    weights_mapper = GPT2_WEIGHTS
    tied_weights = {"lm_head.weight": "transformer.wte.weight"}  # used when config.tie_word_embeddings

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, input_ids, positions=None, *, lengths=None, cache=None, last_only=False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) at each row's last real token with `last_only` (the lm_head runs there only).

        input_ids (B, T), right-padded; positions (B, T) of the tokens (default 0..T-1; padding continues
        counting); lengths (B,) real tokens per row (default T); cache, the engine's `layers.KVRows` for these
        rows: the tokens' keys and values are written at their positions and attention reads the cache, or None
        for a self-contained pass over the tokens given.
        """
        h = self.transformer(input_ids, positions, lengths=lengths, cache=cache, last_only=last_only)
        return self.lm_head(h)  # (B, T or 1, V)

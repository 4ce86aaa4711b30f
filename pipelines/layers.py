"""Shared maths for the model families: the attention call and int8 weight-only linear layers.

Only torch is imported here; model files import this module and nothing of each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str):
    """The activation function named in a config.json (`hidden_act`), or ValueError listing the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) 1/0 mask of real tokens -> (B, 1, 1, T) additive mask for scaled_dot_product_attention.

    An additive float mask (0 or the dtype's minimum) rather than a boolean one keeps padded query
    rows finite, which matters because padded positions are still computed (and discarded later).
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


SCORE_BLOCK_BYTES = 2 * 2**20  # CPU bmm form: attention scores computed per chunk of heads, about the L2 cache
FP32_BMM_MAX_TOKENS = 128  # float32 on CPU: the bmm form up to this length, the flash kernel above


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention over heads: q, k, v (B, nh, T, hs), mask from `padding_mask` -> (B, T, nh * hs).

    On CPU, bfloat16/float16 at every length and float32 up to FP32_BMM_MAX_TOKENS run as batched matmuls
    around a softmax (`_bmm_attention`); everything else as scaled_dot_product_attention. Measured on the
    2-core CPU with MiniLM's 12 heads of 32 and B*T = 2,048 tokens: in bfloat16 the bmm form is 1.6-1.8x
    faster than the flash kernel at every length from 16 to 384 tokens; in float32 it is 1.2-2.6x faster up
    to 128 tokens, level at 160-192 and 1.1-1.25x slower from 256 up, where the kernel's tiling pays.
    """
    B, nh, T, hs = q.shape
    if q.device.type == "cpu" and (T <= FP32_BMM_MAX_TOKENS or q.dtype in (torch.bfloat16, torch.float16)):
        y = _bmm_attention(q, k, v, mask)  # (B, nh, T, hs)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, nh * hs)


def _bmm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs) + mask) v as baddbmm -> softmax -> bmm over the B*nh heads, a chunk of heads at a
    time so that each chunk's (T, T) scores stay within SCORE_BLOCK_BYTES (cache-sized). The padding mask is
    broadcast over query rows, never expanded to (T, T).
    """
    B, nh, T, hs = q.shape
    q, k, v = (x.reshape(B * nh, T, hs) for x in (q, k, v))  # (B*nh, T, hs)
    if mask is None:
        bias = q.new_zeros(B * nh, 1, T)
    else:
        bias = mask.expand(B, nh, 1, T).reshape(B * nh, 1, T)  # (B*nh, 1, T)
    step = max(1, SCORE_BLOCK_BYTES // (T * T * q.element_size()))
    y = torch.empty_like(q)  # (B*nh, T, hs)
    for i in range(0, B * nh, step):
        heads = slice(i, i + step)
        scores = torch.baddbmm(bias[heads], q[heads], k[heads].transpose(1, 2), alpha=hs**-0.5)  # (n, T, T)
        y[heads] = torch.bmm(scores.softmax(dim=-1), v[heads])  # (n, T, hs)
    return y.view(B, nh, T, hs)


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: per-output-channel symmetric scales, activations stay in their dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, linear.weight.device)
        layer.weight.copy_(q)
        layer.scales.copy_(scales.to(linear.weight.dtype))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


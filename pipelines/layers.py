"""Shared maths for the model families: the attention calls, int8 weight-only linear layers, and for decoders
RMSNorm, rotary position embeddings and the KV cache that the generation engine owns.

Only torch is imported here; model files import this module and nothing of each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: per-output-channel symmetric scales; the output is in the input's dtype.

    On the CPU it multiplies through torch's int8 weight kernel (`aten._weight_int8pack_mm`), which reads the int8
    weight as it is and computes in bfloat16 (the activations and the scales cast to it, the product cast back):
    its float32 path is scalar code on torch 2.13's CPU build (measured on the 2-core AVX512 machine, 576 -> 1536:
    23 ms at 32 rows against 0.47 ms in bfloat16, 0.032 ms against 0.075 for the dense float32 layer at one row),
    and dequantizing the weight at every call, the path elsewhere, cost more than the float32 layer it replaces
    (0.68 ms against 0.49 at 32 rows). So on the CPU an int8 layer's matmul has bfloat16 precision, as
    `quantization.Int4Linear`'s does. The kernel needs in_features a multiple of 16 (others gave wrong sums or
    crashed on torch 2.13); other layers dequantize.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, linear.weight.device
        )
        layer.weight.copy_(q)
        layer.scales.copy_(scales.to(linear.weight.dtype))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and _INT8_KERNEL and self.in_features % 16 == 0:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (B*T, K)
            y = torch._weight_int8pack_mm(x2, self.weight, self._bf16_scales()).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _bf16_scales(self) -> torch.Tensor:
        """The scales in bfloat16, the kernel's dtype, converted once (again only if they are replaced)."""
        key = (self.scales.data_ptr(), self.scales._version)
        if getattr(self, "_bf16_key", None) != key:
            self._bf16, self._bf16_key = self.scales.to(torch.bfloat16), key
        return self._bf16

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# -- decoders: RMSNorm, rotary position embeddings, the engine's KV cache, causal attention ---------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (Llama, Mistral, Qwen2)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """1 / theta^(2i / dim) for i < dim / 2: the rotary inverse frequencies (dim/2,), in float32, on the CPU
    (config code calls this, also inside a meta-device build)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_positions: int
) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, the band between smoothed."""
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding, resolved once from config.json.

    `inv_freq` holds the (already scaled) inverse frequencies as float32 values. With `dynamic_factor` (dynamic NTK
    scaling) a sequence longer than `max_positions` gets a larger base, computed per sequence from its length after
    the step, as transformers does for one sequence:
    theta * (factor * L / max_positions - (factor - 1)) ** (d / (d - 2)).
    """

    inv_freq: tuple[float, ...]
    theta: float = 10000.0
    dynamic_factor: float | None = None
    max_positions: int = 0

    @property
    def dim(self) -> int:
        return 2 * len(self.inv_freq)

    def dynamic_inv_freq(self, lengths: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """(B,) sequence lengths -> (B, dim/2) inverse frequencies, or (B, T) per token -> (B, T, dim/2); lengths
        within max_positions keep `inv_freq`."""
        d, factor = self.dim, self.dynamic_factor
        seq_len = lengths.clamp(min=self.max_positions).float()  # (B,)
        base = self.theta * (factor * seq_len / self.max_positions - (factor - 1)) ** (d / (d - 2))  # (B,)
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=lengths.device).float() / d  # (dim/2,)
        scaled = 1.0 / (base[..., None] ** exponents)  # (B, dim/2) or (B, T, dim/2)
        return torch.where((lengths > self.max_positions)[..., None], scaled, inv_freq)


class RotaryEmbedding(nn.Module):
    """cos and sin (B, T, dim) of token positions for `apply_rotary`.

    The inverse frequencies are a plain per-device cache, not a buffer: models are built on the meta device and
    only checkpoint tensors are loaded into them, so a buffer made in __init__ would never hold values.
    """

    def __init__(self, rotary: Rotary):
        super().__init__()
        self.rotary = rotary
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = torch.tensor(self.rotary.inv_freq, dtype=torch.float32, device=device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor, seq_lengths: torch.Tensor, dtype: torch.dtype):
        """positions (B, T), seq_lengths (B,) (each sequence's length after this step, for dynamic scaling) or
        (B, T) (per token: a packed pass holds several sequences in a row)."""
        inv_freq = self.inv_freq(positions.device)  # (dim/2,)
        if self.rotary.dynamic_factor is not None:
            inv_freq = self.rotary.dynamic_inv_freq(seq_lengths, inv_freq)  # (B, dim/2) or (B, T, dim/2)
            inv_freq = inv_freq[:, None, :] if seq_lengths.dim() == 1 else inv_freq  # (B, 1 or T, dim/2)
        freqs = positions[..., None].float() * inv_freq  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles of cos, sin (B, T, hs) (the rotate-half layout of Llama checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


BLOCK_SIZE = 16  # positions per KV-cache block unless the cache is made with another


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in a forward pass through the KV cache.

    `length` tokens of batch row `row`, from token `start` of that row, at positions offset..offset+length-1 (the
    sequence's earlier positions are already in the cache). `blocks`: the cache blocks the sequence owns, in
    position order (position p lives in block blocks[p // block_size]). `rope_length`: the sequence length its
    rotary scaling is computed for (dynamic NTK only; default offset + length, a prefill chunk gives its prompt's).
    """

    row: int
    start: int
    length: int
    offset: int
    blocks: tuple[int, ...]
    rope_length: int | None = None

    @property
    def end(self) -> int:
        """The sequence's length after this pass: the keys its last token attends to."""
        return self.offset + self.length


class KVCache:
    """Keys and values of every running sequence in one arena, allocated once and owned by the generation engine.

    `k` and `v` are (n_layers, n_kv_heads, positions, head_dim) with positions = blocks x block_size: `tokens`
    positions rounded up to whole blocks. A sequence owns whole blocks (its block table, `Segment.blocks`); where
    they are consecutive its keys are one slice of the arena, `k[layer, :, a:b]`, read in place. The arena is
    allocated empty (untouched pages cost no memory until written) and attention reads only written positions.

    `KVCache(..., slots=S, capacity=C)` is the arena of S blocks of C positions, for callers that keep one
    sequence per slot: `rows(start, length)` puts row b of a pass in slot start + b. The cache never advances
    itself: each forward pass is described by a `KVRows` and models write only the tokens they are given.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        tokens: int | None = None,
        block_size: int = BLOCK_SIZE,
        slots: int | None = None,
        capacity: int | None = None,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        if (tokens is None) == (slots is None and capacity is None) or (slots is None) != (capacity is None):
            raise ValueError(f"give tokens= or both slots= and capacity=, got {tokens=}, {slots=}, {capacity=}")
        if slots is not None:
            tokens, block_size = slots * capacity, capacity
        if tokens < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs tokens >= 1 and block_size >= 1, got {tokens=}, {block_size=}")
        self.blocks, self.block_size = -(-tokens // block_size), block_size
        shape = (n_layers, n_kv_heads, self.blocks * block_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def positions(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def rows(self, start: int, length: int, prefill: bool = False) -> KVRows:
        """A pass whose row b is the sequence in block (slot) start + b, reading and writing positions below
        `length` (at most the block size). Each row's real tokens (`lengths` of the forward pass) sit at
        consecutive positions from the row's first; `prefill` says they start new sequences (position 0), which
        the pass checks."""
        if length > self.block_size:
            raise ValueError(f"{length} positions asked for, but the KV cache holds {self.block_size} per slot")
        return KVRows(self, slots=(start, length, prefill))


def _ranges(blocks: tuple[int, ...], block_size: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Arena ranges [a, b) holding positions lo..hi-1 of a sequence with these blocks, consecutive blocks merged."""
    out: list[tuple[int, int]] = []
    for i in range(lo // block_size, (hi - 1) // block_size + 1):
        a = blocks[i] * block_size + max(lo - i * block_size, 0)
        b = blocks[i] * block_size + min(hi - i * block_size, block_size)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class KVRows:
    """What one forward pass sees of a KVCache: its tokens grouped into `segments`, one per sequence.

    Decode: B rows of one token, one segment each. Packed prefill: one row of several prompts' tokens (or chunks
    of them) end to end, a segment each; with `last_only` the pass returns the last token of the segments listed
    in `outputs` (default all), and attention stays within each segment (the block-diagonal causal mask, done
    segment by segment). Each token's keys and values are written at its position; then each segment's queries
    attend to its sequence's cached keys in place (one arena slice where its blocks are consecutive), only the
    real ones: positions below the segment's end, within the layer's sliding window. A KVRows serves one pass.
    """

    def __init__(
        self,
        cache: KVCache,
        segments: Sequence[Segment] = (),
        outputs: Sequence[int] | None = None,
        *,
        slots: tuple[int, int, bool] | None = None,
    ):
        self.cache, self.segments, self._slots = cache, list(segments), slots
        self._outputs = outputs

    # -- once per pass: where every token goes, what every segment reads ------------------------------------------
    def bind(self, positions: torch.Tensor, lengths: torch.Tensor, windows, dtype: torch.dtype) -> None:
        """Resolve this pass (positions (B, T), lengths (B,) of real tokens) for layers with these windows."""
        B, T = positions.shape
        if self._slots is not None:
            self.segments = self._slot_segments(positions, lengths)
        bs, device = self.cache.block_size, positions.device
        tokens, writes = [], []
        for seg in self.segments:
            if seg.end > len(seg.blocks) * bs:
                raise ValueError(
                    f"a sequence of {seg.end} positions does not fit its {len(seg.blocks)} blocks of {bs} positions"
                )
            tokens.extend(range(seg.row * T + seg.start, seg.row * T + seg.start + seg.length))
            for a, b in _ranges(seg.blocks, bs, seg.offset, seg.end):
                writes.extend(range(a, b))
        self._tokens = None if tokens == list(range(B * T)) else torch.tensor(tokens, device=device)
        self._writes = torch.tensor(writes, device=device)
        self._reads, self._masks = {}, {}
        for w in windows:
            self._reads[w], self._masks[w] = zip(*(self._plan(seg, w, dtype, device) for seg in self.segments))
        one_per_row = [s.row for s in self.segments] == list(range(B))
        rope = [s.rope_length or s.end for s in self.segments]
        if one_per_row:
            self.seq_lengths = torch.tensor(rope, device=device)  # (B,)
            self.lengths = lengths
        else:
            per_token = torch.ones(B * T, dtype=torch.long)
            for seg, n in zip(self.segments, rope):
                per_token[seg.row * T + seg.start : seg.row * T + seg.start + seg.length] = n
            self.seq_lengths = per_token.view(B, T).to(device)  # (B, T)
            if B != 1:
                raise ValueError(f"a packed pass (several sequences in a row) is one row, got {B} rows")
            wanted = range(len(self.segments)) if self._outputs is None else self._outputs
            ends = [self.segments[i].start + self.segments[i].length for i in wanted]
            self.lengths = torch.tensor([ends], dtype=torch.long, device=device)  # (1, k)

    def _slot_segments(self, positions: torch.Tensor, lengths: torch.Tensor) -> list[Segment]:
        start, length, prefill = self._slots
        first, counts = positions[:, 0].tolist(), lengths.tolist()
        if prefill and any(first):
            raise ValueError(f"a prefill pass starts every row at position 0, got first positions {first}")
        if max(f + n for f, n in zip(first, counts)) > length:
            raise ValueError(
                f"positions up to {max(f + n for f, n in zip(first, counts))} asked for, rows hold {length}"
            )
        return [Segment(b, 0, n, f, (start + b,)) for b, (f, n) in enumerate(zip(first, counts))]

    def _plan(self, seg: Segment, window: int | None, dtype: torch.dtype, device):
        """The arena ranges a segment's queries read, and their mask: None for one query (every key read is
        visible), "causal" for a whole new sequence without a window, else an additive (1, 1, n, S) mask."""
        lo = 0 if window is None else max(0, seg.offset - window + 1)
        if seg.length == 1 and window is not None:
            lo = max(0, seg.end - window)
        reads = _ranges(seg.blocks, self.cache.block_size, lo, seg.end)
        if seg.length == 1:
            return reads, None
        if seg.offset == 0 and window is None:
            return reads, "causal"
        q = torch.arange(seg.offset, seg.end, device=device)[None]  # (1, n)
        k = torch.arange(lo, seg.end, device=device)  # (S,)
        return reads, causal_mask(q, k, window, dtype)

    # -- every layer ----------------------------------------------------------------------------------------------
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None
    ) -> torch.Tensor:
        """Write k, v (B, nkv, T, hs) of the pass's tokens into the cache, then attend q (B, nh, T, hs) segment by
        segment -> (B, T, nh * hs) (padding tokens, outside every segment, get zeros)."""
        B, nh, T, hs = q.shape
        nkv = k.shape[1]
        keys, values = self.cache.k[layer], self.cache.v[layer]  # (nkv, positions, hs)
        for new, store in ((k, keys), (v, values)):
            new = new.transpose(0, 1).reshape(nkv, B * T, hs)  # (nkv, B*T, hs)
            store.index_copy_(1, self._writes, new if self._tokens is None else new[:, self._tokens])
        outs = []
        for seg, reads, mask in zip(self.segments, self._reads[window], self._masks[window]):
            qs = q[seg.row, :, seg.start : seg.start + seg.length]  # (nh, n, hs)
            ks, vs = _gather(keys, reads), _gather(values, reads)  # (nkv, S, hs), views where one range
            if mask is None:  # one query: the heads sharing a kv head are its query rows, no mask, no repeat
                y = F.scaled_dot_product_attention(qs.reshape(1, nkv, nh // nkv, hs), ks[None], vs[None], scale=scale)
                outs.append(y.reshape(1, nh * hs))
                continue
            y = F.scaled_dot_product_attention(
                qs[None],
                ks[None],
                vs[None],
                attn_mask=None if mask == "causal" else mask,
                is_causal=mask == "causal",
                scale=scale,
                enable_gqa=nh != nkv,
            )  # (1, nh, n, hs)
            outs.append(y[0].transpose(0, 1).reshape(seg.length, nh * hs))
        y = torch.cat(outs)  # (tokens, nh * hs)
        if self._tokens is not None:
            y = y.new_zeros(B * T, nh * hs).index_copy_(0, self._tokens, y)
        return y.view(B, T, nh * hs)


def _gather(store: torch.Tensor, reads: list[tuple[int, int]]) -> torch.Tensor:
    """store (nkv, positions, hs) at the arena ranges `reads`: a view for one range, else a copy."""
    if len(reads) == 1:
        return store[:, reads[0][0] : reads[0][1]]
    return torch.cat([store[:, a:b] for a, b in reads], dim=1)


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None, dtype: torch.dtype):
    """Additive float mask (B, 1, T, S): query at position i sees keys at positions j <= i (and j > i - window).

    q_positions (B, T); k_positions (B, S) or (S,). Right padding continues counting positions, so padded keys
    lie after every real query and are masked by causality alone. Every query sees at least its own key, and the
    masked value is the dtype's finite minimum, so no row is all -inf.
    """
    q = q_positions[:, None, :, None]  # (B, 1, T, 1)
    k = k_positions[:, None, None, :] if k_positions.dim() == 2 else k_positions  # (B, 1, 1, S) or (S,)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return torch.zeros(allowed.shape, dtype=dtype, device=q.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    step: DecoderStep,
    layer: int,
    window: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, nh, T, hs) over k, v (B, nkv, T, hs) of the same tokens, nh a multiple of nkv (grouped-query), in
    layer `layer` with sliding window `window` (None: all keys) -> (B, T, nh * hs).

    Without a cache the tokens attend to each other under `step`'s causal mask. With one (`step.cache`, a
    KVRows) their keys and values are written at their positions and each sequence attends to its cached ones.
    """
    if step.cache is not None:
        return step.cache.attend(layer, q, k, v, window, scale)
    B, nh, T, hs = q.shape
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.masks[window], scale=scale, enable_gqa=nh != k.shape[1])
    return y.transpose(1, 2).reshape(B, T, nh * hs)


@dataclass(frozen=True)
class DecoderStep:
    """What every layer of one decoder forward pass shares, built once by `decoder_step`.

    positions (B, T) of the tokens (right padding continues counting); lengths, where `last_tokens` reads: (B,)
    real tokens per row, or for a packed pass (1, k) the ends of the k sequences whose next token is wanted;
    seq_lengths, each sequence's length after this step for rotary scaling: (B,), or (B, T) per token in a packed
    pass; masks, one per distinct sliding window of the model's layers (None: full causal), for a pass without a
    cache; cache, the bound KVRows or None.
    """

    positions: torch.Tensor
    lengths: torch.Tensor
    seq_lengths: torch.Tensor
    masks: dict
    cache: KVRows | None


def decoder_step(
    input_ids: torch.Tensor,
    positions: torch.Tensor | None,
    lengths: torch.Tensor | None,
    cache: KVRows | None,
    windows,
    dtype: torch.dtype,
) -> DecoderStep:
    """The shared inputs of a decoder forward pass. positions default to 0..T-1 and lengths to T for every row."""
    B, T = input_ids.shape
    device = input_ids.device
    if positions is None:
        positions = torch.arange(T, device=device).expand(B, T)
    if lengths is None:
        lengths = torch.full((B,), T, device=device)
    if positions.shape != input_ids.shape or lengths.shape != (B,):
        raise ValueError(
            f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}, "
            f"lengths {tuple(lengths.shape)} must be ({B},)"
        )
    if cache is not None:
        cache.bind(positions, lengths, set(windows), dtype)
        return DecoderStep(positions, cache.lengths, cache.seq_lengths, {}, cache)
    seq_lengths = positions.gather(1, (lengths - 1)[:, None])[:, 0] + 1  # (B,)
    masks = {w: causal_mask(positions, positions, w, dtype) for w in set(windows)}
    return DecoderStep(positions, lengths, seq_lengths, masks, None)


def last_tokens(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h (B, T, C) -> (B, 1, C) at each row's last real token (right padding), or with lengths (B, k) of token
    ends (a packed pass) -> (B, k, C) at each end's last token."""
    ends = lengths if lengths.dim() == 2 else lengths[:, None]  # (B, k)
    index = (ends - 1)[..., None].expand(-1, -1, h.shape[-1])  # (B, k, C)
    return h.gather(1, index)

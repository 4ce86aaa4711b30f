"""Weight-only quantization: int4 linear layers on GGUF Q4_1's grid for CPU decoding, int8 ones, tied heads.

Grid: per `group_size` (32) weights of a row, d = (max - min) / 15, m = min, q = floor((w - m) / d + 0.5) clamped to
0..15 (d = 0: q = 0), w' = d * q + m, as llama.cpp's Q4_1. A Q4_1 block's min and max are its q = 0 and q = 15
entries, so a Q4_1 GGUF file dequantized to float and quantized here gets back the file's q, d and m: int4 keeps the
file's own grid (d and m are float32 here, so the file's float16 values pass unchanged). A grid of its own on top of
the file's loses more: re-quantizing SmolLM2's Q4_1 file symmetric, or 64 wide, agreed with the fp32 model's greedy
tokens on under 10% of them (as measured for issue 12, which asked for this grid).

Kernel: torch's packed int4 CPU matmul (`aten._weight_int4pack_mm_for_cpu`, tinygemm's convention
w' = (q - 8) * scale + zero, so scale = d and zero = m + 8d), for in_features a multiple of the group; rows are
padded to a multiple of 16 for it. It runs in bfloat16: the activations and the scales are cast to it and the
product back to the input's dtype. Its float32 and float16 paths are scalar code on torch 2.13's CPU build
(measured on the 2-core AVX512 machine, 576 -> 1536 at 32 rows: bfloat16 0.40 ms, float32 26 ms, float16 50 ms;
dense float32 nn.Linear 0.45 ms), so the int4 model computes its matmuls at bfloat16 precision whatever the
model's dtype; the q grid is kept exactly, d and zero are rounded to bfloat16. Its packed layout is torch's for
this CPU (AVX512 or not): re-quantize on the machine rather than carry an Int4Linear state_dict to another. Fallback (in_features not a multiple of the group,
then the last group is shorter; torch without the kernel; `kernel=False`): nibble-packed q, dequantized to the
input's dtype and multiplied with F.linear at every call, correct on any device but slower.

Tied LM head (one weight for the embedding table and the head). `quantize_int4` leaves it shared and as it is
unless `tied_head=True`, which gives the head an int4 copy of its own (the table stays dense, lookups stay exact).
Not the default: a GGUF file keeps that table at a finer type (SmolLM2's is Q8_0), and an int4 head on Q4_1's grid
made SmolLM2-135M-Instruct answer "What is the capital of France?" with "L'Étoile (The City of Lights) is the
capital of France." instead of "The capital of France is Paris." (every other linear layer int4, the head left
float32, it answers as the float32 model). Nor does quantization="int4" give a float32 model's tied weight a
bfloat16 copy, although its matmul is the largest of a small model: a bfloat16 head (the table float32), or a
bfloat16 table (the head float32), each made SmolLM2 answer that question "L'Étoile, la Marseillaise, ..." as
dtype=bfloat16 does (a near-tie at the first token; the mean teacher-forced KL against float32 over 12 chats only
went from 0.00035 to 0.00064). dtype=bfloat16 with int4 (the residual stream, norms, attention and the
shared head in bfloat16 too) answered "L'Étoile, la Marseillaise, ...": keep int4 models float32 (the matmuls
are bfloat16 in the kernel either way); the chat benchmark's --quality mode measures both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.layers import Int8Linear

GROUP_SIZES = (32, 64, 128, 256)  # what the kernel takes; 32 is Q4_1's block
_ROWS = 16  # the kernel's rows (out_features) come in multiples of this


def kernel_available() -> bool:
    """Whether this torch has the packed int4 CPU matmul."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def q4_1_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1's grid of `w` (N, K): q (N, K) uint8 in 0..15, d and m (N, G) float32, G = ceil(K / group_size); a last
    group shorter than group_size takes its min and max over its own columns. w ~ d * q + m, group by group."""
    N, K = w.shape
    G = -(-K // group_size)
    w = w.detach().float()
    if K % group_size:  # repeat the last column: the short group's min and max are unchanged
        w = F.pad(w[None], (0, G * group_size - K), mode="replicate")[0]
    blocks = w.reshape(N, G, group_size)
    m = blocks.amin(dim=-1, keepdim=True)  # (N, G, 1)
    d = (blocks.amax(dim=-1, keepdim=True) - m) / 15
    inv = torch.where(d == 0, 0.0, 1 / d)  # gguf's own arithmetic: times the reciprocal, then +0.5 and truncate
    q = torch.floor((blocks - m) * inv + 0.5).clamp_(0, 15).to(torch.uint8)
    return q.reshape(N, G * group_size)[:, :K], d[..., 0], m[..., 0]


class Int4Linear(nn.Module):
    """Weight-only int4 linear layer on Q4_1's grid; activations stay in their dtype (float32, bfloat16, float16).

    weight (uint8): the kernel's packed layout (N padded to 16, K / 2) or, on the fallback, two q per byte (low
    nibble = even column). scales_and_zeros (G, N or N padded, 2) float32: scale = d, zero = m + 8d, for both."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, kernel: bool, dtype, device):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r} is not supported; allowed: {GROUP_SIZES}")
        self.in_features, self.out_features, self.group_size, self.kernel = (
            in_features,
            out_features,
            group_size,
            kernel,
        )
        rows = -(-out_features // _ROWS) * _ROWS if kernel else out_features
        groups = -(-in_features // group_size)
        packed = (rows, in_features // 2) if kernel else (out_features, -(-in_features // 2))
        self.register_buffer("weight", torch.empty(packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(groups, rows, 2, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, kernel: bool = True) -> Int4Linear:
        """The int4 copy of `linear`; the kernel's layout where `kernel`, the kernel exists, the weight is on the
        CPU and in_features is a multiple of group_size, else the fallback's."""
        N, K = linear.out_features, linear.in_features
        w = linear.weight
        kernel = kernel and kernel_available() and w.device.type == "cpu" and K % group_size == 0
        layer = cls(K, N, linear.bias is not None, group_size, kernel, w.dtype, w.device)
        q, d, m = q4_1_grid(w, group_size)  # (N, K), (N, G), (N, G)
        rows = layer.scales_and_zeros.shape[1]
        scales_and_zeros = torch.zeros(rows, d.shape[1], 2, device=w.device)  # padded rows: w' = 0
        scales_and_zeros[:N, :, 0], scales_and_zeros[:N, :, 1] = d, m + 8 * d
        layer.scales_and_zeros.copy_(scales_and_zeros.transpose(0, 1))
        if kernel:
            q = F.pad(q.to(torch.int32), (0, 0, 0, rows - N))  # (rows, K)
            layer.weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        else:
            q = F.pad(q, (0, K % 2))  # (N, K even)
            layer.weight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) float32 this layer multiplies by. The kernel's is read back through the kernel (its
        product with the identity), so it is what the kernel computes whatever its packed layout."""
        sz = self.scales_and_zeros[:, : self.out_features]  # (G, N, 2)
        if self.kernel:
            eye = torch.eye(self.in_features, device=self.weight.device)
            w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, self.scales_and_zeros)
            return w_t[:, : self.out_features].T.contiguous()
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).flatten(1)[:, : self.in_features]  # (N, K)
        scale, zero = (t.T.repeat_interleave(self.group_size, dim=1)[:, : self.in_features] for t in sz.unbind(-1))
        return (q.float() - 8) * scale + zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        if self.kernel:
            if x.device.type != "cpu":
                raise ValueError(
                    f"Int4Linear holds weights packed for torch's CPU int4 kernel; the input is on {x.device}"
                )
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16).contiguous(), self.weight, self.group_size, self._bf16_scales()
            )
            y = y[:, : self.out_features].to(x.dtype)  # (B*T, N)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _bf16_scales(self) -> torch.Tensor:
        """scales_and_zeros in bfloat16, the kernel's dtype, converted once (again only if they are replaced)."""
        key = (self.scales_and_zeros.data_ptr(), self.scales_and_zeros._version)
        if getattr(self, "_bf16_key", None) != key:
            self._bf16, self._bf16_key = self.scales_and_zeros.to(torch.bfloat16), key
        return self._bf16

    def extra_repr(self) -> str:
        path = "kernel" if self.kernel else "fallback"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, {path}"
        )


def quantize_int4(model: nn.Module, group_size: int = 32, tied_head: bool = False) -> int:
    """Int4 copies (`Int4Linear.from_linear`) of every nn.Linear whose weight is not shared with another module's,
    and, with `tied_head`, of each whose weight is shared with embedding tables only (a tied LM head): the head gets
    its own int4 copy, the tables stay dense. Returns the number of layers replaced."""
    count = 0
    for parent, name, child, others in _linears(model):
        if not others or (tied_head and all(isinstance(m, nn.Embedding) for m in others)):
            setattr(parent, name, Int4Linear.from_linear(child, group_size))
            count += 1
    return count


def quantize_int8(model: nn.Module) -> int:
    """Per-channel int8 weight-only copies (`layers.Int8Linear`) of every nn.Linear whose weight is not shared
    (tied) with another module's. Returns the number of layers replaced."""
    count = 0
    for parent, name, child, others in _linears(model):
        if not others:
            setattr(parent, name, Int8Linear.from_linear(child))
            count += 1
    return count


def _holders(model: nn.Module) -> dict[tuple, list[tuple[nn.Module, str, nn.Module]]]:
    """Weight storage -> the (parent, attribute name, module) triples of every module holding a parameter there."""
    holders: dict[tuple, list[tuple[nn.Module, str, nn.Module]]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            for p in child.parameters(recurse=False):
                holders.setdefault(_storage(p), []).append((parent, name, child))
    return holders


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear, list[nn.Module]]]:
    """(parent, name, linear, the other modules sharing its weight) for every nn.Linear of `model`."""
    holders = _holders(model)
    return [
        (parent, name, child, [m for _, _, m in holders[_storage(child.weight)] if m is not child])
        for parent, name, child in [(p, n, c) for p, n, c in _children(model) if isinstance(c, nn.Linear)]
    ]


def _children(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]


def _storage(p: torch.Tensor) -> tuple:
    """Where a parameter's values live: tied weights share it, whether one Parameter is registered twice or the
    loader assigned one tensor to two Parameters."""
    return p.device, p.untyped_storage().data_ptr()

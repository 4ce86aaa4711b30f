"""The shared attention call: the CPU bmm form against scaled_dot_product_attention, its chunking and dispatch."""

import pytest
import torch
import torch.nn.functional as F

from pipelines import layers


def _qkv_mask(B=3, nh=4, T=7, hs=8, dtype=torch.float32):
    """q, k, v laid out as the models pass them ((B, T, nh, hs) transposed to (B, nh, T, hs)) and the mask
    of rows with 7, 4 and 1 real tokens."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, nh, hs, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    real = torch.tensor([T, 4, 1])[:B]
    attention_mask = (torch.arange(T)[None, :] < real[:, None]).long()  # (B, T)
    return q, k, v, layers.padding_mask(attention_mask, dtype)


def _reference(q, k, v, mask):
    B, nh, T, hs = q.shape
    mask = None if mask is None else mask.float()
    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, nh * hs)


@pytest.mark.parametrize("block_bytes", [1, 7 * 7 * 4 * 5, 2**21])
@pytest.mark.parametrize("masked", [True, False])
def test_bmm_form_matches_sdpa_across_chunks(monkeypatch, block_bytes, masked):
    """The chunked bmm form equals scaled_dot_product_attention in float32, whether the 12 heads run one per
    chunk, in chunks of 5 (the last one partial) or all at once, with and without a padding mask."""
    monkeypatch.setattr(layers, "SCORE_BLOCK_BYTES", block_bytes)
    q, k, v, mask = _qkv_mask()
    mask = mask if masked else None
    y = layers._bmm_attention(q, k, v, mask)  # (B, nh, T, hs)
    torch.testing.assert_close(y.transpose(1, 2).reshape(3, 7, 32), _reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32():
    """bfloat16 attention stays within bfloat16 rounding of the float32 result."""
    q, k, v, mask = _qkv_mask(dtype=torch.bfloat16)
    torch.testing.assert_close(layers.attention(q, k, v, mask).float(), _reference(q, k, v, mask), rtol=0, atol=3e-2)


def test_padded_query_rows_stay_finite():
    """A row whose keys are all padding still gives finite outputs (the additive mask is the dtype's minimum,
    not -inf), so padded positions never turn into NaN before they are discarded."""
    q, k, v, mask = _qkv_mask()
    mask[1] = torch.finfo(torch.float32).min  # every key of row 1 masked
    assert torch.isfinite(layers.attention(q, k, v, mask)).all()


@pytest.mark.parametrize(
    ("dtype", "T", "bmm"),
    [
        (torch.float32, 16, True),
        (torch.float32, layers.FP32_BMM_MAX_TOKENS, True),
        (torch.float32, layers.FP32_BMM_MAX_TOKENS + 1, False),
        (torch.bfloat16, 384, True),
        (torch.float16, 384, True),
    ],
)
def test_cpu_dispatch(monkeypatch, dtype, T, bmm):
    """On CPU, half precision always takes the bmm form and float32 only up to FP32_BMM_MAX_TOKENS: the
    measured crossover (a regression here once made 384-token windows 3-6x slower)."""
    calls = []
    real = layers._bmm_attention
    monkeypatch.setattr(layers, "_bmm_attention", lambda *a: calls.append(1) or real(*a))
    q, k, v, mask = _qkv_mask(B=2, nh=2, T=T, hs=4, dtype=dtype)
    assert layers.attention(q, k, v, mask).shape == (2, T, 8)
    assert bool(calls) is bmm

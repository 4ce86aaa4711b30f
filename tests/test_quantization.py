"""Weight-only quantization (pipelines/quantization.py): int4 on GGUF Q4_1's grid, int8 on the CPU kernel, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from torch import nn

from pipelines import pipeline
from pipelines.generation.engine import Engine
from pipelines.layers import Int8Linear
from pipelines.loading import load_model
from pipelines.models.llama import LlamaForCausalLM
from pipelines.quantization import (
    Int4Linear,
    kernel_available,
    q4_1_grid,
    quantize_int4,
)
from pipelines.runtime import RuntimeConfig
from tests.checkpoints import make_decoder_checkpoint
from tests.test_gguf import _llama_like

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="this torch has no packed int4 CPU matmul")


def _q4_1_file_tensor(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(the Q4_1 blocks gguf writes for a random (rows, cols) tensor, the float32 values they stand for)."""
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    data = quantize(w, Q.Q4_1)
    return data, np.asarray(dequantize(data, Q.Q4_1), dtype=np.float32).reshape(rows, cols)


def test_a_q4_1_tensor_gets_back_the_files_own_grid():
    """Dequantized Q4_1 weights quantized again give the file's nibbles, and the weights exactly."""
    data, values = _q4_1_file_tensor(48, 128)
    q, d, m = q4_1_grid(torch.from_numpy(values), 32)
    blocks = data.reshape(-1, 20)  # ggml's block_q4_1: d (f16), m (f16), 16 bytes of two nibbles
    nibbles = blocks[:, 4:]
    file_q = np.concatenate([nibbles & 15, nibbles >> 4], axis=1).reshape(48, 128)  # low nibbles are 0..15
    assert np.array_equal(q.numpy(), file_q)
    assert np.array_equal(d.numpy().ravel(), blocks[:, 0:2].copy().view(np.float16).astype(np.float32).ravel())
    assert np.array_equal(m.numpy().ravel(), blocks[:, 2:4].copy().view(np.float16).astype(np.float32).ravel())
    linear = nn.Linear(128, 48, bias=False)
    linear.weight.data = torch.from_numpy(values)
    layer = Int4Linear.from_linear(linear, kernel=False)
    torch.testing.assert_close(layer.dequantize(), linear.weight.data, rtol=0, atol=1e-6)


@needs_kernel
def test_kernel_layer_computes_the_dequantized_product_in_bfloat16():
    """out_features not a multiple of 16 (padded rows), a bias, 3-d input: the kernel's product is the
    dequantized weight's at bfloat16 precision, in the input's dtype and shape."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 100)
    layer = Int4Linear.from_linear(linear)
    assert layer.kernel
    x = torch.randn(3, 5, 256)
    y = layer(x)
    assert y.shape == (3, 5, 100) and y.dtype == torch.float32
    expected = F.linear(x, layer.dequantize(), linear.bias)
    torch.testing.assert_close(y, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    # the grid is close to the float weights it replaces: a 4-bit step is (max - min) / 15 of each group of 32
    assert (layer.dequantize() - linear.weight).abs().max() < 0.5 * linear.weight.abs().max()
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_ragged_rows_fall_back_to_the_dequantized_matmul():
    """in_features that is not a multiple of the group: the last group is shorter, the exact fallback runs."""
    torch.manual_seed(0)
    linear = nn.Linear(80, 24, bias=False)
    layer = Int4Linear.from_linear(linear)
    assert not layer.kernel and "fallback" in repr(layer)
    x = torch.randn(4, 80)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=0, atol=0)
    groups = linear.weight.detach().reshape(24, -1)[:, 64:]  # the short group: 16 columns, min and max its own
    torch.testing.assert_close(layer.dequantize()[:, 64:].amin(1), groups.amin(1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="group_size=48 is not supported; allowed"):
        Int4Linear.from_linear(linear, group_size=48)


def test_tied_head_stays_shared_unless_asked(tmp_path):
    folder = make_decoder_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    model = load_model(folder, LlamaForCausalLM, RuntimeConfig())
    layers = len(model.model.layers)
    assert quantize_int4(model) == 7 * layers
    head, table = model.lm_head.weight, model.model.embed_tokens.weight
    assert isinstance(model.lm_head, nn.Linear) and head.data_ptr() == table.data_ptr()
    model = load_model(folder, LlamaForCausalLM, RuntimeConfig())
    table = model.model.embed_tokens.weight.detach().clone()
    assert quantize_int4(model, tied_head=True) == 7 * layers + 1
    assert isinstance(model.lm_head, Int4Linear)
    assert torch.equal(model.model.embed_tokens.weight, table)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_tied_head_stays_the_tables_weight(tmp_path, quantization, dtype):
    """pipeline(quantization=int8/int4): the tied head is still the embedding table's one weight, in float32 and in
    bfloat16 (the loader assigns one tensor to two Parameters: ties are found by storage, not by Parameter)."""
    folder = make_decoder_checkpoint(tmp_path / "tied", "llama", tie_word_embeddings=True)
    gen = pipeline("text-generation", model=str(folder), quantization=quantization, dtype=dtype)
    head, table = gen.model.lm_head, gen.model.model.embed_tokens
    assert type(head) is nn.Linear and head.weight.data_ptr() == table.weight.data_ptr()
    assert sum(isinstance(m, (Int8Linear, Int4Linear)) for m in gen.model.modules()) == 7 * 2


def test_int8_linear_on_the_cpu_kernel():
    """Int8Linear on the CPU: torch's int8 weight kernel, bfloat16 inside, equals the dequantized product within
    bfloat16 rounding, for any leading shape, with a bias, and returns the input's dtype."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 64)
    expected = F.linear(x, layer.weight.float() * layer.scales[:, None], linear.bias)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0.01 * expected.abs().max().item())
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    ragged = Int8Linear.from_linear(nn.Linear(37, 5))  # the kernel needs in_features % 16 == 0: dequantized
    x = torch.randn(4, 37)
    torch.testing.assert_close(ragged(x), F.linear(x, ragged.weight.float() * ragged.scales[:, None], ragged.bias))


def test_int4_pipeline_on_a_q4_1_gguf_file(tmp_path):
    """pipeline(model=<Q4_1 .gguf>, quantization="int4"): every linear layer int4 on the file's grid, so the
    weights it multiplies by are the file's; logits near float32's (bfloat16 activations), the same first 8 greedy
    tokens (at 12 this random model meets a near-tie that bfloat16 resolves the other way)."""
    _, path, _ = _llama_like(tmp_path, "llama", Q.Q4_1, tie=False)
    fp32 = pipeline("text-generation", model=str(path))
    int4 = pipeline("text-generation", model=str(path), quantization="int4")
    pairs = [(n, m) for n, m in fp32.model.named_modules() if isinstance(m, nn.Linear)]
    quantized = dict(int4.model.named_modules())
    assert pairs and all(isinstance(quantized[n], Int4Linear) for n, _ in pairs)
    for name, dense in pairs:
        torch.testing.assert_close(quantized[name].dequantize(), dense.weight, rtol=0, atol=1e-6)
    ids = torch.tensor([[0, 5, 17, 42, 3, 9, 60, 61]])
    with torch.inference_mode():
        a, b = fp32.model(ids), int4.model(ids)
    torch.testing.assert_close(b, a, rtol=0, atol=0.05 * a.abs().max().item())
    prompt = [4, 9, 33, 70, 2]
    assert Engine(int4.model).generate([prompt], 8) == Engine(fp32.model).generate([prompt], 8)


def test_unknown_quantization_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'; allowed: \(None, 'int8', 'int4'\)"):
        RuntimeConfig(quantization="int3")

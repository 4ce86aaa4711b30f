"""GGUF checkpoints: tiny random files written here with the `gguf` package load into the same weights as the
safetensors checkpoint they were written from, and into the same logits as transformers' own GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from pipelines import pipeline
from pipelines.generation.engine import Engine
from pipelines.gguf import GGUFCheckpoint, GGUFError
from pipelines.loading import load_model, read_config, resolve
from pipelines.models.gpt2 import GPT2LMHeadModel
from pipelines.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from pipelines.runtime import RuntimeConfig

TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, vocab_size=99, max_position_embeddings=128)
# K-quant blocks hold 256 weights: rows of those tensors must be 256 wide (the K-quant files use this config).
TINY_K = dict(TINY, hidden_size=256, intermediate_size=512)
# Offsets of the float16 scales inside one block of each K-quant type (ggml's block layouts).
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (what our reader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stored(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes or floats written for `w` as `qtype`, the float32 values they dequantize to)."""
    if qtype == Q.F32 or w.ndim == 1:
        return w, w
    block = GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        return w, w  # as llama.cpp does: a tensor whose rows do not fill blocks stays float
    if qtype in K_SCALES:  # gguf quantizes no K-quant: random blocks with small, finite scales
        blocks, size = w.size // block, GGML_QUANT_SIZES[qtype][1]
        data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
        for offset in K_SCALES[qtype]:
            data[:, offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        data = data.reshape(w.shape[0], -1)
    else:
        data = quantize(w, qtype)
    return data, np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(w.shape)


def _tokenizer_fields(writer: GGUFWriter, vocab: int) -> None:
    """A byte-level BPE vocabulary of `vocab` tokens with one merge: enough for both GGUF tokenizers."""
    tokens = [chr(0x100 + i) if i >= 3 else ("<s>", "</s>", "<unk>")[i] for i in range(vocab - 1)]
    tokens.append(tokens[3] + tokens[4])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges([f"{tokens[3]} {tokens[4]}"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)


def _write(path, arch: str, config: dict, tensors: dict[str, np.ndarray], qtypes: dict[str, Q]) -> None:
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(config["context"])
    writer.add_embedding_length(config["hidden"])
    writer.add_block_count(config["layers"])
    writer.add_feed_forward_length(config["ffn"])
    writer.add_head_count(config["heads"])
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_head_count_kv(config["kv_heads"])
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(10000.0)
        writer.add_rope_dimension_count(config["hidden"] // config["heads"])
    _tokenizer_fields(writer, config["vocab"])
    for name, data in tensors.items():
        qtype = qtypes.get(name, Q.F32)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data.astype(np.float16 if qtype == Q.F16 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_like(tmp_path, kind: str, qtype: Q, tie: bool):
    """A tiny transformers model saved as safetensors (its weights rounded to what `qtype` stores) and as GGUF."""
    base = TINY_K if qtype in K_SCALES else TINY
    hf_config = dict(base, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[kind]
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    torch.manual_seed(0)
    model = cls(config_cls(**hf_config)).eval()
    rng = np.random.default_rng(0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tie:
        gguf_names["lm_head.weight"] = "output.weight"
    layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        **{f"self_attn.{p}_proj.{s}": f"attn_{p}.{s}" for p in "qkv" for s in ("weight", "bias")},
    }
    for i in range(hf_config["num_hidden_layers"]):
        gguf_names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in layer.items()})
    tensors, qtypes, rounded = {}, {}, {}
    for key, value in state.items():
        if key not in gguf_names:
            continue
        data, values = _stored(value, qtype, rng)
        rounded[key] = values
        name = gguf_names[key]
        heads = {"attn_q": hf_config["num_attention_heads"], "attn_k": hf_config["num_key_value_heads"]}
        prefix = name.split(".")[-2] if name.startswith("blk.") else ""
        if kind == "llama" and prefix in heads:  # rows permuted as llama.cpp writes them; blocks move with rows
            data = _llama_permute(data, heads[prefix])
        tensors[name] = data
        qtypes[name] = qtype
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rounded.items()}, strict=False)
    if tie:
        model.tie_weights()
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    gguf_config = dict(
        context=hf_config["max_position_embeddings"],
        hidden=hf_config["hidden_size"],
        layers=hf_config["num_hidden_layers"],
        ffn=hf_config["intermediate_size"],
        heads=hf_config["num_attention_heads"],
        kv_heads=hf_config["num_key_value_heads"],
        vocab=hf_config["vocab_size"],
    )
    path = tmp_path / f"tiny-{kind}-{qtype.name}.gguf"
    _write(path, kind, gguf_config, tensors, qtypes)
    return folder, path, model


def _gpt2(tmp_path, qtype: Q):
    torch.manual_seed(0)
    # transformers' GGUF reader maps gpt2.context_length to n_ctx and drops feed_forward_length (its GPT2Config then
    # keeps n_positions=1024 and n_inner=4*n_embd): this file uses those values so that the oracle reads it right.
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=99, n_inner=256)
    model = transformers.GPT2LMHeadModel(config).eval()
    rng = np.random.default_rng(0)
    names = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight",
        "transformer.ln_f.bias": "output_norm.bias",
    }
    layer = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(config.n_layer):
        for k, v in layer.items():
            for s in ("weight", "bias"):
                names[f"transformer.h.{i}.{k}.{s}"] = f"blk.{i}.{v}.{s}"
    tensors, qtypes, rounded = {}, {}, {}
    for key, value in model.state_dict().items():
        if key not in names:
            continue
        value = value.numpy()
        conv1d = value.ndim == 2 and names[key].split(".")[-2] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
        stored = value.T.copy() if conv1d else value  # GGUF keeps nn.Linear's (out, in) layout
        data, values = _stored(stored, qtype, rng)
        rounded[key] = values.T.copy() if conv1d else values
        tensors[names[key]], qtypes[names[key]] = data, qtype
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rounded.items()}, strict=False)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    path = tmp_path / f"tiny-gpt2-{qtype.name}.gguf"
    gguf_config = dict(context=1024, hidden=64, layers=2, ffn=256, heads=4, vocab=99)
    _write(path, "gpt2", gguf_config, tensors, qtypes)
    return folder, path, model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=f"{key} differs")


LLAMA_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", LLAMA_TYPES, ids=lambda t: t.name)
def test_llama_gguf_loads_the_weights_of_its_safetensors_twin(tmp_path, qtype):
    """Every quantization type: a llama GGUF (GQA, q/k rows permuted as llama.cpp writes them) dequantizes into
    exactly the weights of the safetensors checkpoint holding the same values (guards names, the un-permutation,
    block layouts)."""
    folder, path, _ = _llama_like(tmp_path, "llama", qtype, tie=False)
    from_gguf = load_model(path, LlamaForCausalLM, RuntimeConfig())
    from_safetensors = load_model(folder, LlamaForCausalLM, RuntimeConfig())
    _assert_same_weights(from_gguf, from_safetensors)


@pytest.mark.parametrize(
    "kind,qtype,tie",
    [("llama", Q.Q8_0, True), ("llama", Q.F32, False), ("qwen2", Q.Q4_1, False), ("qwen2", Q.F32, True)],
    ids=["llama-q8_0-tied", "llama-f32", "qwen2-q4_1", "qwen2-f32-tied"],
)
def test_llama_and_qwen2_logits_equal_transformers_gguf_loader(tmp_path, kind, qtype, tie):
    """Our logits on a GGUF file equal transformers' (from_pretrained(gguf_file=)) on the same file: the second
    oracle for the name table and the permutation (qwen2 files are not permuted), and for tied embeddings when the
    file has no output.weight."""
    folder, path, _ = _llama_like(tmp_path, kind, qtype, tie=tie)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[kind]
    ours = load_model(path, cls, RuntimeConfig())
    assert ours.config.tie_word_embeddings is tie
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([[5, 17, 3, 44, 98, 0, 61, 7, 12]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q5_1], ids=lambda t: t.name)
def test_gpt2_gguf_equals_safetensors_and_transformers(tmp_path, qtype):
    """GPT-2 files store Conv1D weights in nn.Linear's layout and the fused qkv as one tensor: loading equals the
    safetensors twin, and the logits equal transformers' GGUF loader."""
    folder, path, _ = _gpt2(tmp_path, qtype)
    from_gguf = load_model(path, GPT2LMHeadModel, RuntimeConfig())
    _assert_same_weights(from_gguf, load_model(folder, GPT2LMHeadModel, RuntimeConfig()))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([[5, 17, 3, 44, 98, 0, 61]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_config_from_metadata(tmp_path):
    """The metadata becomes the config.json a family reads: sizes, heads, KV heads, rope theta, eps, token ids."""
    _, path, _ = _llama_like(tmp_path, "llama", Q.F32, tie=True)
    config = read_config(path)
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    assert {k: config[k] for k in expected} == expected
    assert (config["num_key_value_heads"], config["vocab_size"], config["max_position_embeddings"]) == (2, 99, 128)
    assert (config["rope_theta"], config["bos_token_id"], config["eos_token_id"]) == (10000.0, 0, 1)
    assert config["tie_word_embeddings"] is True


def test_resolve_a_file_a_folder_with_gguf_file_and_a_single_file_repo(tmp_path):
    """model= a .gguf path, or a folder plus gguf_file= (transformers' spelling); a missing file names the ones there."""
    _, path, _ = _llama_like(tmp_path, "llama", Q.F32, tie=True)
    assert resolve(path) == path
    assert resolve(path.parent, gguf_file=path.name) == path
    with pytest.raises(FileNotFoundError, match=f"no GGUF file 'nope.gguf'.*{path.name}"):
        resolve(path.parent, gguf_file="nope.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(tmp_path / "missing.gguf")


# -- bad files ----------------------------------------------------------------------------------------------
def test_wrong_magic_and_truncated_files_name_the_file(tmp_path):
    """A file that is not GGUF, and a GGUF file cut short, fail with a GGUFError naming the file."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFError, match="bad.gguf is not a readable GGUF file"):
        GGUFCheckpoint(bad)
    _, path, _ = _llama_like(tmp_path, "llama", Q.F32, tie=True)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="cut.gguf is not a readable GGUF file"):
        GGUFCheckpoint(cut)


def test_unknown_quantization_type_names_the_file(tmp_path):
    """A tensor type id that ggml does not define is refused naming the file."""
    _, path, _ = _llama_like(tmp_path, "llama", Q.F32, tie=True)
    raw = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = raw.index(name) + len(name)  # then: n_dims (u32), dims (u64 each), type (u32)
    n_dims = int.from_bytes(raw[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    raw[type_at : type_at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match=f"{path.name} is not a readable GGUF file"):
        GGUFCheckpoint(path)


def test_unsupported_architecture_and_vocab_mismatch(tmp_path):
    """general.architecture outside llama / qwen2 / gpt2 is refused listing the supported ones; a vocab_size that
    disagrees with the embedding rows is refused naming both fields."""
    writer = GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(GGUFError, match=r"general.architecture='falcon' is not supported; supported: \['gpt2'"):
        GGUFCheckpoint(tmp_path / "falcon.gguf")
    writer = GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    writer.add_vocab_size(120)
    writer.add_tensor("token_embd.weight", np.zeros((99, 8), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(GGUFError, match=r"llama.vocab_size=120 but token_embd.weight has 99 rows"):
        GGUFCheckpoint(tmp_path / "vocab.gguf").config()


def test_a_tensor_with_no_place_is_named(tmp_path):
    """A tensor name the architecture does not have is refused with the known names, not skipped."""
    writer = GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((12, 4), np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(GGUFError, match=r"tensor 'blk.0.attn_qkv.weight' has no place in a llama model; known:"):
        list(GGUFCheckpoint(tmp_path / "odd.gguf").tensors())


def test_pipeline_on_a_gguf_file_generates_as_transformers(tmp_path):
    """pipeline('text-generation', model=<file.gguf>) builds the tokenizer and the model from the one file, and greedy
    tokens equal transformers' generate on the same file."""
    _, path, _ = _llama_like(tmp_path, "llama", Q.Q8_0, tie=False)
    gen = pipeline("text-generation", model=path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    prompt = [4, 9, 33, 70, 2]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert Engine(gen.model).generate([prompt], max_new_tokens=12)[0] == expected[0, len(prompt) :].tolist()

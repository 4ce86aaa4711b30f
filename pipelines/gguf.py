"""GGUF checkpoints (llama.cpp's single-file format) read as a Hugging Face folder would be: config, weights, tokenizer.

    checkpoint = GGUFCheckpoint.open("SmolLM2-135M-Instruct.Q4_1.gguf")
    checkpoint.config()        # a config.json dict ("architectures": ["LlamaForCausalLM"], hidden_size, ...)
    checkpoint.tensors()       # (checkpoint key, float32 tensor) in the Hugging Face checkpoint's names and layouts

A GGUF file stands where a model folder stands everywhere in the loader (`loading.resolve` returns its path): the
metadata becomes the config.json dict the family's `from_hf` reads, the tensors are dequantized and renamed to the
names a Hugging Face checkpoint of the architecture has, so the family's `WeightsMapper` and the loader's strict
checks apply unchanged. The tokenizer is rebuilt from the metadata by `pipelines.gguf_tokenizer`, the chat template
is `tokenizer.chat_template`.

Architectures: llama (Mistral files say llama too), qwen2, gpt2. Three layout differences are undone here:
llama.cpp permutes the rows of llama's q and k projections for its rotary kernel (qwen2 files are not permuted);
GPT-2's Conv1D weights are stored transposed; a file without `output.weight` ties the LM head to the embeddings.

Dequantization (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K and the rest gguf knows) is the `gguf`
package's numpy code: it dequantizes SmolLM2-135M's 272 tensors in about 1 s on 2 cores, a small part of the load,
so there is no native copy of it here.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.gguf_tokenizer import GGUFTokenizerParts, tokenizer_from_gguf

logger = logging.getLogger(__name__)

SUFFIX = ".gguf"


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture maps to Hugging Face: the class, config keys and tensor names."""

    hf_class: str
    model_type: str
    config_keys: dict[str, str]  # "<arch>.<key>" suffix -> config.json key
    tensor_names: dict[str, str]  # GGUF tensor name (blk.{i}.x) -> checkpoint key (layers.{i}.y)
    transposed: tuple[str, ...] = ()  # GGUF tensors stored transposed from the checkpoint's layout
    permuted_qk: bool = False  # llama.cpp's rotary row permutation of q and k to undo
    extra: dict = field(default_factory=dict)  # fixed config.json entries


_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    **{f"blk.{{i}}.{k}": f"model.layers.{{i}}.{v}" for k, v in _LLAMA_LAYER.items()},
}
_DECODER_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_GPT2_LAYER = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight",
    "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight",
    "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight",
    "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight",
    "ffn_down.bias": "mlp.c_proj.bias",
}

ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", _DECODER_KEYS, _LLAMA_TENSORS, permuted_qk=True),
    "qwen2": Architecture(
        "Qwen2ForCausalLM", "qwen2", _DECODER_KEYS, _LLAMA_TENSORS, extra={"use_sliding_window": False}
    ),
    "gpt2": Architecture(
        "GPT2LMHeadModel",
        "gpt2",
        {
            "context_length": "n_positions",
            "block_count": "n_layer",
            "embedding_length": "n_embd",
            "feed_forward_length": "n_inner",
            "attention.head_count": "n_head",
            "attention.layer_norm_epsilon": "layer_norm_epsilon",
        },
        {
            "token_embd.weight": "transformer.wte.weight",
            "position_embd.weight": "transformer.wpe.weight",
            "output_norm.weight": "transformer.ln_f.weight",
            "output_norm.bias": "transformer.ln_f.bias",
            "output.weight": "lm_head.weight",
            **{f"blk.{{i}}.{k}": f"transformer.h.{{i}}.{v}" for k, v in _GPT2_LAYER.items()},
        },
        transposed=("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"),
    ),
}
# Tensors some converters write that the model computes itself.
_IGNORED = ("rope_freqs.weight",)
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFError(ValueError):
    """A GGUF file that cannot be read as a model: names the file and the field at fault."""


def is_gguf(path) -> bool:
    return isinstance(path, (str, Path)) and str(path).endswith(SUFFIX) and Path(path).is_file()


class GGUFCheckpoint:
    """One GGUF file: its metadata decoded once, its tensors read on demand (the file is memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _reader(self.path)
        self.metadata = _decode_fields(self.reader, self.path)
        name = self.metadata.get("general.architecture")
        if name not in ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: general.architecture={name!r} is not supported; supported: {sorted(ARCHITECTURES)}"
            )
        self.architecture, self.arch = name, ARCHITECTURES[name]

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        """The checkpoint of `path`, decoded once per process (config, tokenizer and weights all read it)."""
        path = Path(path).resolve()
        return _open(path, path.stat().st_mtime_ns)

    def get(self, key: str, default=None):
        """An architecture field (`<arch>.<key>`)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    # -- config -----------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """The config.json dict of this file's model, for the family's `from_hf`."""
        config = {"architectures": [self.arch.hf_class], "model_type": self.arch.model_type, **self.arch.extra}
        for key, hf_key in self.arch.config_keys.items():
            value = self.get(key)
            if value is not None:
                config[hf_key] = value
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        embedding = self._tensor_info("token_embd.weight")
        rows = int(embedding.shape[-1]) if embedding is not None else None  # ggml shapes are (columns, rows)
        vocab = config.get("vocab_size", rows if rows is not None else len(tokens or ()))
        if rows is not None and vocab != rows:
            raise GGUFError(
                f"{self.path}: {self.architecture}.vocab_size={vocab} but token_embd.weight has {rows} rows"
            )
        if tokens is not None and len(tokens) > vocab:
            raise GGUFError(
                f"{self.path}: tokenizer.ggml.tokens has {len(tokens)} tokens, more than the {vocab} embeddings"
            )
        config["vocab_size"] = vocab
        config["tie_word_embeddings"] = self._tensor_info("output.weight") is None
        for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            value = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
            if value is not None:
                config[f"{role}_token_id"] = value
        if self.architecture != "gpt2":
            config.update(self._rope_scaling(config))
        return config

    def _rope_scaling(self, config: dict) -> dict:
        kind = self.get("rope.scaling.type")
        if kind in (None, "none"):
            return {}
        if kind not in ("linear", "yarn") or self.get("rope.scaling.factor") is None:
            raise GGUFError(
                f"{self.path}: {self.architecture}.rope.scaling.type={kind!r} is not supported; supported: 'none', "
                "'linear' (with rope.scaling.factor)"
            )
        if kind == "yarn":
            raise GGUFError(f"{self.path}: {self.architecture}.rope.scaling.type='yarn' is not supported")
        return {"rope_scaling": {"rope_type": "linear", "factor": self.get("rope.scaling.factor")}}

    # -- tensors ----------------------------------------------------------------------------------------------
    def _tensor_info(self, name: str):
        return self._tensors_by_name.get(name)

    @functools.cached_property
    def _tensors_by_name(self) -> dict:
        return {t.name: t for t in self.reader.tensors}

    def checkpoint_key(self, name: str) -> str | None:
        """The Hugging Face checkpoint key of GGUF tensor `name`; None for tensors the model computes itself."""
        if name in _IGNORED:
            return None
        match = _LAYER.fullmatch(name)
        pattern, layer = (f"blk.{{i}}.{match[2]}", match[1]) if match else (name, None)
        key = self.arch.tensor_names.get(pattern)
        if key is None:
            known = sorted(k for k in self.arch.tensor_names)
            raise GGUFError(
                f"{self.path}: tensor {name!r} has no place in a {self.architecture} model; known: {', '.join(known)}"
            )
        return key.format(i=layer)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint key, float32 tensor) for every tensor, dequantized, in the checkpoint's layout."""
        from gguf.quants import dequantize

        heads, kv_heads = self.get("attention.head_count"), self.get("attention.head_count_kv")
        for info in self.reader.tensors:
            key = self.checkpoint_key(info.name)
            if key is None:
                logger.info("%s: %s skipped (computed from the config)", self.path.name, info.name)
                continue
            try:
                array = dequantize(info.data, info.tensor_type)
            except (NotImplementedError, ValueError) as e:
                raise GGUFError(
                    f"{self.path}: tensor {info.name!r} has type {info.tensor_type.name}, which cannot be "
                    f"dequantized: {e}"
                ) from e
            array = np.asarray(array, dtype=np.float32).reshape([int(n) for n in reversed(info.shape)])
            suffix = info.name.split(".", 2)[-1] if info.name.startswith("blk.") else info.name
            if self.arch.permuted_qk and suffix in ("attn_q.weight", "attn_q.bias"):
                array = _unpermute(array, heads)
            elif self.arch.permuted_qk and suffix in ("attn_k.weight", "attn_k.bias"):
                array = _unpermute(array, kv_heads or heads)
            if suffix in self.arch.transposed:
                array = array.T
            array = np.ascontiguousarray(array)
            yield key, torch.from_numpy(array if array.flags.writeable else array.copy())  # not the mapped file

    # -- tokenizer side ---------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @functools.cached_property
    def tokenizer(self) -> GGUFTokenizerParts:
        """The tokenizer the metadata describes (pipelines/gguf_tokenizer.py), built once."""
        return tokenizer_from_gguf(self.metadata, str(self.path))

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / unk_token / pad_token strings."""
        return dict(self.tokenizer.special_tokens)


@functools.lru_cache(maxsize=4)
def _open(path: Path, mtime: int) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


def read_metadata(path: str | Path) -> dict[str, object]:
    """Every metadata field of a GGUF file (the GGUF.* header ones included) as a plain Python value: str, int,
    float, bool or a list of them. Without the architecture check of GGUFCheckpoint: any GGUF file reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return _decode_fields(_reader(path), path)


def _reader(path: Path):
    from gguf import GGUFReader  # imported here: 0.2 s that only GGUF users pay

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:  # a wrong magic, a truncated file, an unknown type
        raise GGUFError(f"{path} is not a readable GGUF file: {e}") from e


def _decode_fields(reader, path: Path) -> dict:
    """Every metadata field as a Python value (strings, numbers, lists)."""
    out = {}
    for key, value in reader.fields.items():
        try:
            out[key] = value.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{path}: metadata field {key!r} cannot be decoded: {e}") from e
    return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows (pairs, 2) back to (2, pairs), the rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

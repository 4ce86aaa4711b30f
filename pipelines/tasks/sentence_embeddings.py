"""sentence-embeddings (alias embeddings): one vector per text, pooled as the model's sentence-transformers files say.

modules.json lists the stages after the transformer: Pooling (1_Pooling/config.json: cls, mean, max,
mean_sqrt_len_tokens, weightedmean, lasttoken, several concatenated), Dense layers (N_Dense/config.json
and weights) and Normalize (L2). sentence_bert_config.json sets the maximum length and lower-casing.
Like sentence-transformers, texts are stripped of surrounding whitespace before tokenizing.
A folder without these files gets mean pooling and no normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.base import Pipeline

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {  # old boolean keys of 1_Pooling/config.json, in sentence-transformers' concat order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_DENSE_ACTIVATIONS = {"Tanh": nn.Tanh, "Identity": nn.Identity, "ReLU": nn.ReLU, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid}


def pooling_modes(value) -> tuple[str, ...]:
    modes = (value,) if isinstance(value, str) else tuple(value)
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {mode!r}; allowed: {POOLING_MODES}")
    return modes


def read_sentence_transformers_config(folder: Path | None) -> dict:
    """{'pooling': modes, 'normalize': bool, 'max_seq_length': int|None, 'lowercase': bool, 'dense': [...]}."""
    result = {"pooling": ("mean",), "normalize": False, "max_seq_length": None, "lowercase": False, "dense": []}
    if folder is None or not (folder / "modules.json").is_file():
        return result
    bert_config = _json(folder / "sentence_bert_config.json")
    result["max_seq_length"] = bert_config.get("max_seq_length")
    result["lowercase"] = bool(bert_config.get("do_lower_case", False))
    for module in _json(folder / "modules.json"):
        kind = module["type"].rsplit(".", 1)[-1]
        path = folder / module.get("path", "")
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            config = _json(path / "config.json")
            if "pooling_mode" in config:
                result["pooling"] = pooling_modes(config["pooling_mode"])
            else:
                result["pooling"] = tuple(m for k, m in _LEGACY_POOLING_KEYS.items() if config.get(k)) or ("mean",)
        elif kind == "Dense":
            result["dense"].append(path)
        elif kind == "Normalize":
            result["normalize"] = True
        else:
            raise ValueError(
                f"unsupported sentence-transformers module {module['type']!r} in {folder}/modules.json; "
                "supported: Transformer, Pooling, Dense, Normalize"
            )
    return result


def load_dense(path: Path, dtype: torch.dtype, device) -> nn.Sequential:
    """A sentence-transformers Dense module: Linear + activation, weights from its own folder."""
    from pipelines.loading import iter_tensors, weight_files

    config = _json(path / "config.json")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
    if activation not in _DENSE_ACTIVATIONS:
        raise ValueError(
            f"unsupported Dense activation {activation!r} in {path}; allowed: {sorted(_DENSE_ACTIVATIONS)}"
        )
    linear = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    state = {k.removeprefix("linear."): v for k, v in iter_tensors(weight_files(path, allow_pickle=False))}
    linear.load_state_dict(state, strict=True)
    return nn.Sequential(linear, _DENSE_ACTIVATIONS[activation]()).to(device=device, dtype=dtype)


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """(B, T, H) hidden states and (B, T) right-padded mask -> (B, H * len(modes)), in float32."""
    hidden, m = hidden.float(), mask[..., None].float()  # (B, T, H), (B, T, 1)
    lengths = m.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    vectors = []
    for mode in modes:
        if mode == "cls":
            vectors.append(hidden[:, 0])
        elif mode == "max":
            vectors.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            vectors.append((hidden * m).sum(dim=1) / lengths)
        elif mode == "mean_sqrt_len_tokens":
            vectors.append((hidden * m).sum(dim=1) / lengths.sqrt())
        elif mode == "weightedmean":
            w = m * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)[None, :, None]
            vectors.append((hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
        else:  # lasttoken
            last = mask.sum(dim=1).long() - 1  # (B,)
            vectors.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(vectors, dim=-1)


class SentenceEmbeddingsPipeline(Pipeline):
    """Per input, a list of floats (or a 1-D tensor with `return_tensors=True`).

    `pooling` and `normalize` override what the model folder says.
    """

    task = "sentence-embeddings"

    def __init__(self, model, tokenizer, *, model_path=None, pooling=None, normalize=None, **kwargs):
        folder = Path(model_path) if model_path is not None else None
        st = read_sentence_transformers_config(folder)
        super().__init__(model, tokenizer, model_path=model_path, **kwargs)
        if st["max_seq_length"]:
            self.max_length = min(st["max_seq_length"], self.max_length or st["max_seq_length"])
        self.lowercase = st["lowercase"]
        self.pooling = pooling_modes(pooling) if pooling is not None else st["pooling"]
        self.normalize = st["normalize"] if normalize is None else bool(normalize)
        dense = []
        if model is not None and st["dense"]:
            weights = next(model.parameters())
            dense = [load_dense(path, weights.dtype, self.device) for path in st["dense"]]
        self.dense = nn.ModuleList(dense)

    def _sanitize_parameters(self, return_tensors=None, **unknown):
        if unknown:
            raise TypeError(
                f"sentence-embeddings got unknown parameters {sorted(unknown)}; allowed: "
                "return_tensors (and, at construction, pooling, normalize)"
            )
        return {}, {}, {} if return_tensors is None else {"return_tensors": bool(return_tensors)}

    def preprocess(self, item):
        if not isinstance(item, str):
            raise TypeError(f"expected a string, got {type(item).__name__}")
        text = item.strip()
        return self.encode_text(text.lower() if self.lowercase else text).model_inputs()

    def _forward(self, inputs):
        hidden = self.model(**inputs)  # (B, T, H)
        vectors = pool(hidden, inputs["attention_mask"], self.pooling)  # (B, H * modes)
        for layer in self.dense:
            vectors = layer(vectors.to(layer[0].weight.dtype)).float()
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return {"embedding": vectors}

    def postprocess(self, outputs, return_tensors=False):
        return outputs["embedding"] if return_tensors else outputs["embedding"].tolist()


def _json(path: Path):
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)

"""DistilBERT: config, encoder, the task heads and the checkpoint-name table.

Differences from BERT: no token types (a `token_type_ids` argument is accepted and ignored), the
`q_lin/k_lin/v_lin/out_lin` attention names, LayerNorm eps fixed at 1e-12, and its own head names
(`pre_classifier`, `vocab_transform`, `vocab_layer_norm`, `vocab_projector`). Sinusoidal position embeddings
(`sinusoidal_pos_embds`) are stored in checkpoints like learned ones, so they load the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper, read_id2label


@dataclass(frozen=True)
class DistilBertConfig:
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12  # not in config.json: fixed in DistilBERT
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    num_labels: int = 2
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None

    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def max_input_length(self) -> int:
        """The most tokens one input may have: one position embedding each."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, d: dict) -> DistilBertConfig:
        """Read a config.json dict; ValueError naming the key and value for anything not implemented here."""
        names = [k for k in cls.__dataclass_fields__ if k not in ("id2label", "num_labels", "layer_norm_eps")]
        id2label = read_id2label(d)
        config = cls(**{k: d[k] for k in names if k in d}, id2label=id2label, num_labels=len(id2label))
        layers.activation(config.activation)  # raises for an unknown activation
        if config.dim % config.n_heads:
            raise ValueError(f"dim={config.dim} is not divisible by n_heads={config.n_heads}")
        return config


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T, n_pos = input_ids.shape[1], self.position_embeddings.num_embeddings
        if T > n_pos:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={n_pos}")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # (B, T, C)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.n_head = config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            for proj in (self.q_lin, self.k_lin, self.v_lin)
        )
        return self.out_lin(layers.attention(q, k, v, mask))  # (B, T, C)


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.act = layers.activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))  # (B, T, C)


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.sa_layer_norm(self.attention(x, mask) + x)  # (B, T, C)
        return self.output_layer_norm(self.ffn(x) + x)  # (B, T, C)


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


# Checkpoint names, one entry per deviation (see pipelines.loading.WeightsMapper for the order they apply in).
DISTILBERT_WEIGHTS = WeightsMapper(
    prefix="distilbert.",
    base_parts=("embeddings", "transformer"),  # a bare base checkpoint lacks `distilbert.`
    suffixes={"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias", ".position_ids": None},
    head_parts=("pre_classifier", "classifier", "qa_outputs", "vocab_transform", "vocab_layer_norm", "vocab_projector"),
)


class DistilBertPreTrainedModel(nn.Module):
    """What the loader reads off every DistilBERT class: its config class, weights mapper and tied weights."""

    config_class = DistilBertConfig
    weights_mapper = DISTILBERT_WEIGHTS
    tied_weights: dict[str, str] = {}  # our state_dict key -> the key it is copied from when a checkpoint omits it


class DistilBertModel(DistilBertPreTrainedModel):
    """The encoder alone -> last hidden state (B, T, C)."""

    weights_mapper = DISTILBERT_WEIGHTS.for_base_model()

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, C); DistilBERT has no token types
        return self.transformer(x, layers.padding_mask(attention_mask, x.dtype))  # (B, T, C)


class DistilBertForSequenceClassification(DistilBertPreTrainedModel):
    weights_mapper = DISTILBERT_WEIGHTS.for_head("pre_classifier", "classifier")

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.distilbert(input_ids, attention_mask)[:, 0]  # (B, C) at [CLS]
        return self.classifier(F.relu(self.pre_classifier(x)))  # (B, num_labels)


class DistilBertForTokenClassification(DistilBertPreTrainedModel):
    weights_mapper = DISTILBERT_WEIGHTS.for_head("classifier")

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.classifier(self.distilbert(input_ids, attention_mask))  # (B, T, num_labels)


class DistilBertForQuestionAnswering(DistilBertPreTrainedModel):
    weights_mapper = DISTILBERT_WEIGHTS.for_head("qa_outputs")

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)
        self.qa_outputs = nn.Linear(config.dim, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.qa_outputs(self.distilbert(input_ids, attention_mask))  # (B, T, 2): start, end


class DistilBertForMaskedLM(DistilBertPreTrainedModel):
    weights_mapper = DISTILBERT_WEIGHTS.for_head("vocab_transform", "vocab_layer_norm", "vocab_projector")
    tied_weights = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.act = layers.activation(config.activation)
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.act(self.vocab_transform(self.distilbert(input_ids, attention_mask)))  # (B, T, C)
        return self.vocab_projector(self.vocab_layer_norm(x))  # (B, T, vocab_size)

"""BERT: config, encoder, the task heads and the checkpoint-name table.

Every class returns one tensor from `forward(input_ids, attention_mask=None, token_type_ids=None)`:
`BertModel` the last hidden state (B, T, C); the heads their logits. Inference only, so no dropout.
Module attributes keep the Hugging Face checkpoint names; the few deviations are `RENAMES` below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from pipelines import layers


def _id2label(d: dict) -> tuple[str, ...]:
    """config.json's id2label as a tuple indexed by class id; LABEL_i names when it has none."""
    if d.get("id2label"):
        id2label = {int(i): label for i, label in d["id2label"].items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label keys must be 0..n-1, got {sorted(id2label)}")
        return tuple(id2label[i] for i in range(len(id2label)))
    return tuple(f"LABEL_{i}" for i in range(d.get("num_labels", 2)))


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    num_labels: int = 2
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None

    @property
    def max_input_length(self) -> int:
        """The most tokens one input may have: one position embedding each."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, d: dict) -> BertConfig:
        """Read a config.json dict; ValueError naming the key and value for anything not implemented here."""
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={d['position_embedding_type']!r} is not supported; supported: 'absolute'"
            )
        for key in ("is_decoder", "add_cross_attention"):
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r} is not supported: this BERT is a bidirectional encoder only")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("id2label", "num_labels")}
        id2label = _id2label(d)
        config = cls(**fields, id2label=id2label, num_labels=len(id2label))
        layers.activation(config.hidden_act)  # raises for an unknown activation
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        return config


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T, n_pos = input_ids.shape[1], self.position_embeddings.num_embeddings
        if T > n_pos:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={n_pos}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            for proj in (self.query, self.key, self.value)
        )
        return layers.attention(q, k, v, mask)  # (B, T, C)


class BertResidualOutput(nn.Module):
    """dense, add the residual, LayerNorm: `attention.output` and `output` in checkpoints."""

    def __init__(self, n_in: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(n_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.hidden_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = layers.activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, T, intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)  # (B, T, C)
        return self.output(self.intermediate(x), x)  # (B, T, C)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, C) from the [CLS] position


# Checkpoint key -> our key, applied in order; one line per deviation. None drops the key.
RENAMES = [
    (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),  # TF-era checkpoints
    (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
    (re.compile(r"^(embeddings|encoder|pooler)\."), r"bert.\1."),  # bare base checkpoint (all-MiniLM-L6-v2)
    (re.compile(r"\.position_ids$"), None),  # legacy buffer
    (re.compile(r"^cls\.predictions\.decoder\.bias$"), None),  # a copy of the tied cls.predictions.bias
]
# Parts that only some classes have (the pooler is used by sequence classification only); see `heads`.
HEAD_KEYS = re.compile(r"^(bert\.pooler|classifier|qa_outputs|cls)\.")


class BertPreTrainedModel(nn.Module):
    """What the loader reads off every BERT class: its config class, key renames and tied weights."""

    config_class = BertConfig
    tied_weights: dict[str, str] = {}  # our state_dict key -> the key it is copied from when a checkpoint omits it
    heads: re.Pattern | None = None  # the HEAD_KEYS this class owns
    bare = False  # True for BertModel, whose keys lack the `bert.` prefix

    @classmethod
    def rename_checkpoint_key(cls, key: str) -> str | None:
        """A checkpoint key as this class's state_dict key; None for keys of other heads and legacy buffers."""
        for pattern, replacement in RENAMES:
            if pattern.search(key):
                if replacement is None:
                    return None
                key = pattern.sub(replacement, key)
        if HEAD_KEYS.match(key) and not (cls.heads and cls.heads.match(key)):
            return None
        return key.removeprefix("bert.") if cls.bare else key


class BertModel(BertPreTrainedModel):
    """The encoder alone -> last hidden state (B, T, C); a checkpoint's pooler is dropped unless `pooler`."""

    bare = True

    def __init__(self, config: BertConfig, pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if pooler else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        return self.encoder(x, layers.padding_mask(attention_mask, x.dtype))  # (B, T, C)


class BertForSequenceClassification(BertPreTrainedModel):
    heads = re.compile(r"^(bert\.pooler|classifier)\.")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, pooler=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.classifier(self.bert.pooler(x))  # (B, num_labels)


class BertForTokenClassification(BertPreTrainedModel):
    heads = re.compile(r"^classifier\.")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.classifier(self.bert(input_ids, attention_mask, token_type_ids))  # (B, T, num_labels)


class BertForQuestionAnswering(BertPreTrainedModel):
    heads = re.compile(r"^qa_outputs\.")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.qa_outputs(self.bert(input_ids, attention_mask, token_type_ids))  # (B, T, 2): start, end


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = layers.activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform, then the (usually tied) decoder without bias plus the separate `bias` vector."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias  # (B, T, vocab_size)


class BertForMaskedLM(BertPreTrainedModel):
    heads = re.compile(r"^cls\.predictions\.")
    tied_weights = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict({"predictions": BertLMPredictionHead(config)})

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.cls["predictions"](x)  # (B, T, vocab_size)

"""BERT and its variants RoBERTa and XLM-RoBERTa: config, encoder, the task heads and the checkpoint-name tables.

RoBERTa (and XLM-RoBERTa, the same architecture under other class names) is BERT with three differences:
position ids count real tokens only and start after `pad_token_id`, fairseq style (`padding_positions` in the
config); the encoder sits under `roberta.` in checkpoints (`base_model_prefix`); and two heads have their own
shape and names: sequence classification is dense + tanh + out_proj on <s> with no pooler, the masked-LM head
is `lm_head`. The encoder, the token-classification and question-answering heads are shared.

Every class returns one tensor from `forward(input_ids, attention_mask=None, token_type_ids=None)`: the base
models the last hidden state (B, T, C), the heads their logits. Inference only, so no dropout. Module attributes
keep the Hugging Face checkpoint names; the few deviations are the `WeightsMapper` tables below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper, read_id2label


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
    padding_positions: bool = False  # RoBERTa: real tokens numbered from pad_token_id + 1 (set by the class)

    @property
    def max_input_length(self) -> int:
        """The most tokens one input may have: one position embedding each (RoBERTa's start after the padding id)."""
        if self.padding_positions:
            return self.max_position_embeddings - self.pad_token_id - 1
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
                raise ValueError(f"{key}={d[key]!r} is not supported: this model is a bidirectional encoder only")
        if cls.padding_positions and not isinstance(d.get("pad_token_id", cls.pad_token_id), int):
            raise ValueError(f"pad_token_id={d['pad_token_id']!r}: RoBERTa needs an integer to number positions")
        own = ("id2label", "num_labels", "padding_positions")  # labels read below; the variant is the class's
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in own}
        id2label = read_id2label(d)
        config = cls(**fields, id2label=id2label, num_labels=len(id2label))
        layers.activation(config.hidden_act)  # raises for an unknown activation
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        return config


@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """RoBERTa's and XLM-RoBERTa's config.json: BERT's keys, other defaults, positions numbered after the padding id."""

    vocab_size: int = 50265
    pad_token_id: int = 1
    padding_positions: bool = True


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.padding_idx = config.pad_token_id if config.padding_positions else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = self.position_ids(input_ids)  # (T,) or (B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        return self.LayerNorm(x + self.position_embeddings(positions))

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """BERT: 0..T-1. RoBERTa: real tokens (input_ids != pad) numbered from padding_idx + 1, padding keeps
        padding_idx, so a left-padded row and the same row alone get the same positions."""
        T, n_pos = input_ids.shape[1], self.position_embeddings.num_embeddings
        if self.padding_idx is None:
            if T > n_pos:
                raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={n_pos}")
            return torch.arange(T, device=input_ids.device)  # (T,)
        if T + self.padding_idx >= n_pos:
            raise ValueError(
                f"sequence of {T} tokens is too long: positions start at {self.padding_idx + 1} and "
                f"max_position_embeddings={n_pos}, so at most {n_pos - self.padding_idx - 1} tokens fit"
            )
        real = input_ids.ne(self.padding_idx).long()  # (B, T)
        return torch.cumsum(real, dim=1) * real + self.padding_idx  # (B, T)


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


# Checkpoint names, one entry per deviation (see pipelines.loading.WeightsMapper for the order they apply in).
_LEGACY_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias", ".position_ids": None}
BERT_WEIGHTS = WeightsMapper(
    prefix="bert.",
    base_parts=("embeddings", "encoder", "pooler"),  # a bare base checkpoint (all-MiniLM-L6-v2) lacks `bert.`
    suffixes=_LEGACY_NAMES,  # TF-era LayerNorm names; the legacy position_ids buffer
    head_parts=("bert.pooler", "classifier", "qa_outputs", "cls"),  # the pooler serves sequence classification only
)
ROBERTA_WEIGHTS = WeightsMapper(
    prefix="roberta.",
    base_parts=("embeddings", "encoder", "pooler"),
    suffixes=_LEGACY_NAMES,
    head_parts=("roberta.pooler", "classifier", "qa_outputs", "lm_head"),  # no class uses a RobertaModel's pooler
)


class BertPreTrainedModel(nn.Module):
    """What the loader reads off every class of this file (config class, weights mapper, tied weights), and where
    a head class keeps its encoder: under `base_model_prefix`, the checkpoints' key prefix."""

    config_class = BertConfig
    base_model_prefix = "bert"
    weights_mapper = BERT_WEIGHTS
    tied_weights: dict[str, str] = {}  # our state_dict key -> the key it is copied from when a checkpoint omits it


class BertModel(BertPreTrainedModel):
    """The encoder alone -> last hidden state (B, T, C); a checkpoint's pooler is dropped unless `pooler`."""

    weights_mapper = BERT_WEIGHTS.for_base_model()

    def __init__(self, config: BertConfig, pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if pooler else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        return self.encoder(x, layers.padding_mask(attention_mask, x.dtype))  # (B, T, C)


class BertHeadModel(BertPreTrainedModel):
    """The encoder (a BertModel under `base_model_prefix`) and a task head that the subclass adds."""

    def __init__(self, config: BertConfig, pooler: bool = False):
        super().__init__()
        self.config = config
        self.add_module(self.base_model_prefix, BertModel(config, pooler))

    def encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """The encoder's last hidden state (B, T, C)."""
        return getattr(self, self.base_model_prefix)(input_ids, attention_mask, token_type_ids)


class BertForSequenceClassification(BertHeadModel):
    weights_mapper = BERT_WEIGHTS.for_head("bert.pooler", "classifier")

    def __init__(self, config: BertConfig):
        super().__init__(config, pooler=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.classifier(self.bert.pooler(x))  # (B, num_labels)


class BertForTokenClassification(BertHeadModel):
    weights_mapper = BERT_WEIGHTS.for_head("classifier")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.classifier(self.encode(input_ids, attention_mask, token_type_ids))  # (B, T, num_labels)


class BertForQuestionAnswering(BertHeadModel):
    weights_mapper = BERT_WEIGHTS.for_head("qa_outputs")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.qa_outputs(self.encode(input_ids, attention_mask, token_type_ids))  # (B, T, 2): start, end


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = layers.activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder. As in Hugging Face, the decoder's weight and bias are tied to the word
    embeddings and to `bias` (the one that checkpoints store) unless tie_word_embeddings is false."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))  # (B, T, vocab_size)


class BertForMaskedLM(BertHeadModel):
    weights_mapper = BERT_WEIGHTS.for_head("cls.predictions")
    tied_weights = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.cls = nn.ModuleDict({"predictions": BertLMPredictionHead(config)})

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.cls["predictions"](x)  # (B, T, vocab_size)


# -- RoBERTa: BERT's encoder under `roberta.`, positions after the padding id, its own two heads -------------------
class RobertaModel(BertModel):
    """The encoder alone -> last hidden state (B, T, C); a checkpoint's pooler is dropped (nothing uses it)."""

    config_class, base_model_prefix = RobertaConfig, "roberta"
    weights_mapper = ROBERTA_WEIGHTS.for_base_model()


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x[:, 0])))  # (B, num_labels) from the <s> position


class RobertaForSequenceClassification(BertHeadModel):
    config_class, base_model_prefix = RobertaConfig, "roberta"
    weights_mapper = ROBERTA_WEIGHTS.for_head("classifier")

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.classifier = RobertaClassificationHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.classifier(self.encode(input_ids, attention_mask, token_type_ids))  # (B, num_labels)


class RobertaForTokenClassification(BertForTokenClassification):
    config_class, base_model_prefix = RobertaConfig, "roberta"
    weights_mapper = ROBERTA_WEIGHTS.for_head("classifier")


class RobertaForQuestionAnswering(BertForQuestionAnswering):
    config_class, base_model_prefix = RobertaConfig, "roberta"
    weights_mapper = ROBERTA_WEIGHTS.for_head("qa_outputs")


class RobertaLMHead(nn.Module):
    """dense, exact GELU (whatever hidden_act says, as in Hugging Face), layer_norm, the decoder (tied as BERT's)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))  # (B, T, vocab_size)


class RobertaForMaskedLM(BertHeadModel):
    config_class, base_model_prefix = RobertaConfig, "roberta"
    weights_mapper = ROBERTA_WEIGHTS.for_head("lm_head")
    tied_weights = {
        "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias",
    }

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.lm_head = RobertaLMHead(config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.lm_head(self.encode(input_ids, attention_mask, token_type_ids))  # (B, T, vocab_size)


# XLM-RoBERTa: RoBERTa's architecture and checkpoint names (`roberta.` prefix included) under its own class names.
class XLMRobertaModel(RobertaModel):
    pass


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    pass


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    pass


class XLMRobertaForQuestionAnswering(RobertaForQuestionAnswering):
    pass


class XLMRobertaForMaskedLM(RobertaForMaskedLM):
    pass

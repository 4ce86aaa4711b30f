"""SigLIP: CLIP's two towers trained with a sigmoid loss, so an image and a text are scored on their own.

Differences from CLIP (pipelines/models/clip.py, which this file does not import):

- text tower: bidirectional attention (padding masked when a mask is given), and the pooled output is the hidden
  state at the LAST position, padding or not, through a linear `head`. The checkpoints were trained on texts padded
  to 64 tokens (`padding="max_length"`), so the pooled output depends on the padding: the tasks pad SigLIP texts to
  the model's length (pipelines/tasks/zero_shot_image_classification.py);
- vision tower: no class token and no pre-norm; patch convolution with a bias; `post_layernorm` over every patch,
  then the attention-pooling head ("MAP": one learned `probe` query attends over the patches, then LayerNorm + MLP
  with a residual) as the pooled output;
- scores: cosine of the pooled outputs times `logit_scale.exp()` plus `logit_bias`, read through a sigmoid (each
  label scored on its own), not a softmax across labels.

Inference only, so no dropout. config.json nests `text_config` and `vision_config`; a tower's own config.json
(model_type siglip_text_model / siglip_vision_model) is flat.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper


@dataclass(frozen=True)
class SiglipTowerConfig:
    """The keys both towers share."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_hf(cls, d: dict):
        """The dataclass fields present in `d`; ValueError for an activation or head count that does not work."""
        config = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        layers.activation(config.hidden_act)  # raises for an unknown activation
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        return config


@dataclass(frozen=True)
class SiglipTextConfig(SiglipTowerConfig):
    vocab_size: int = 32000
    max_position_embeddings: int = 64
    projection_size: int | None = None  # the head's output size; None: hidden_size

    @property
    def max_input_length(self) -> int:
        return self.max_position_embeddings


@dataclass(frozen=True)
class SiglipVisionConfig(SiglipTowerConfig):
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    vision_use_head: bool = True

    @classmethod
    def from_hf(cls, d: dict) -> SiglipVisionConfig:
        for key in ("image_size", "patch_size"):
            if not isinstance(d.get(key, 0), int):
                raise ValueError(f"{key}={d[key]!r} is not supported; supported: one integer (square images, patches)")
        if d.get("vision_use_head", True) is not True:
            raise ValueError(
                "vision_use_head=false is not supported: without the attention-pooling head the vision tower has no "
                "pooled image embedding (PaliGemma-style towers); supported: true"
            )
        return super().from_hf(d)


@dataclass(frozen=True)
class SiglipConfig:
    text: SiglipTextConfig
    vision: SiglipVisionConfig

    @property
    def max_input_length(self) -> int:
        """The most tokens one text may have: one position embedding each."""
        return self.text.max_input_length

    @classmethod
    def from_hf(cls, d: dict) -> SiglipConfig:
        """A SigLIP config.json (nested towers) or one tower's own (flat); ValueError for what is not implemented."""
        model_type = d.get("model_type", "siglip")
        if model_type == "siglip_text_model":
            text, vision = d, {}
        elif model_type == "siglip_vision_model":
            text, vision = {}, d
        elif model_type == "siglip":
            text, vision = d.get("text_config") or {}, d.get("vision_config") or {}
        else:
            raise ValueError(
                f"model_type={model_type!r} is not a SigLIP config; "
                "supported: siglip, siglip_text_model, siglip_vision_model"
            )
        return cls(SiglipTextConfig.from_hf(text), SiglipVisionConfig.from_hf(vision))


def _heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipTowerConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        C = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (_heads(proj(x), self.n_head) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(layers.attention(q, k, v, mask))  # (B, T, C)


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = layers.activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, config: SiglipTowerConfig):
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, config: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T, n_pos = input_ids.shape[1], self.position_embedding.num_embeddings
        if T > n_pos:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={n_pos}")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class SiglipTextTransformer(nn.Module):
    """input_ids (B, T) -> pooled (B, projection_size): `head` of the last position's hidden state."""

    def __init__(self, config: SiglipTextConfig):
        super().__init__()
        self.embeddings = SiglipTextEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_size or config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, C)
        x = self.final_layer_norm(self.encoder(x, layers.padding_mask(attention_mask, x.dtype)))  # (B, T, C)
        return self.head(x[:, -1])  # (B, projection_size): the last position, which may be padding


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.grid = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.grid**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        _, _, H, W = pixel_values.shape
        rows, cols = H // self.patch_size, W // self.patch_size
        if not interpolate_pos_encoding and rows * cols != self.grid**2:
            raise ValueError(
                f"input image size {H}x{W} gives {rows}x{cols} patches, the model has {self.grid}x{self.grid} "
                "position embeddings: resize it, or pass interpolate_pos_encoding=True to interpolate them"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        if interpolate_pos_encoding:
            return patches + self.positions(rows, cols)
        return patches + self.position_embedding.weight[None]  # (B, N, C)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """(1, rows * cols, C): the trained grid's position embeddings, bicubically resized unless it is that grid."""
        table = self.position_embedding.weight  # (grid², C)
        if rows == cols == self.grid:
            return table[None]
        C = table.shape[1]
        grid = table.reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)  # (1, C, rows, cols)
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, C)


class SiglipMultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's maths and checkpoint names (fused `in_proj_weight`), written out so that
    weight-only quantization, which replaces nn.Linear modules, leaves it working."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        C = config.hidden_size
        self.in_proj_weight = nn.Parameter(torch.empty(3 * C, C))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * C))
        self.out_proj = nn.Linear(C, C)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = _heads(F.linear(query, wq, bq), self.n_head)  # (B, nh, 1, hs)
        k, v = _heads(F.linear(x, wk, bk), self.n_head), _heads(F.linear(x, wv, bv), self.n_head)  # (B, nh, N, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        return self.out_proj(y.transpose(1, 2).reshape(query.shape))  # (B, 1, C)


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """MAP: a learned probe attends over the patches; LayerNorm + MLP with a residual; the probe's row is pooled."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = SiglipMultiheadAttention(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x)  # (B, 1, C)
        return (h + self.mlp(self.layernorm(h)))[:, 0]  # (B, C)


class SiglipVisionTransformer(nn.Module):
    """pixel_values (B, 3, H, W) -> pooled (B, C) through the attention-pooling head."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(config)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, N, C)
        return self.head(self.post_layernorm(self.encoder(x)))  # (B, C)


# Checkpoint names as stored; each class keeps the parts it owns (the other tower's keys are dropped).
SIGLIP_WEIGHTS = WeightsMapper(
    suffixes={"embeddings.position_ids": None},  # a legacy buffer in older checkpoints
    head_parts=("text_model", "vision_model", "logit_scale", "logit_bias"),
)


class SiglipPreTrainedModel(nn.Module):
    """What the loader reads off every class of this file."""

    config_class = SiglipConfig
    weights_mapper = SIGLIP_WEIGHTS
    tied_weights: dict[str, str] = {}


class SiglipModel(SiglipPreTrainedModel):
    """Both towers, the temperature and the bias: `forward` -> logits_per_image (images, texts), pre-sigmoid."""

    weights_mapper = SIGLIP_WEIGHTS.for_head(*SIGLIP_WEIGHTS.head_parts)

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextTransformer(config.text)
        self.vision_model = SiglipVisionTransformer(config.vision)
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.logit_bias = nn.Parameter(torch.empty(1))

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, T) ids -> (B, projection_size), not normalized (transformers' get_text_features)."""
        return self.text_model(input_ids, attention_mask)

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, hidden_size), not normalized (transformers' get_image_features)."""
        return self.vision_model(pixel_values, interpolate_pos_encoding)

    def logits_per_image(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(I, P) and (T, P) features -> (I, T): cosine similarity times logit_scale.exp(), plus logit_bias."""
        image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        return image @ text.T * self.logit_scale.exp() + self.logit_bias

    def forward(self, input_ids, pixel_values, attention_mask=None, interpolate_pos_encoding=False) -> torch.Tensor:
        text = self.get_text_features(input_ids, attention_mask)  # (T, P)
        return self.logits_per_image(self.get_image_features(pixel_values, interpolate_pos_encoding), text)


class SiglipTextModel(SiglipPreTrainedModel):
    """The text tower alone -> pooled (B, projection_size)."""

    weights_mapper = SIGLIP_WEIGHTS.for_head("text_model")

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.text_model = SiglipTextTransformer(config.text)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.text_model(input_ids, attention_mask)


class SiglipVisionModel(SiglipPreTrainedModel):
    """The vision tower alone -> pooled (B, hidden_size)."""

    weights_mapper = SIGLIP_WEIGHTS.for_head("vision_model")

    def __init__(self, config: SiglipConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config.vision)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.vision_model(pixel_values, interpolate_pos_encoding)

"""CLIP: a text tower and a vision tower projected into one space, scored by a learned temperature.

Text tower: token + learned position embeddings, pre-norm transformer layers under a causal mask (padding masked
too, as transformers does), a final LayerNorm, and the hidden state at the end-of-text token as the pooled output.
Which position that is follows transformers: configs from before its PR #24773 carry `eos_token_id=2`, and there the
end-of-text token is taken to be the highest id of each row (argmax of the ids, as OpenAI's code did); otherwise
the first position holding `eos_token_id` (the padding token may equal it, so the first one is the real one).

Vision tower: a patch convolution (no bias), a learned class embedding in front, position embeddings (bicubically
interpolated to another input size with `interpolate_pos_encoding=True`), `pre_layrnorm` (the checkpoints'
spelling), the same transformer layers without a mask, and `post_layernorm` on the class token as the pooled output.

`CLIPModel` projects both (`text_projection`, `visual_projection`, no bias) and scores an image against a text as
the cosine of the projections times `logit_scale.exp()`; `logits_per_image` is (images, texts). The towers alone
(`CLIPTextModel`, `CLIPVisionModel`) and with their projection (`...WithProjection`) load from the same
checkpoints, dropping the other tower. Inference only, so no dropout. config.json nests `text_config` and
`vision_config` (older ones also `text_config_dict` / `vision_config_dict`, which win, as in transformers); a tower's
own config.json (model_type clip_text_model / clip_vision_model) is flat.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper

LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: pool at the argmax of the ids


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    """CLIP's own quick_gelu (OpenAI's sigmoid approximation of GELU), else the shared table's."""
    return _quick_gelu if name == "quick_gelu" else layers.activation(name)


@dataclass(frozen=True)
class CLIPTowerConfig:
    """The keys both towers share."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, d: dict):
        """The dataclass fields present in `d`; ValueError for an activation or head count that does not work."""
        config = cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        activation(config.hidden_act)  # raises for an unknown activation
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        return config


@dataclass(frozen=True)
class CLIPTextConfig(CLIPTowerConfig):
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    @property
    def max_input_length(self) -> int:
        return self.max_position_embeddings


@dataclass(frozen=True)
class CLIPVisionConfig(CLIPTowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32

    @classmethod
    def from_hf(cls, d: dict) -> CLIPVisionConfig:
        for key in ("image_size", "patch_size"):
            if not isinstance(d.get(key, 0), int):
                raise ValueError(f"{key}={d[key]!r} is not supported; supported: one integer (square images, patches)")
        return super().from_hf(d)


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @property
    def max_input_length(self) -> int:
        """The most tokens one text may have: one position embedding each."""
        return self.text.max_input_length

    @classmethod
    def from_hf(cls, d: dict) -> CLIPConfig:
        """A CLIP config.json (nested towers) or one tower's own (flat); ValueError for what is not implemented."""
        model_type = d.get("model_type", "clip")
        if model_type == "clip_text_model":
            text, vision = d, {}
        elif model_type == "clip_vision_model":
            text, vision = {}, d
        elif model_type == "clip":
            text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
            vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        else:
            raise ValueError(
                f"model_type={model_type!r} is not a CLIP config; supported: clip, clip_text_model, clip_vision_model"
            )
        eos = text.get("eos_token_id", CLIPTextConfig.eos_token_id)
        if not isinstance(eos, int):
            raise ValueError(f"text eos_token_id={eos!r} is not supported; supported: one integer id")
        return cls(CLIPTextConfig.from_hf(text), CLIPVisionConfig.from_hf(vision), d.get("projection_dim", 512))


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTowerConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        C = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if mask is None:
            return self.out_proj(layers.attention(q, k, v, None))  # (B, T, C)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs); mask (B, 1, T, T)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTowerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

    def __init__(self, config: CLIPTowerConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def causal_padding_mask(attention_mask: torch.Tensor | None, T: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive (B or 1, 1, T, T) mask: a query sees the keys at or before it that are not padding."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T, n_pos = input_ids.shape[1], self.position_embedding.num_embeddings
        if T > n_pos:
            raise ValueError(f"sequence of {T} tokens is longer than max_position_embeddings={n_pos}")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)


class CLIPTextTransformer(nn.Module):
    """input_ids (B, T) -> pooled (B, C) at each row's end-of-text token."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, T, C)
        mask = causal_padding_mask(attention_mask, x.shape[1], x.dtype, x.device)
        x = self.final_layer_norm(self.encoder(x, mask))  # (B, T, C)
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            ends = input_ids.to(torch.int).argmax(dim=-1)  # (B,) the first highest id
        else:
            ends = (input_ids == self.eos_token_id).int().argmax(dim=-1)  # (B,) the first end-of-text token
        return x[torch.arange(x.shape[0], device=x.device), ends]  # (B, C)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(self.grid**2 + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        if not interpolate_pos_encoding and (H != self.image_size or W != self.image_size):
            raise ValueError(
                f"input image size {H}x{W} differs from the model's {self.image_size}x{self.image_size}: resize it, "
                "or pass interpolate_pos_encoding=True to interpolate the position embeddings"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), patches], dim=1)  # (B, 1 + N, C)
        return x + self.positions(H // self.patch_size, W // self.patch_size)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows * cols, C): the class position, then the patch grid's, bicubically resized (as transformers,
        from the DINO code) unless the grid is the trained one."""
        table = self.position_embedding.weight  # (1 + grid², C)
        if rows == cols == self.grid:
            return table[None]
        C = table.shape[1]
        grid = table[1:].reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)  # (1, C, rows, cols)
        return torch.cat([table[None, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, C)], dim=1)


class CLIPVisionTransformer(nn.Module):
    """pixel_values (B, 3, H, W) -> pooled (B, C): post_layernorm of the class token."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))  # (B, 1 + N, C)
        return self.post_layernorm(self.encoder(x)[:, 0])  # (B, C)


# Checkpoint names: one table, narrowed per class to the parts it owns (the other tower's keys are dropped).
CLIP_WEIGHTS = WeightsMapper(
    suffixes={"embeddings.position_ids": None},  # a legacy buffer in older checkpoints
    head_parts=("text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"),
)


class CLIPPreTrainedModel(nn.Module):
    """What the loader reads off every class of this file."""

    config_class = CLIPConfig
    weights_mapper = CLIP_WEIGHTS
    tied_weights: dict[str, str] = {}


class CLIPModel(CLIPPreTrainedModel):
    """Both towers, their projections and the temperature: `forward` -> logits_per_image (images, texts)."""

    weights_mapper = CLIP_WEIGHTS.for_head(*CLIP_WEIGHTS.head_parts)

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(B, T) ids -> (B, projection_dim), not normalized (transformers' get_text_features)."""
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, projection_dim), not normalized (transformers' get_image_features)."""
        return self.visual_projection(self.vision_model(pixel_values, interpolate_pos_encoding))

    def logits_per_image(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(I, P) and (T, P) features -> (I, T): cosine similarity times logit_scale.exp()."""
        image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        return image @ text.T * self.logit_scale.exp()

    def forward(self, input_ids, pixel_values, attention_mask=None, interpolate_pos_encoding=False) -> torch.Tensor:
        text = self.get_text_features(input_ids, attention_mask)  # (T, P)
        return self.logits_per_image(self.get_image_features(pixel_values, interpolate_pos_encoding), text)


class CLIPTextModel(CLIPPreTrainedModel):
    """The text tower alone -> pooled (B, hidden_size)."""

    weights_mapper = CLIP_WEIGHTS.for_head("text_model")

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.text_model(input_ids, attention_mask)


class CLIPTextModelWithProjection(CLIPTextModel):
    """The text tower and its projection -> text embeds (B, projection_dim)."""

    weights_mapper = CLIP_WEIGHTS.for_head("text_model", "text_projection")

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids, attention_mask))


class CLIPVisionModel(CLIPPreTrainedModel):
    """The vision tower alone -> pooled (B, hidden_size)."""

    weights_mapper = CLIP_WEIGHTS.for_head("vision_model")

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config.vision)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.vision_model(pixel_values, interpolate_pos_encoding)


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """The vision tower and its projection -> image embeds (B, projection_dim)."""

    weights_mapper = CLIP_WEIGHTS.for_head("vision_model", "visual_projection")

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values, interpolate_pos_encoding))

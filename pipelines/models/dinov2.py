"""DINOv2: ViT-style patches and [CLS] token, pre-norm blocks with layer scale, position embeddings always interpolated.

    Dinov2Model                      pixel_values (B, 3, H, W) -> {"last_hidden_state": (B, 1 + patches, C),
                                     "pooler_output": (B, C), the layer-normed [CLS] state}
    Dinov2ForImageClassification     logits (B, num_labels) from [CLS] concatenated with the mean of the patch states

Differences from ViT that matter for parity with transformers: every residual branch is scaled per channel by a
learned `layer_scale.lambda1`; the MLP width is `int(hidden_size * mlp_ratio)` (config.json's intermediate_size is
not used); the position embeddings are resized for every input whose patch grid differs from the pretraining one (or
that is not square), bicubically in float32 whatever the model's dtype, so any multiple of the patch size is accepted.
The checkpoint's `mask_token` serves masked pretraining only and is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper, read_id2label


@dataclass(frozen=True)
class Dinov2Config:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None
    max_input_length: int | None = None  # images have no token limit

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def mlp_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_hf(cls, d: dict) -> Dinov2Config:
        if d.get("use_swiglu_ffn"):
            raise ValueError("config.json use_swiglu_ffn=True (DINOv2 giant) is not supported; only the GELU MLP is")
        config = cls(
            hidden_size=d.get("hidden_size", 768),
            num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=d.get("num_attention_heads", 12),
            mlp_ratio=d.get("mlp_ratio", 4.0),
            hidden_act=d.get("hidden_act", "gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            image_size=_side("image_size", d.get("image_size", 224)),
            patch_size=_side("patch_size", d.get("patch_size", 14)),
            num_channels=d.get("num_channels", 3),
            qkv_bias=d.get("qkv_bias", True),
            id2label=read_id2label(d),
            problem_type=d.get("problem_type"),
        )
        layers.activation(config.hidden_act)  # raise for an unknown activation
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        return config


def _side(key: str, value) -> int:
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json {key}={value!r}: DINOv2 takes one positive int (a square)")
    return value


class Dinov2PatchEmbeddings(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"pixel_values have {pixel_values.shape[1]} channels; the model takes {self.num_channels}")
        x = self.projection(pixel_values.to(self.projection.weight.dtype))  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, patches, C)


class Dinov2Embeddings(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.patch_size = config.patch_size
        side = config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.patch_embeddings = Dinov2PatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.empty(1, 1 + side * side, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)  # (B, P, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, 1 + P, C)
        return x + self.interpolated_positions(patches.shape[1], H, W)

    def interpolated_positions(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """transformers' `interpolate_pos_encoding`: the table as stored when the grid and a square input match,
        else its patch rows resized bicubically (align_corners=False) in float32, cast back."""
        table = self.position_embeddings  # (1, 1 + P0, C)
        num_positions = table.shape[1] - 1
        if num_patches == num_positions and height == width:
            return table
        side, dim = int(num_positions**0.5), table.shape[-1]
        grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, C, side, side)
        size = (height // self.patch_size, width // self.patch_size)
        grid = F.interpolate(grid.float(), size=size, mode="bicubic", align_corners=False).to(table.dtype)
        return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)  # (1, 1 + P, C)


class Dinov2SelfAttention(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            for proj in (self.query, self.key, self.value)
        )
        return layers.attention(q, k, v, None)  # (B, T, C)


class Dinov2Output(nn.Module):
    """The attention's output projection, under the checkpoint name `attention.output.dense`."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class Dinov2Attention(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.attention = Dinov2SelfAttention(config)
        self.output = Dinov2Output(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class Dinov2LayerScale(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1  # (B, T, C), scaled per channel


class Dinov2MLP(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_size)
        self.fc2 = nn.Linear(config.mlp_size, config.hidden_size)
        self.act = layers.activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Dinov2Layer(nn.Module):
    """Pre-norm block with layer scale: x + ls1(attention(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov2Attention(config)
        self.layer_scale1 = Dinov2LayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov2MLP(config)
        self.layer_scale2 = Dinov2LayerScale(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))  # (B, T, C)
        return x + self.layer_scale2(self.mlp(self.norm2(x)))  # (B, T, C)


class Dinov2Encoder(nn.Module):
    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.layer = nn.ModuleList(Dinov2Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return x


# Checkpoint names, one entry per deviation (see pipelines.loading.WeightsMapper for the order they apply in).
DINOV2_WEIGHTS = WeightsMapper(
    prefix="dinov2.",
    base_parts=("embeddings", "encoder", "layernorm"),  # a bare Dinov2Model checkpoint lacks `dinov2.`
    suffixes={"embeddings.mask_token": None},  # masked pretraining only
    head_parts=("classifier",),
)


class Dinov2PreTrainedModel(nn.Module):
    config_class = Dinov2Config
    base_model_prefix = "dinov2"
    weights_mapper = DINOV2_WEIGHTS


class Dinov2Model(Dinov2PreTrainedModel):
    """The encoder -> {"last_hidden_state": (B, T, C), "pooler_output": (B, C)}: the pooler is the normed [CLS] state."""

    weights_mapper = DINOV2_WEIGHTS.for_base_model()

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.config = config
        self.embeddings = Dinov2Embeddings(config)
        self.encoder = Dinov2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))  # (B, T, C)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.encode(pixel_values)  # (B, T, C)
        return {"last_hidden_state": x, "pooler_output": x[:, 0]}


class Dinov2ForImageClassification(Dinov2PreTrainedModel):
    weights_mapper = DINOV2_WEIGHTS.for_head("classifier")

    def __init__(self, config: Dinov2Config):
        super().__init__()
        self.config = config
        self.dinov2 = Dinov2Model(config)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.dinov2.encode(pixel_values)  # (B, T, C)
        return self.classifier(torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=-1))  # (B, num_labels)

"""ViT and DeiT: a patch embedding, a [CLS] token (DeiT: and a distillation token), a pre-norm transformer encoder.

    ViTModel / DeiTModel                        pixel_values (B, 3, H, W) -> {"last_hidden_state": (B, T, C),
                                                "pooler_output": (B, C)}; T = 1 (+1 for DeiT) + patches
    ViTForImageClassification                   logits (B, num_labels) from the [CLS] state
    DeiTForImageClassification                  logits from the [CLS] state
    DeiTForImageClassificationWithTeacher       the mean of the [CLS] head's and the distillation head's logits

DeiT is ViT with one more special token (its position embeddings hold 2 + patches rows), so one set of modules serves
both, told apart by `ViTConfig.special_tokens`. As in transformers, an input of another size than config.json's
`image_size` is refused unless `interpolate_pos_encoding=True`, which resizes the patch position embeddings bicubically
(skipped when the patch count and a square input match the pretraining grid, as transformers does). The pooler (dense +
tanh over the [CLS] state) is loaded when the checkpoint has it: a classifier checkpoint has none, and a base model
loaded from one is built without it (pipelines.loading `optional_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import layers
from pipelines.loading import WeightsMapper, read_id2label


@dataclass(frozen=True)
class ViTConfig:
    """config.json of a ViT or DeiT checkpoint (the same keys); `special_tokens` is 1 for ViT, 2 for DeiT."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int = 768
    pooler_act: str = "tanh"
    id2label: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    problem_type: str | None = None
    special_tokens: int = 1
    max_input_length: int | None = None  # images have no token limit

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row at the pretraining size."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @classmethod
    def from_hf(cls, d: dict) -> ViTConfig:
        hidden = d.get("hidden_size", 768)
        config = cls(
            hidden_size=hidden,
            num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=d.get("num_attention_heads", 12),
            intermediate_size=d.get("intermediate_size", 3072),
            hidden_act=d.get("hidden_act", "gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            image_size=_pair("image_size", d.get("image_size", 224)),
            patch_size=_pair("patch_size", d.get("patch_size", 16)),
            num_channels=d.get("num_channels", 3),
            qkv_bias=d.get("qkv_bias", True),
            pooler_output_size=d.get("pooler_output_size") or hidden,
            pooler_act=d.get("pooler_act", "tanh"),
            id2label=read_id2label(d),
            problem_type=d.get("problem_type"),
            special_tokens=2 if d.get("model_type") == "deit" else 1,
        )
        layers.activation(config.hidden_act)  # raise for an unknown activation
        layers.activation(config.pooler_act)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} is not divisible by num_attention_heads={config.num_attention_heads}"
            )
        head_dim = d.get("head_dim")
        if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
            raise ValueError(f"head_dim={head_dim} x num_attention_heads must equal hidden_size={config.hidden_size}")
        if any(i % p for i, p in zip(config.image_size, config.patch_size)):
            raise ValueError(f"image_size={list(config.image_size)} is not a multiple of patch_size")
        return config


def _pair(key: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"config.json {key}={value!r}: expected an int or [height, width]")


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
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


class ViTEmbeddings(nn.Module):
    """[CLS] (and DeiT's distillation token) + patch embeddings + position embeddings."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        rows, cols = config.grid
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        if config.special_tokens == 2:
            self.distillation_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.empty(1, config.special_tokens + rows * cols, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        if not interpolate_pos_encoding and (H, W) != self.config.image_size:
            raise ValueError(
                f"input image size ({H}*{W}) doesn't match the model ({self.config.image_size[0]}*"
                f"{self.config.image_size[1]}); pass interpolate_pos_encoding=True to interpolate its position embeddings"
            )
        patches = self.patch_embeddings(pixel_values)  # (B, P, C)
        special = [self.cls_token] + ([self.distillation_token] if self.config.special_tokens == 2 else [])
        x = torch.cat([t.expand(B, -1, -1) for t in special] + [patches], dim=1)  # (B, T, C)
        return x + (
            self.interpolated_positions(patches.shape[1], H, W)
            if interpolate_pos_encoding
            else self.position_embeddings
        )

    def interpolated_positions(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an H x W input: the patch rows resized bicubically (align_corners=False) from the
        pretraining grid, in the parameters' dtype, as transformers' `interpolate_pos_encoding`."""
        n = self.config.special_tokens
        table = self.position_embeddings  # (1, n + P0, C)
        num_positions = table.shape[1] - n
        if num_patches == num_positions and height == width:
            return table
        side, dim = int(num_positions**0.5), table.shape[-1]
        grid = table[:, n:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, C, side, side)
        size = (height // self.config.patch_size[0], width // self.config.patch_size[1])
        grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
        return torch.cat([table[:, :n], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)  # (1, n + P, C)


class ViTSelfAttention(nn.Module):
    def __init__(self, config: ViTConfig):
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


class ViTDense(nn.Module):
    """One linear layer under the checkpoint name `dense` (`attention.output`, `intermediate`, `output`)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTDense(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class ViTLayer(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = ViTDense(config.hidden_size, config.intermediate_size)
        self.output = ViTDense(config.intermediate_size, config.hidden_size)
        self.act = layers.activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))  # (B, T, C)
        return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))  # (B, T, C)


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return x


class ViTPooler(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.act = layers.activation(config.pooler_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x[:, 0]))  # (B, pooler_output_size) from the [CLS] position


# Checkpoint names, one entry per deviation (see pipelines.loading.WeightsMapper for the order they apply in).
VIT_WEIGHTS = WeightsMapper(
    prefix="vit.",
    base_parts=("embeddings", "encoder", "layernorm", "pooler"),  # a bare ViTModel checkpoint lacks `vit.`
    head_parts=("vit.pooler", "classifier"),  # only the base model has the pooler
)
DEIT_WEIGHTS = WeightsMapper(
    prefix="deit.",
    base_parts=("embeddings", "encoder", "layernorm", "pooler"),
    head_parts=("deit.pooler", "classifier", "cls_classifier", "distillation_classifier"),
)


class ViTPreTrainedModel(nn.Module):
    """What the loader reads off every class of this file, and where a head class keeps its encoder."""

    config_class = ViTConfig
    base_model_prefix = "vit"
    weights_mapper = VIT_WEIGHTS


class ViTModel(ViTPreTrainedModel):
    """The encoder -> {"last_hidden_state": (B, T, C), "pooler_output": (B, C) where the checkpoint has a pooler}."""

    weights_mapper = replace(VIT_WEIGHTS, owned=("vit.pooler",), bare=True)
    optional_parts = ("pooler",)  # a classifier checkpoint has no pooler: the base model is then built without one

    def __init__(self, config: ViTConfig, pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if pooler else None

    def encode(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The final layer-normed hidden states (B, T, C)."""
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, T, C)
        return self.layernorm(self.encoder(x))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> dict[str, torch.Tensor]:
        x = self.encode(pixel_values, interpolate_pos_encoding)  # (B, T, C)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(x)  # (B, C)
        return out


class ViTHeadModel(ViTPreTrainedModel):
    """The encoder (a ViTModel without pooler, under `base_model_prefix`) and a head that the subclass adds."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.add_module(self.base_model_prefix, ViTModel(config, pooler=False))

    def encode(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        return getattr(self, self.base_model_prefix).encode(pixel_values, interpolate_pos_encoding)  # (B, T, C)


class ViTForImageClassification(ViTHeadModel):
    weights_mapper = VIT_WEIGHTS.for_head("classifier")

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.classifier(self.encode(pixel_values, interpolate_pos_encoding)[:, 0])  # (B, num_labels)


# -- DeiT: ViT with a distillation token, under `deit.` ---------------------------------------------------------------
class DeiTModel(ViTModel):
    base_model_prefix = "deit"
    weights_mapper = replace(DEIT_WEIGHTS, owned=("deit.pooler",), bare=True)


class DeiTForImageClassification(ViTForImageClassification):
    """The head on the [CLS] state only (a DeiT fine-tuned without its teacher)."""

    base_model_prefix = "deit"
    weights_mapper = DEIT_WEIGHTS.for_head("classifier")


class DeiTForImageClassificationWithTeacher(ViTHeadModel):
    """Two heads, on the [CLS] and the distillation states; the logits are their mean (inference as in the paper)."""

    base_model_prefix = "deit"
    weights_mapper = DEIT_WEIGHTS.for_head("cls_classifier", "distillation_classifier")

    def __init__(self, config: ViTConfig):
        super().__init__(config)
        self.cls_classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.distillation_classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        x = self.encode(pixel_values, interpolate_pos_encoding)  # (B, T, C)
        return (self.cls_classifier(x[:, 0]) + self.distillation_classifier(x[:, 1])) / 2  # (B, num_labels)

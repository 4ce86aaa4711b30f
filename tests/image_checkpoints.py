"""Tiny random image-model checkpoints and test images made on the fly; `transformers` is only the oracle here.

    make_image_checkpoint(path, "vit", "image-classification")            # config.json, model.safetensors,
                                                                          # preprocessor_config.json
    make_image_checkpoint(path, "dinov2", "base", image_size=48)          # config overrides pass through
    make_image_checkpoint(path, "deit", "base", processor={"size": {"height": 40, "width": 40}})

A family is one row of `IMAGE_FAMILIES`: its transformers config class, its image processor class (written with
`save_pretrained`, so the folder holds exactly what the Hub would), the processor's sizes for the tiny model, and
the transformers class per head. New families (CLIP, SigLIP) add a row. `random_image(seed, h, w)` and
`gradient_image(h, w)` are test images: RGB PIL images made with numpy, never files checked in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = dict(
    hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=2, image_size=32, patch_size=8
)
LABELS = ("cat", "dog", "bird", "fish", "horse", "cow", "frog")  # 7 labels: top_k's default of 5 cuts the list

# family -> (config class, image processor class, processor kwargs, {head: model class}); names in transformers
IMAGE_FAMILIES: dict[str, tuple[str, str, dict, dict[str, str]]] = {
    "vit": (
        "ViTConfig",
        "ViTImageProcessor",
        {"size": {"height": 32, "width": 32}},
        {"base": "ViTModel", "image-classification": "ViTForImageClassification"},
    ),
    "deit": (
        "DeiTConfig",
        "DeiTImageProcessor",
        {"size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32}},
        {
            "base": "DeiTModel",
            "image-classification": "DeiTForImageClassification",
            "image-classification-with-teacher": "DeiTForImageClassificationWithTeacher",
        },
    ),
    "dinov2": (
        "Dinov2Config",
        "BitImageProcessor",
        {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}},
        {"base": "Dinov2Model", "image-classification": "Dinov2ForImageClassification"},
    ),
}
_FAMILY_SIZES = {"dinov2": {"mlp_ratio": 3}}  # DINOv2: an int mlp_ratio sets the MLP width (96), not intermediate_size


def make_image_checkpoint(
    path, family: str, head: str = "base", *, num_labels: int = len(LABELS), processor: dict | None = None, **overrides
) -> Path:
    """Write a tiny random `family` model with `head` plus its preprocessor_config.json into `path`.
    `processor` overrides the image processor's keyword arguments; other keywords override config.json."""
    import transformers

    if family not in IMAGE_FAMILIES or head not in IMAGE_FAMILIES[family][3]:
        heads = {f: sorted(row[3]) for f, row in IMAGE_FAMILIES.items()}
        raise ValueError(f"unknown family {family!r} or head {head!r}; families and heads: {heads}")
    config_name, processor_name, processor_kwargs, classes = IMAGE_FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    labels = {i: LABELS[i] if i < len(LABELS) else f"LABEL_{i}" for i in range(num_labels)}
    sizes = {**SIZES, **_FAMILY_SIZES.get(family, {})}
    config = getattr(transformers, config_name)(
        **{**sizes, "id2label": labels, "label2id": {v: k for k, v in labels.items()}, **copy.deepcopy(overrides)}
    )
    torch.manual_seed(0)
    model = getattr(transformers, classes[head])(config).eval()
    with torch.no_grad():  # perturb every weight so that no head is near uniform and layer scales are not all 1
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    model.save_pretrained(path)
    image_processor = getattr(transformers, processor_name + "Pil")(**{**processor_kwargs, **(processor or {})})
    image_processor.save_pretrained(path)
    return path


def load_reference(path: Path, family: str, head: str = "base"):
    """The transformers model of a checkpoint folder, in eval mode."""
    import transformers

    return getattr(transformers, IMAGE_FAMILIES[family][3][head]).from_pretrained(path).eval()


def random_image(seed: int, height: int, width: int, mode: str = "RGB") -> Image.Image:
    """Uniform random pixels: every resize filter and crop offset shows in them."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def gradient_image(height: int, width: int) -> Image.Image:
    """A smooth RGB gradient: red along x, green along y, blue along the diagonal (orientation shows)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 255 // (height + width)], -1)
    return Image.fromarray(rgb.astype(np.uint8))

"""The image processor of `preprocessor_config.json`, as transformers' PIL-backend processors compute it, in two halves.

    processor = ImageProcessor.from_pretrained(folder)      # or ImageProcessor.from_dict(config_dict)
    pixels = processor.prepare([pil_image, ...])           # torch.uint8 (N, 3, H, W): RGB, resized, center-cropped
    pixel_values = processor.normalize(pixels)              # torch.float32 (N, 3, H, W): rescaled, normalized
    processor([pil_image, ...])                             # {"pixel_values": float32 (N, 3, H, W)}: both halves

Why two halves: in a Ray job decoding, resizing and cropping run in the CPU preprocess tasks and only `prepare`'s
uint8 pixels travel to the model actor (a quarter of float32's bytes), where `normalize` runs on the device. The split
is exact: transformers' PIL path is uint8 up to its rescale too (the RGB image is uint8, Pillow's resize returns uint8,
the crop slices), so `normalize(prepare(x))` equals transformers' `pixel_values`; `normalize` even reproduces its
float64 rescale followed by float32 normalization bit for bit, through a per-channel table of the 256 byte values.

Supported `image_processor_type`s (or legacy `feature_extractor_type`s, or config.json's model_type when the file
names neither): ViT, DeiT, CLIP, SigLIP and Bit (DINOv2's), with each class's defaults for the keys a file omits.
Steps, in transformers' order: RGB conversion (pipelines.images.to_rgb), resize with the configured Pillow `resample`
filter to `size` ({height, width}, {shortest_edge} or {shortest_edge, longest_edge}; a legacy int size is square or a
shortest edge as the class's `default_to_square` says), center crop to `crop_size` (zero-padded where the image is
smaller, as transformers does), rescale by `rescale_factor`, normalize by `image_mean` / `image_std`. None of these
classes has a `crop_pct` in transformers (DeiT's 0.875 is baked into its 256 -> 224 sizes), so a file setting one is
refused, as is every key or value we do not implement (padding, channels-last output, other size kinds): the error
names the key and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.images import to_rgb
from pipelines.processors.layout import Layout, Stacked

CONFIG_NAME = "preprocessor_config.json"
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL.Image.Resampling

# transformers' class attributes: what each processor class does for the keys a preprocessor_config.json omits.
_BASE = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False, rescale_factor=1 / 255)
_SQUARE_224 = {"height": 224, "width": 224}
CLASS_DEFAULTS: dict[str, dict] = {
    "ViTImageProcessor": dict(
        _BASE, resample=2, size=_SQUARE_224, default_to_square=True, do_resize=True, do_rescale=True, do_normalize=True
    )
    | dict(zip(("image_mean", "image_std"), IMAGENET_STANDARD)),
    "DeiTImageProcessor": dict(
        _BASE,
        resample=3,
        size={"height": 256, "width": 256},
        crop_size=_SQUARE_224,
        default_to_square=True,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
    )
    | dict(zip(("image_mean", "image_std"), IMAGENET_STANDARD)),
    "CLIPImageProcessor": dict(
        _BASE,
        resample=3,
        size={"shortest_edge": 224},
        crop_size=_SQUARE_224,
        default_to_square=False,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
    )
    | dict(zip(("image_mean", "image_std"), OPENAI_CLIP)),
    "SiglipImageProcessor": dict(
        _BASE, resample=3, size=_SQUARE_224, default_to_square=False, do_resize=True, do_rescale=True, do_normalize=True
    )
    | dict(zip(("image_mean", "image_std"), IMAGENET_STANDARD)),
}
CLASS_DEFAULTS["BitImageProcessor"] = dict(CLASS_DEFAULTS["CLIPImageProcessor"])
# config.json model_type -> the processor class transformers' AutoImageProcessor maps it to
MODEL_TYPE_PROCESSORS = {
    "vit": "ViTImageProcessor",
    "deit": "DeiTImageProcessor",
    "clip": "CLIPImageProcessor",
    "clip_vision_model": "CLIPImageProcessor",
    "siglip": "SiglipImageProcessor",
    "siglip_vision_model": "SiglipImageProcessor",
    "dinov2": "BitImageProcessor",
}

_STEP_KEYS = frozenset(
    ("do_resize", "size", "resample", "default_to_square", "do_center_crop", "crop_size", "do_rescale")
    + ("rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
)
_NAME_KEYS = frozenset(("image_processor_type", "feature_extractor_type", "processor_class"))
# Keys transformers writes whose values change nothing for these classes' PIL path as long as they are these values.
_INERT = {
    "do_pad": (None, False),
    "pad_size": (None,),
    "crop_pct": (None,),
    "use_square_size": (None, False),
    "data_format": (None, "channels_first"),
    "input_data_format": (None,),
    "device": (None,),
    "return_tensors": (None,),
    "disable_grouping": (None, False, True),  # torchvision backend only
    "image_seq_length": None,  # any value: only processors of multimodal models read it
}


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The steps a preprocessor_config.json asks for, checked. size: ("height_width", h, w), ("shortest_edge", s,
    None) or ("shortest_edge", s, longest); crop_size: (h, w)."""

    processor_type: str
    do_resize: bool
    size: tuple[str, int, int | None] | None
    resample: int
    do_center_crop: bool
    crop_size: tuple[int, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_hf(cls, d: Mapping, model_type: str | None = None) -> ImageProcessorConfig:
        kind = _processor_type(d, model_type)
        _check_keys(d)
        given = {k: v for k, v in d.items() if k in _STEP_KEYS and v is not None}
        c = {**CLASS_DEFAULTS[kind], **given}
        resample = c["resample"]
        if isinstance(resample, bool) or resample not in RESAMPLE:
            raise ValueError(f"preprocessor_config.json resample={resample!r} is not supported; allowed: {RESAMPLE}")
        config = cls(
            processor_type=kind,
            do_resize=bool(c["do_resize"]),
            size=_size(c.get("size"), bool(c["default_to_square"])) if c["do_resize"] else None,
            resample=int(resample),
            do_center_crop=bool(c["do_center_crop"]),
            crop_size=_crop_size(c.get("crop_size")) if c["do_center_crop"] else None,
            do_rescale=bool(c["do_rescale"]),
            rescale_factor=float(c["rescale_factor"]),
            do_normalize=bool(c["do_normalize"]),
            image_mean=_per_channel("image_mean", c.get("image_mean")),
            image_std=_per_channel("image_std", c.get("image_std")),
        )
        if config.do_normalize and 0.0 in config.image_std:
            raise ValueError(f"preprocessor_config.json image_std={list(config.image_std)} has a zero")
        return config

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every prepared image, or None where it depends on the image (a shortest-edge resize, no crop)."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.size[0] == "height_width":
            return self.size[1], self.size[2]
        return None


class ImageProcessor:
    """RGB conversion, resize, center crop (`prepare`, uint8) and rescale + normalize (`normalize`, float32), as
    transformers' PIL-backend processor of the same preprocessor_config.json. No weights; picklable."""

    model_max_length = None  # images have no length limit of their own

    def __init__(self, config: ImageProcessorConfig):
        self.config = config
        self._table = _normalize_table(config)  # (3, 256) float32: the normalized value of each byte per channel

    @classmethod
    def from_dict(cls, d: Mapping, model_type: str | None = None) -> ImageProcessor:
        return cls(ImageProcessorConfig.from_hf(d, model_type))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageProcessor:
        """From a model folder's preprocessor_config.json (config.json's model_type names the class if it does not)."""
        folder = Path(folder)
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; an image model folder needs one")
        d = json.loads(path.read_text(encoding="utf-8"))
        model_type = None
        if (folder / "config.json").is_file():
            model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        return cls.from_dict(d, model_type)

    def layout(self, input_names) -> Layout:
        """Prepared pixels batch by stacking: every image of one processor has one shape (when it has a fixed size)."""
        return Layout({"pixels": Stacked(torch.uint8)})

    # -- half 1: CPU, exact uint8 ------------------------------------------------------------------------------
    def prepare_image(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> uint8 (3, H, W): RGB, resized, center-cropped."""
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"ImageProcessor.prepare takes PIL images, got {type(image).__name__}; "
                "decode other forms with pipelines.images.load_image"
            )
        c = self.config
        if image.mode != "RGB":
            image = to_rgb(image)
        if c.do_resize:
            height, width = resize_output_size(image.height, image.width, c.size)
            image = image.resize((width, height), resample=c.resample, reducing_gap=None)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
        if c.do_center_crop:
            pixels = center_crop(pixels, *c.crop_size)
        return pixels.contiguous()

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> uint8 (N, 3, H, W); ValueError when their prepared sizes differ (no crop, no fixed size)."""
        prepared = [self.prepare_image(image) for image in images]
        shapes = sorted({tuple(p.shape) for p in prepared})
        if len(shapes) > 1:
            raise ValueError(
                f"prepared images have different shapes {shapes}: this preprocessor_config.json has no fixed output "
                "size (resize to height/width or center crop); prepare them one at a time"
            )
        if not prepared:
            raise ValueError("prepare needs at least one image")
        return torch.stack(prepared)

    # -- half 2: device, float32 -----------------------------------------------------------------------------
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) or (3, H, W) -> float32 of the same shape: rescaled and normalized as configured."""
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize takes the uint8 pixels of prepare(), got {pixels.dtype}")
        if pixels.shape[-3] != 3:
            raise ValueError(f"normalize takes RGB pixels (..., 3, H, W), got shape {tuple(pixels.shape)}")
        table = self._table.to(pixels.device)
        offsets = torch.arange(0, 3 * 256, 256, device=pixels.device).view(3, 1, 1)  # channel c reads row c
        return table.view(-1)[pixels.long() + offsets]

    def __call__(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.normalize(self.prepare(images))}

    def __repr__(self) -> str:
        return f"ImageProcessor({self.config})"


def resize_output_size(height: int, width: int, size: tuple[str, int, int | None]) -> tuple[int, int]:
    """(H, W) after the resize, as transformers computes it (get_resize_output_image_size without a max size,
    get_size_with_aspect_ratio with a longest edge)."""
    kind, a, b = size
    if kind == "height_width":
        return a, b
    if b is None:  # shortest edge only: the long side truncated, as torchvision's Resize
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = a, int(a * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    shortest, raw = a, None  # shortest and longest edge
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * shortest > b:
        raw = b * low / high
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(shortest * height / width)), shortest
    return shortest, (int(raw * width / height) if raw is not None else int(shortest * width / height))


def center_crop(pixels: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
    """(C, H, W) cut to (C, crop_height, crop_width) around the center; where the image is smaller, it is placed on a
    zero canvas first, with transformers' offsets (floor for the crop, ceil for the padding)."""
    _, height, width = pixels.shape
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    canvas = pixels.new_zeros((pixels.shape[0], new_height, new_width))
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    canvas[:, top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return canvas[:, max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)]


def _normalize_table(c: ImageProcessorConfig) -> torch.Tensor:
    """(3, 256) float32: transformers' value for each byte and channel (rescale in float64 then cast to float32,
    normalize in float32), so that a lookup reproduces it exactly."""
    values = np.arange(256, dtype=np.float64)
    values = (values * c.rescale_factor if c.do_rescale else values).astype(np.float32)
    rows = np.repeat(values[None], 3, axis=0)  # (3, 256)
    if c.do_normalize:
        mean = np.array(c.image_mean, dtype=np.float32)[:, None]
        std = np.array(c.image_std, dtype=np.float32)[:, None]
        rows = (rows - mean) / std
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def _processor_type(d: Mapping, model_type: str | None) -> str:
    name = d.get("image_processor_type")
    if name is None and d.get("feature_extractor_type") is not None:
        name = str(d["feature_extractor_type"]).replace("FeatureExtractor", "ImageProcessor")
    if name is None and model_type is not None:
        name = MODEL_TYPE_PROCESSORS.get(model_type)
        if name is None:
            raise ValueError(
                f"preprocessor_config.json names no image_processor_type and model_type {model_type!r} has no "
                f"image processor here; supported model types: {sorted(MODEL_TYPE_PROCESSORS)}"
            )
    if name is None:
        raise ValueError(f"preprocessor_config.json names no image_processor_type; supported: {sorted(CLASS_DEFAULTS)}")
    base = str(name).removesuffix("Pil").removesuffix("Fast")
    if base not in CLASS_DEFAULTS:
        raise ValueError(f"image_processor_type {name!r} is not supported; supported: {sorted(CLASS_DEFAULTS)}")
    return base


def _check_keys(d: Mapping) -> None:
    for key, value in d.items():
        if key in _STEP_KEYS or key in _NAME_KEYS:
            continue
        if key not in _INERT:
            known = sorted(_STEP_KEYS | _NAME_KEYS | set(_INERT))
            raise ValueError(f"preprocessor_config.json key {key!r} is not supported; supported keys: {known}")
        allowed = _INERT[key]
        if allowed is not None and value not in allowed:
            raise ValueError(
                f"preprocessor_config.json {key}={value!r} is not supported; allowed: {list(allowed)}"
                + (" (center crop sizes are given by crop_size)" if key == "crop_pct" else "")
            )


def _size(size, default_to_square: bool) -> tuple[str, int, int | None]:
    if isinstance(size, bool) or size is None:
        raise ValueError(f"preprocessor_config.json has do_resize but size={size!r}")
    if isinstance(size, int):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, Mapping):
        raise ValueError(f"preprocessor_config.json size={size!r}: expected an int, [height, width] or a dict")
    keys = set(size)
    if keys == {"height", "width"}:
        return "height_width", _positive("size", size["height"]), _positive("size", size["width"])
    if keys == {"shortest_edge"}:
        return "shortest_edge", _positive("size", size["shortest_edge"]), None
    if keys == {"shortest_edge", "longest_edge"}:
        shortest, longest = _positive("size", size["shortest_edge"]), _positive("size", size["longest_edge"])
        return "shortest_edge", shortest, longest
    raise ValueError(
        f"preprocessor_config.json size with keys {sorted(keys)} is not supported; allowed key sets: "
        "{height, width}, {shortest_edge}, {shortest_edge, longest_edge}"
    )


def _crop_size(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive("crop_size", size), _positive("crop_size", size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return _positive("crop_size", size[0]), _positive("crop_size", size[1])
    if isinstance(size, Mapping) and set(size) == {"height", "width"}:
        return _positive("crop_size", size["height"]), _positive("crop_size", size["width"])
    raise ValueError(
        f"preprocessor_config.json crop_size={size!r} is not supported; allowed: an int, [height, width] or "
        "{height, width} (do_center_crop is on)"
    )


def _per_channel(key: str, value) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ValueError(f"preprocessor_config.json {key}={value!r}: expected a number or 3 numbers (R, G, B)")


def _positive(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"preprocessor_config.json {key} must hold positive integers, got {value!r}")
    return value

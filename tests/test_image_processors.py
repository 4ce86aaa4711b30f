"""pipelines.processors.image against transformers' PIL-backend image processors (the oracle): the same pixel_values
for each family's preprocessor_config.json, on images of several sizes and aspect ratios; unsupported keys refused."""

import json

import pytest
import torch

from pipelines.processors import load_processor
from pipelines.processors.image import ImageProcessor
from tests.image_checkpoints import random_image

# (height, width): landscape, portrait, tiny (smaller than every crop), square, large
SIZES = [(40, 60), (77, 31), (13, 19), (224, 224), (300, 200)]
# (transformers class, keyword arguments): each family's defaults, then the size kinds, filters and crops they allow
CONFIGS = [
    ("ViTImageProcessorPil", {}),
    ("DeiTImageProcessorPil", {}),
    ("CLIPImageProcessorPil", {}),
    ("SiglipImageProcessorPil", {}),
    ("BitImageProcessorPil", {}),
    ("BitImageProcessorPil", {"size": {"shortest_edge": 20, "longest_edge": 40}, "do_center_crop": False}),
    ("CLIPImageProcessorPil", {"size": {"shortest_edge": 20}, "crop_size": {"height": 28, "width": 33}}),  # pads
    ("ViTImageProcessorPil", {"size": {"height": 32, "width": 48}, "resample": 0}),
    ("ViTImageProcessorPil", {"size": {"height": 31, "width": 17}, "resample": 1}),
    ("SiglipImageProcessorPil", {"size": {"height": 30, "width": 30}, "resample": 4, "do_normalize": False}),
    ("DeiTImageProcessorPil", {"resample": 5, "do_rescale": False}),
]


def _reference(name: str, kwargs: dict):
    import transformers

    return getattr(transformers, name)(**kwargs)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_pixel_values_equal_transformers(name, kwargs):
    """The saved preprocessor_config.json gives transformers' pixel_values exactly (the 1e-5 bar, met bit for bit:
    the same Pillow resize, the same uint8 crop, the same float64 rescale and float32 normalization)."""
    reference = _reference(name, kwargs)
    ours = ImageProcessor.from_dict(reference.to_dict())
    for seed, (height, width) in enumerate(SIZES):
        image = random_image(seed, height, width)
        expected = reference(image, return_tensors="pt")["pixel_values"]
        got = ours([image])["pixel_values"]
        assert got.dtype == torch.float32 and got.shape == expected.shape, (height, width)
        assert torch.equal(got, expected), f"{(height, width)}: max diff {(got - expected).abs().max().item()}"


def test_prepare_is_uint8_and_normalize_completes_it():
    """prepare -> uint8 (N, 3, H, W), the compact half a CPU stage ships; normalize(prepare(x)) is __call__(x)."""
    processor = ImageProcessor.from_dict(_reference("CLIPImageProcessorPil", {}).to_dict())
    images = [random_image(i, 50 + 9 * i, 70 - 5 * i) for i in range(3)]
    pixels = processor.prepare(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 224, 224)
    assert torch.equal(processor.normalize(pixels), processor(images)["pixel_values"])
    assert torch.equal(processor.normalize(pixels[0]), processor(images[:1])["pixel_values"][0])


def test_any_pil_mode_is_converted_as_transformers():
    """An RGBA image through CLIP's processor (do_convert_rgb): composited onto white, as transformers."""
    reference = _reference("CLIPImageProcessorPil", {"size": {"shortest_edge": 30}, "crop_size": 30})
    image = random_image(3, 40, 45, "RGBA")
    got = ImageProcessor.from_dict(reference.to_dict())([image])["pixel_values"]
    assert torch.equal(got, reference(image, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize(
    "name, legacy",
    [
        ("ViTImageProcessorPil", {"feature_extractor_type": "ViTFeatureExtractor", "size": 30, "resample": 2}),
        ("DeiTImageProcessorPil", {"feature_extractor_type": "DeiTFeatureExtractor", "size": 36, "crop_size": 30}),
        ("CLIPImageProcessorPil", {"feature_extractor_type": "CLIPFeatureExtractor", "size": 30, "crop_size": 28}),
    ],
)
def test_legacy_configs_read_as_transformers(name, legacy):
    """Hub configs from the feature-extractor era: an int size is square (ViT, DeiT) or a shortest edge (CLIP),
    class defaults fill the missing keys, the class comes from feature_extractor_type."""
    import transformers

    reference = getattr(transformers, name).from_dict(legacy)
    ours = ImageProcessor.from_dict(legacy)
    image = random_image(5, 41, 57)
    assert torch.equal(ours([image])["pixel_values"], reference(image, return_tensors="pt")["pixel_values"])


def test_from_pretrained_reads_the_folder(tmp_path):
    """A model folder: preprocessor_config.json, or config.json's model_type where the file names no class; the
    processor kind "image" loads it through the processor seam."""
    _reference("BitImageProcessorPil", {"size": {"shortest_edge": 24}, "crop_size": 20}).save_pretrained(tmp_path)
    processor = load_processor("image", tmp_path)
    assert isinstance(processor, ImageProcessor) and processor.config.output_size == (20, 20)
    settings = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del settings["image_processor_type"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    assert ImageProcessor.from_pretrained(tmp_path).config == processor.config
    with pytest.raises(FileNotFoundError, match="has no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"do_pad": True}, r"do_pad=True is not supported; allowed: \[None, False\]"),
        ({"crop_pct": 0.875}, r"crop_pct=0.875 is not supported; allowed: \[None\] \(center crop sizes"),
        ({"data_format": "channels_last"}, r"data_format='channels_last' is not supported"),
        ({"do_reduce_labels": True}, r"key 'do_reduce_labels' is not supported; supported keys: \["),
        (
            {"size": {"max_height": 30, "max_width": 30}},
            r"size with keys \['max_height', 'max_width'\] is not supported",
        ),
        ({"resample": 7}, r"resample=7 is not supported"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean=\[0.5, 0.5\]: expected a number or 3 numbers"),
        ({"image_processor_type": "ConvNextImageProcessor"}, r"'ConvNextImageProcessor' is not supported; supported"),
        ({"do_center_crop": True, "crop_size": {"shortest_edge": 3}}, r"crop_size=\{'shortest_edge': 3\} is not"),
    ],
)
def test_unsupported_configuration_is_refused_naming_the_key(change, message):
    settings = {**_reference("ViTImageProcessorPil", {}).to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        ImageProcessor.from_dict(settings)


def test_prepare_refuses_what_it_cannot_stack():
    """A shortest-edge resize without a crop gives per-image shapes: a batch of two aspect ratios is refused (one at
    a time works); a non-PIL input says where decoding lives."""
    processor = ImageProcessor.from_dict({"image_processor_type": "BitImageProcessor", "do_center_crop": False})
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 224, 298\), \(3, 298, 224\)\]"):
        processor.prepare([random_image(0, 30, 40), random_image(1, 40, 30)])
    assert processor.prepare([random_image(0, 30, 40)]).shape == (1, 3, 224, 298)
    with pytest.raises(TypeError, match=r"takes PIL images, got ndarray; decode other forms with pipelines.images"):
        processor.prepare([torch.zeros(3, 4, 4).numpy()])
    with pytest.raises(TypeError, match="takes the uint8 pixels of prepare"):
        processor.normalize(torch.zeros(1, 3, 4, 4))

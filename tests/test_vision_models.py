"""ViT, DeiT and DINOv2: our modules against transformers' on tiny random checkpoints (logits and hidden states within
1e-4 in float32, interpolated position embeddings included), and the image-classification and image-feature-extraction
pipelines against `transformers.pipeline` on the same folders."""

import io

import numpy as np
import pytest
import torch

from pipelines import pipeline
from pipelines.images import ImageInputError
from pipelines.loading import load_model
from pipelines.models import dinov2, vit
from pipelines.runtime import RuntimeConfig
from tests.compare import assert_same_output
from tests.image_checkpoints import load_reference, make_image_checkpoint, random_image

CLASSES = {
    ("vit", "base"): vit.ViTModel,
    ("vit", "image-classification"): vit.ViTForImageClassification,
    ("deit", "base"): vit.DeiTModel,
    ("deit", "image-classification"): vit.DeiTForImageClassification,
    ("deit", "image-classification-with-teacher"): vit.DeiTForImageClassificationWithTeacher,
    ("dinov2", "base"): dinov2.Dinov2Model,
    ("dinov2", "image-classification"): dinov2.Dinov2ForImageClassification,
}
CLASSIFIERS = [key for key in CLASSES if key[1] != "base"]
IMAGES = [random_image(i, 28 + 9 * i, 47 - 6 * i) for i in range(5)]  # mixed sizes and aspect ratios


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One checkpoint per (family, head), written once for the module."""
    return {key: make_image_checkpoint(tmp_path_factory.mktemp("-".join(key)), *key) for key in CLASSES}


@pytest.fixture(scope="module")
def models(folders):
    """(ours, transformers') per (family, head)."""
    return {
        key: (load_model(folders[key], CLASSES[key], RuntimeConfig()), load_reference(folders[key], *key))
        for key in CLASSES
    }


def _run(model, pixel_values, **kwargs):
    with torch.no_grad():
        return model(pixel_values, **kwargs)


@pytest.mark.parametrize("key", list(CLASSES), ids="-".join)
def test_outputs_equal_transformers(models, key):
    """Logits (heads) or last hidden state and pooled output (base models) within 1e-4 at the pretraining size."""
    ours, reference = models[key]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got, expected = _run(ours, x), _run(reference, x)
    if key[1] == "base":
        torch.testing.assert_close(got["last_hidden_state"], expected.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(got["pooler_output"], expected.pooler_output, atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(got, expected.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("key", list(CLASSES), ids="-".join)
@pytest.mark.parametrize("size", [(48, 40), (64, 16), (24, 24)], ids=["larger", "same-patches-not-square", "smaller"])
def test_interpolated_position_embeddings_equal_transformers(models, key, size):
    """Other input sizes: ViT / DeiT with interpolate_pos_encoding=True, DINOv2 always; (64, 16) has the pretraining
    patch count but is not square, which transformers still interpolates."""
    ours, reference = models[key]
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    kwargs = {} if key[0] == "dinov2" else {"interpolate_pos_encoding": True}
    got, expected = _run(ours, x, **kwargs), _run(reference, x, **kwargs)
    got = got["last_hidden_state"] if key[1] == "base" else got
    expected = expected.last_hidden_state if key[1] == "base" else expected.logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_another_size_without_interpolation_is_refused(models):
    """ViT, as transformers: a 48 x 40 input to a 32 x 32 model names both sizes and the option."""
    ours, _ = models[("vit", "image-classification")]
    with pytest.raises(
        ValueError, match=r"input image size \(48\*40\) doesn't match the model \(32\*32\); pass interp"
    ):
        _run(ours, torch.zeros(1, 3, 48, 40))


def test_base_model_from_a_classifier_checkpoint_has_no_pooler(folders, models):
    """A classifier checkpoint holds no pooler: ViTModel loads without one (not random weights as transformers would
    give) and its hidden states equal transformers'."""
    ours = load_model(folders[("vit", "image-classification")], vit.ViTModel, RuntimeConfig())
    assert ours.pooler is None
    reference = models[("vit", "image-classification")][1].vit
    x = torch.randn(2, 3, 32, 32)
    got = _run(ours, x)
    assert "pooler_output" not in got
    torch.testing.assert_close(got["last_hidden_state"], _run(reference, x).last_hidden_state, atol=1e-4, rtol=0)


# -- pipelines ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_pipelines(folders):
    import transformers

    tasks = {key: "image-feature-extraction" if key[1] == "base" else "image-classification" for key in CLASSES}
    return {key: transformers.pipeline(tasks[key], model=str(folders[key])) for key in CLASSES}


@pytest.mark.parametrize("key", CLASSIFIERS, ids="-".join)
def test_image_classification_equals_transformers_pipeline(folders, reference_pipelines, key):
    """Labels, scores (1e-5) and order of transformers.pipeline for the default and each option; the task and the
    class (DeiT's with-teacher included) come from config.json."""
    ours = pipeline(model=str(folders[key]))
    assert ours.task == "image-classification" and type(ours.model) is CLASSES[key]
    reference = reference_pipelines[key]
    for options in ({}, {"top_k": 2}, {"top_k": 50}, {"function_to_apply": "sigmoid"}, {"function_to_apply": "none"}):
        assert_same_output(ours(IMAGES, batch_size=2, **options), reference(IMAGES, **options), atol=1e-5)
    assert_same_output(ours(IMAGES[0]), reference(IMAGES[0]), atol=1e-5)
    assert len(ours(IMAGES[0])) == 5  # top_k's default of 5 out of 7 labels


@pytest.mark.parametrize("key", [k for k in CLASSES if k[1] == "base"], ids="-".join)
def test_image_feature_extraction_equals_transformers_pipeline(folders, reference_pipelines, key):
    """Hidden states (1, T, C) and pooled vectors (1, C) as transformers' nested lists; return_tensors as tensors."""
    ours = pipeline(model=str(folders[key]))
    assert ours.task == "image-feature-extraction"
    reference = reference_pipelines[key]
    for options in ({}, {"pool": True}):
        assert_same_output(ours(IMAGES, batch_size=3, **options), reference(IMAGES, **options), atol=1e-5)
    tensor = ours(IMAGES[0], return_tensors=True)
    expected = reference(IMAGES[0], return_tensors=True)
    assert tensor.shape == expected.shape == (1, 17 + (key[0] == "deit"), 32)
    torch.testing.assert_close(tensor, expected, atol=1e-5, rtol=0)


def test_every_input_form_gives_the_same_answer(folders, tmp_path):
    """PIL, PNG bytes, a path, a data URI, numpy HWC and torch CHW of one image: one answer (bit-equal one at a
    time); a list batches them and an iterator streams them."""
    import base64

    clf = pipeline("image-classification", model=str(folders[("vit", "image-classification")]))
    image = IMAGES[1]
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    path = tmp_path / "image.png"
    path.write_bytes(data)
    pixels = np.array(image)
    forms = [data, str(path), path, "data:image/png;base64," + base64.b64encode(data).decode(), pixels]
    forms.append(torch.from_numpy(pixels).permute(2, 0, 1))
    expected = clf(image)
    for form in forms:
        assert clf(form) == expected, type(form).__name__
    assert_same_output(clf(forms, batch_size=4), [expected] * len(forms), atol=1e-6)  # batched: float rounding only
    assert_same_output(list(clf(iter(forms[:2]))), [expected] * 2, atol=1e-6)


def test_bad_parameters_and_inputs_name_the_problem(folders):
    """Unknown parameters, a bad top_k or function, a corrupt image in a list, and pool on a pooler-less model."""
    clf = pipeline("image-classification", model=str(folders[("vit", "image-classification")]))
    with pytest.raises(TypeError, match=r"unknown parameters \['topk'\]; allowed: top_k, function_to_apply"):
        clf(IMAGES[0], topk=2)
    with pytest.raises(ValueError, match=r"top_k must be a positive integer, got 0"):
        clf(IMAGES[0], top_k=0)
    with pytest.raises(ValueError, match=r"unknown function_to_apply 'max'"):
        clf(IMAGES[0], function_to_apply="max")
    with pytest.raises(ImageInputError, match=r"bytes input of 9 bytes: not an image format"):
        clf([IMAGES[0], b"not a png"])
    features = pipeline("image-feature-extraction", model=str(folders[("vit", "image-classification")]))
    assert np.array(features(IMAGES[0])).shape == (1, 17, 32)
    with pytest.raises(ValueError, match=r"pool=True needs a pooled output, and this ViTModel has no pooler"):
        features(IMAGES[0], pool=True)


def test_processor_only_pipeline_prepares_compact_pixels(folders):
    """load_weights=False (a CPU stage): preprocess gives uint8 (3, 32, 32) pixels, what travels to the model."""
    pre = pipeline("image-classification", model=str(folders[("deit", "image-classification")]), load_weights=False)
    features = pre.preprocess_item(IMAGES[2], 0)
    assert [tuple(f["pixels"].shape) for f in features] == [(3, 32, 32)] and features[0]["pixels"].dtype == torch.uint8


def test_image_pipelines_batch_by_the_image_row_of_the_device_table(folders):
    """Image pipelines take DEVICE_DEFAULTS' image_batch_size (16 on the CPU, not the text tasks' 128: a ViT-base
    batch of 128 held 1.8 GB of activations and ran no faster); a runtime batch_size still wins, and the answers
    do not depend on it."""
    from pipelines.runtime import DEVICE_DEFAULTS

    folder = str(folders[("vit", "image-classification")])
    pipe = pipeline("image-classification", model=folder)
    assert pipe.batch_size == DEVICE_DEFAULTS["cpu"].image_batch_size == 16
    assert pipeline("image-feature-extraction", model=folder).batch_size == 16
    assert pipeline("image-classification", model=folder, batch_size=5).batch_size == 5
    images = [random_image(i, 20 + i, 30) for i in range(37)]
    assert_same_output(pipe(images, top_k=3), pipe(images, top_k=3, batch_size=37))

"""zero-shot-image-classification: an image scored against text labels by a dual encoder (CLIP, SigLIP), as
transformers' ZeroShotImageClassificationPipeline.

Each label becomes a text through `hypothesis_template` (default "This is a photo of {}."). The texts are the same
for every image of a call, so the text tower runs once per label set and batch of images (`run_model` encodes them,
then each micro-batch of images is scored against those features), never once per image as transformers does.
Images are decoded and resized in preprocess (CPU; `pixels`, uint8) and normalized in the model step.

Scores: CLIP's are a softmax of `logits_per_image` across the labels (they sum to 1); SigLIP's a sigmoid of each
label's logit on its own. SigLIP's text tower pools its last position, padding included, and was trained on texts
padded to 64 tokens, so its texts are padded to the model's maximum length (the tokenizer's model_max_length, 64 for
every released checkpoint: transformers hardcodes 64); CLIP's pad to the longest label. Unlike transformers, a label
longer than the text tower's window is truncated (transformers fails inside the model), an empty label list or a
template without "{}" is a ValueError before any image is read, and a label list given as one string is split on
commas (as zero-shot-classification does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.base import Pipeline
from pipelines.images import load_image
from pipelines.tasks.zero_shot_classification import _check_template, _parse_labels

DEFAULT_TEMPLATE = "This is a photo of {}."


@dataclass(frozen=True)
class DualEncoder:
    """How a family's logits_per_image become scores, and how its texts are padded."""

    scores: str  # "softmax" across the labels, or "sigmoid" of each
    fixed_text_length: bool  # texts padded to the maximum length (the pooled output reads the last position)


# config.json model_type -> its rules
DUAL_ENCODERS = {"clip": DualEncoder("softmax", False), "siglip": DualEncoder("sigmoid", True)}

SINGLE_IMAGE = (str, bytes, bytearray, memoryview, Path, Image.Image, np.ndarray, torch.Tensor)


def dual_encoder(config: dict) -> DualEncoder:
    """The rules of the checkpoint's family; ValueError naming the supported model types."""
    model_type = config.get("model_type")
    if model_type not in DUAL_ENCODERS:
        raise ValueError(
            f"model_type {model_type!r} is not a dual image-text encoder; supported: {sorted(DUAL_ENCODERS)}"
        )
    return DUAL_ENCODERS[model_type]


def text_batch(tokenizer, texts: Sequence[str], max_length: int | None, fixed: bool) -> dict[str, torch.Tensor]:
    """Texts tokenized (truncated to `max_length`) and padded, on the tokenizer's side, to the longest of them or, when
    `fixed`, to `max_length`: {"input_ids", "attention_mask"} (N, T)."""
    rows = [tokenizer.encode(text, max_length=max_length).input_ids for text in texts]
    if fixed and max_length is None:
        raise ValueError("this model pads its texts to the maximum length, but the tokenizer sets none")
    length = max_length if fixed else max(len(r) for r in rows)
    pad, left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
    ids, mask = [], []
    for row in rows:
        fill = length - len(row)
        ids.append([pad] * fill + row if left else row + [pad] * fill)
        mask.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


class ZeroShotImageClassificationPipeline(Pipeline):
    """Per image, [{"score", "label"}, ...] sorted by score, best first (equal scores keep the labels' order).

    `candidate_labels`: a list of strings or one comma-separated string (per call, at construction, or as the
    second positional argument). `hypothesis_template`: a string with one "{}" for the label.
    """

    task = "zero-shot-image-classification"
    processor_kind = "image-text"
    budget_defaults = ("image_batch_size", "max_batch_tokens")  # DEVICE_DEFAULTS: images per micro-batch
    model_input_names = ("pixels",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rules = dual_encoder(self.config)

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, **unknown):
        if unknown:
            raise TypeError(
                f"zero-shot-image-classification got unknown parameters {sorted(unknown)}; "
                "allowed: candidate_labels, hypothesis_template"
            )
        pre, fwd, post = {}, {}, {}
        if candidate_labels is not None:
            labels = _parse_labels(candidate_labels)
            pre["candidate_labels"] = fwd["candidate_labels"] = post["candidate_labels"] = labels
        if hypothesis_template is not None:
            fwd["hypothesis_template"] = _check_template(hypothesis_template)
        return pre, fwd, post

    def __call__(self, inputs, *args, **kwargs):
        """`pipe(images, candidate_labels, ...)`: the labels may also come second, as in transformers."""
        if len(args) > 1 or (args and "candidate_labels" in kwargs):
            raise TypeError(f"unexpected positional arguments {args!r}: pass candidate_labels= once")
        if args:
            kwargs["candidate_labels"] = args[0]
        return super().__call__(inputs, **kwargs)

    def _is_single(self, inputs) -> bool:
        return isinstance(inputs, SINGLE_IMAGE)

    def preprocess(self, item, candidate_labels=None):
        if not candidate_labels:
            raise ValueError("no candidate labels: pass candidate_labels=[...] or a comma-separated string")
        return {"pixels": self.processor.image.prepare_image(load_image(item))}  # uint8 (3, H, W)

    def run_model(self, features, *, params: dict | None = None, **kwargs):
        """The labels' text features once, then every micro-batch of images scored against them."""
        params = self._defaults.forward if params is None else params
        if not features:
            return []
        if not params.get("candidate_labels"):
            raise ValueError("no candidate labels: pass candidate_labels=[...] or a comma-separated string")
        texts = [params.get("hypothesis_template", DEFAULT_TEMPLATE).format(x) for x in params["candidate_labels"]]
        text_features = self.text_features(texts)
        return super().run_model(features, params={"text_features": text_features}, **kwargs)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(L, P) projected text features of `texts` on the model's device, not normalized."""
        if self.model is None:
            raise RuntimeError(f"this {type(self).__name__} was built without weights: it can preprocess only")
        batch = text_batch(self.tokenizer, texts, self.max_length, self.rules.fixed_text_length)
        with torch.inference_mode():
            return self.model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()})

    def _forward(self, inputs, text_features):
        pixel_values = self.processor.image.normalize(inputs["pixels"]).to(text_features.dtype)  # (B, 3, H, W)
        image_features = self.model.get_image_features(pixel_values)  # (B, P)
        return {"logits": self.model.logits_per_image(image_features, text_features)}  # (B, L)

    def postprocess(self, outputs, candidate_labels=()):
        logits = outputs["logits"].float()  # (L,)
        scores = (logits.softmax(dim=-1) if self.rules.scores == "softmax" else logits.sigmoid()).tolist()
        ranked = sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]

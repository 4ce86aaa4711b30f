"""image-classification: the top labels and scores of an image classifier (ViT, DeiT, DINOv2), as transformers returns.

Preprocess (CPU) decodes any image form (pipelines.images.load_image) and prepares exact uint8 pixels with the
model folder's image processor; `_forward` (device) normalizes them and runs the model on the stacked micro-batch,
so only uint8 pixels travel from a CPU stage to the model (pipelines.processors.image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.base import Pipeline
from pipelines.images import load_image
from pipelines.loading import read_id2label

FUNCTIONS = ("softmax", "sigmoid", "none")
SINGLE_IMAGES = (str, bytes, bytearray, memoryview, Path, np.ndarray, torch.Tensor, Image.Image)


class ImagePipeline(Pipeline):
    """What the image tasks share: one image of any form per input, uint8 pixels as the features, normalized on the
    model's device. A numpy array or tensor is one image (not a list of rows); lists and iterables stream."""

    processor_kind = "image"
    model_input_names = ("pixels",)
    budget_defaults = ("image_batch_size", "max_batch_tokens")  # DEVICE_DEFAULTS: images per micro-batch

    def _is_single(self, inputs) -> bool:
        return isinstance(inputs, SINGLE_IMAGES)

    def preprocess(self, item):
        return {"pixels": self.processor.prepare_image(load_image(item))}  # uint8 (3, H, W)

    def pixel_values(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's float32 pixel_values (B, 3, H, W), rescaled and normalized where the batch is."""
        return self.processor.normalize(inputs["pixels"])


class ImageClassificationPipeline(ImagePipeline):
    """Per image, the `top_k` (default 5, at most the number of labels) best labels as [{"label", "score"}, ...],
    highest first. `function_to_apply` defaults as transformers: none for regression, sigmoid for multi-label or a
    single label, softmax otherwise."""

    task = "image-classification"

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, **unknown):
        if unknown:
            raise TypeError(
                f"image-classification got unknown parameters {sorted(unknown)}; allowed: top_k, function_to_apply"
            )
        post = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
            post["top_k"] = top_k
        if function_to_apply is not None:
            name = str(function_to_apply).lower()
            if name not in FUNCTIONS:
                raise ValueError(f"unknown function_to_apply {function_to_apply!r}; allowed: {FUNCTIONS}")
            post["function_to_apply"] = name
        return {}, {}, post

    def _forward(self, inputs):
        return {"logits": self.model(self.pixel_values(inputs))}  # (B, num_labels)

    def postprocess(self, outputs, function_to_apply=None, top_k=5):
        logits = outputs["logits"].float()
        function = function_to_apply or self._default_function()
        if function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        labels = self._labels()
        ranked = [{"label": labels[i], "score": s} for i, s in enumerate(scores.tolist())]
        ranked.sort(key=lambda d: d["score"], reverse=True)  # stable: ties keep the label order, as transformers
        return ranked[: min(top_k, len(labels))]

    def _default_function(self) -> str:
        problem = self.config.get("problem_type") or getattr(self._model_config(), "problem_type", None)
        if problem == "regression":
            return "none"
        if problem == "multi_label_classification" or len(self._labels()) == 1:
            return "sigmoid"
        return "softmax"

    def _labels(self) -> tuple[str, ...]:
        """Label names by class id: config.json's id2label, else the module's config."""
        if self.config:
            return read_id2label(self.config)
        return tuple(self._model_config().id2label)

    def _model_config(self):
        return getattr(self.model, "config", None)

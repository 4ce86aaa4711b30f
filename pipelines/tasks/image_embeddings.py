"""Embeddings in a dual encoder's shared space (CLIP, SigLIP), for retrieval: images through `image-embeddings`,
texts through `sentence-embeddings`.

    images = pipeline("image-embeddings", model="path/to/clip")      # one vector per image (any input form)
    texts = pipeline("sentence-embeddings", model="path/to/clip")    # one vector per text, the same space

Why two tasks and not one that takes both: a string is a text to `sentence-embeddings` and an image (a path, base64
or a data URI) to every image task, so one pipeline taking both would have to guess. Texts keep the task every text
embedding already uses (and that `/v1/embeddings` serves): for a CLIP or SigLIP folder, the registry serves
`sentence-embeddings` with `TextEmbeddingsPipeline` below (a variant of the task for these model types) in place of
the pooled hidden states of a text encoder. Images get their own task, `image-embeddings`, which is not
`image-feature-extraction` (the vision tower's hidden states, unprojected, as transformers' pipeline returns them).

The vectors are transformers' `get_text_features` / `get_image_features` (the projected pooled outputs), which is
what sentence-transformers' CLIP models return: L2-normalized only when the folder's modules.json lists a Normalize
module, or with `normalize=True` (then a dot product is the cosine similarity the models were trained on). SigLIP's
texts are padded to the model's maximum length, as in zero-shot image classification (its text tower pools the last
position).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from pipelines.base import Pipeline
from pipelines.images import load_image
from pipelines.processors.layout import Layout, Padded
from pipelines.tasks.sentence_embeddings import read_sentence_transformers_config
from pipelines.tasks.zero_shot_image_classification import SINGLE_IMAGE, dual_encoder, text_batch


class _SharedSpaceEmbeddings(Pipeline):
    """Per input, a list of floats (or a 1-D tensor with `return_tensors=True`); `normalize` overrides the folder."""

    def __init__(self, model, processor, *, model_path=None, normalize=None, **kwargs):
        super().__init__(model, processor, model_path=model_path, **kwargs)
        self.rules = dual_encoder(self.config)
        folder = Path(model_path) if model_path is not None else None
        self.normalize = read_sentence_transformers_config(folder)["normalize"] if normalize is None else normalize
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")

    def _sanitize_parameters(self, return_tensors=None, **unknown):
        if unknown:
            raise TypeError(
                f"{self.task} got unknown parameters {sorted(unknown)}; allowed: return_tensors "
                "(and, at construction, normalize)"
            )
        return {}, {}, {} if return_tensors is None else {"return_tensors": bool(return_tensors)}

    def _embedding(self, features):
        features = features.float()
        return {"embedding": F.normalize(features, dim=-1) if self.normalize else features}

    def postprocess(self, outputs, return_tensors=False):
        return outputs["embedding"] if return_tensors else outputs["embedding"].tolist()


class ImageEmbeddingsPipeline(_SharedSpaceEmbeddings):
    """image-embeddings: images decoded and resized in preprocess (uint8), normalized and embedded in the model step."""

    task = "image-embeddings"
    processor_kind = "image"
    budget_defaults = ("image_batch_size", "max_batch_tokens")  # DEVICE_DEFAULTS: images per micro-batch
    model_input_names = ("pixels",)

    def _is_single(self, inputs) -> bool:
        return isinstance(inputs, SINGLE_IMAGE)

    def preprocess(self, item):
        return {"pixels": self.processor.prepare_image(load_image(item))}  # uint8 (3, H, W)

    def _forward(self, inputs):
        weight = next(self.model.parameters())
        pixel_values = self.processor.normalize(inputs["pixels"]).to(weight.dtype)  # (B, 3, H, W)
        return self._embedding(self.model.get_image_features(pixel_values))  # (B, P)


class TextEmbeddingsPipeline(_SharedSpaceEmbeddings):
    """sentence-embeddings for CLIP and SigLIP folders: texts (stripped, truncated to the model's window) embedded."""

    task = "sentence-embeddings"
    model_input_names = ("input_ids", "attention_mask")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.rules.fixed_text_length:  # pre-padded in preprocess: the mask travels as a feature of its own
            self.layout = Layout(
                {"input_ids": Padded(self.tokenizer.pad_token_id), "attention_mask": Padded(0)},
                length="input_ids",
                padding_side=self.tokenizer.padding_side,
            )

    def preprocess(self, item):
        if not isinstance(item, str):
            raise TypeError(f"expected a string, got {type(item).__name__}")
        batch = text_batch(self.tokenizer, [item.strip()], self.max_length, self.rules.fixed_text_length)
        return {name: row[0].tolist() for name, row in batch.items()}

    def _forward(self, inputs):
        return self._embedding(self.model.get_text_features(inputs["input_ids"], inputs["attention_mask"]))

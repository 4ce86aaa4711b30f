"""image-feature-extraction: an image model's hidden states (or its pooled vector), as transformers returns them."""

from __future__ import annotations

from pipelines.tasks.image_classification import ImagePipeline


class ImageFeatureExtractionPipeline(ImagePipeline):
    """Per image, a nested list of shape (1, tokens, hidden) (the special tokens first), or with `pool=True` the
    model's pooled output (1, hidden): ViT's / DeiT's pooler (dense + tanh over [CLS]; a checkpoint without pooler
    weights cannot pool), DINOv2's layer-normed [CLS] state. `return_tensors=True` gives tensors of those shapes."""

    task = "image-feature-extraction"

    def _sanitize_parameters(self, pool=None, return_tensors=None, image_processor_kwargs=None, **unknown):
        if unknown:
            raise TypeError(
                f"image-feature-extraction got unknown parameters {sorted(unknown)}; allowed: pool, return_tensors"
            )
        if image_processor_kwargs:
            raise ValueError(
                f"image_processor_kwargs {sorted(image_processor_kwargs)} are not supported: the image processor "
                "follows the model folder's preprocessor_config.json"
            )
        post = {}
        if pool is not None:
            post["pool"] = bool(pool)
        if return_tensors is not None:
            post["return_tensors"] = bool(return_tensors)
        return {}, {}, post

    def _forward(self, inputs):
        out = self.model(self.pixel_values(inputs))
        features = {"hidden_states": out["last_hidden_state"]}  # (B, T, C)
        if "pooler_output" in out:
            features["pooler_output"] = out["pooler_output"]  # (B, C)
        return features

    def postprocess(self, outputs, pool=False, return_tensors=False):
        if pool and "pooler_output" not in outputs:
            raise ValueError(
                f"pool=True needs a pooled output, and this {type(self.model).__name__} has no pooler (its checkpoint "
                "holds no pooler weights); use pool=False for the hidden states"
            )
        features = (outputs["pooler_output"] if pool else outputs["hidden_states"])[None]  # (1, C) or (1, T, C)
        return features if return_tensors else features.float().tolist()

"""The processor of a dual-encoder model folder (CLIP, SigLIP): its tokenizer and its image processor side by side.

Items of the image-text tasks carry only their image (`pixels`, the image processor's uint8 half); the texts (the
candidate labels of zero-shot image classification) are few and shared by every image of a call, so the task
tokenizes them once per label set with `tokenizer` rather than once per item. The layout is therefore the image
processor's.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.processors.image import ImageProcessor
from pipelines.processors.layout import Layout
from pipelines.tokenization import Tokenizer


class ImageTextProcessor:
    """`tokenizer` (tokenizer.json, or SigLIP's spiece.model) and `image` (preprocessor_config.json) of one folder."""

    def __init__(self, tokenizer: Tokenizer, image: ImageProcessor):
        self.tokenizer = tokenizer
        self.image = image

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImageTextProcessor:
        folder = Path(folder)
        return cls(Tokenizer.from_pretrained(folder), ImageProcessor.from_pretrained(folder))

    @property
    def model_max_length(self) -> int | None:
        """The longest text the tokenizer allows (images have no limit of their own)."""
        return self.tokenizer.model_max_length

    def layout(self, input_names) -> Layout:
        return self.image.layout(input_names)

    def __repr__(self) -> str:
        return f"ImageTextProcessor({self.tokenizer!r}, {self.image!r})"

"""Processors: raw input -> features dicts, built from a model folder without weights.

A processor is what a pipeline's `preprocess` uses to turn an input into model features and what `postprocess`
uses to turn outputs back (a tokenizer's decode): no weights, cheap to build, picklable, so the CPU stages of a Ray
job and the Serve ingress build their own. Every processor gives

    Processor.from_pretrained(folder)        from the files of a Hugging Face model folder
    processor.model_max_length               the longest input the processor allows (None: no limit of its own)
    processor.layout(input_names)            how features of those names are batched: a `Layout`

and the rest is the modality's own (text: `Tokenizer.encode` / `decode`). A pipeline class names its processor
kind in `processor` ("text" by default); a new modality is a processor class registered here plus its task files.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipelines.processors.layout import Layout, Mask, Padded, Stacked

# processor kind -> class (each with `from_pretrained(folder)`), or "module:Class" imported on first use
PROCESSORS: dict[str, type | str] = {
    "text": "pipelines.tokenization:Tokenizer",
    "image": "pipelines.processors.image:ImageProcessor",  # preprocessor_config.json
    "image-text": "pipelines.processors.image_text:ImageTextProcessor",  # both, for CLIP / SigLIP
}

__all__ = ["PROCESSORS", "Layout", "Mask", "Padded", "Stacked", "load_processor", "register_processor"]


def load_processor(kind: str, folder: str | Path):
    """The `kind` processor of a model folder."""
    if kind not in PROCESSORS:
        raise ValueError(f"unknown processor kind {kind!r}; registered: {sorted(PROCESSORS)}")
    cls = PROCESSORS[kind]
    if isinstance(cls, str):
        module, name = cls.split(":")
        cls = PROCESSORS[kind] = getattr(importlib.import_module(module), name)
    return cls.from_pretrained(Path(folder))


def register_processor(kind: str, cls: type) -> None:
    """Add (or replace) a processor kind; `cls.from_pretrained(folder)` builds it."""
    if not callable(getattr(cls, "from_pretrained", None)):
        raise TypeError(f"a processor class needs a from_pretrained(folder) classmethod; {cls.__name__} has none")
    PROCESSORS[kind] = cls

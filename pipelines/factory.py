"""`pipeline()`: from a task and/or a model (Hub id, local folder, or module object) to a ready Pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from pipelines import registry
from pipelines.base import Pipeline
from pipelines.loading import load_model, read_config, resolve
from pipelines.processors import load_processor
from pipelines.runtime import RuntimeConfig

RUNTIME_OPTIONS = frozenset(f.name for f in dataclasses.fields(RuntimeConfig))


def split_runtime_options(options: dict) -> tuple[dict, dict]:
    """(the RuntimeConfig fields among `options`, the rest): how the plain keywords of pipeline() and run_pipeline()
    are told apart from task parameters."""
    runtime = {k: v for k, v in options.items() if k in RUNTIME_OPTIONS}
    return runtime, {k: v for k, v in options.items() if k not in RUNTIME_OPTIONS}


def pipeline(
    task: str | None = None,
    model=None,
    *,
    tokenizer=None,
    revision: str | None = None,
    gguf_file: str | None = None,
    runtime: RuntimeConfig | None = None,
    pipeline_class: type | None = None,
    load_weights: bool = True,
    config: dict | None = None,
    **options,
) -> Pipeline:
    """Build the pipeline for `task` (or the task `model`'s config.json implies) on `model` (or the task's default).

    model: a Hub id (through the huggingface_hub cache), a local folder, a GGUF file (or a folder or Hub id with
    `gguf_file=`, transformers' spelling), or an nn.Module with `tokenizer=` (and `config=`, the config.json dict,
    where the task needs labels). runtime: a RuntimeConfig (device, dtype,
    device_map, max_memory, offload_folder, quantization, allow_pickle, threads, batch_size, max_batch_tokens,
    kv_cache_tokens); those names given as plain keywords override its fields. load_weights=False builds a
    processor-only pipeline for CPU stages: preprocess and postprocess work, the model does not run.
    Every other keyword is a task parameter, a default for every call.
    """
    if task is None and model is None:
        raise ValueError("pass a task, a model, or both")
    given, task_params = split_runtime_options(options)
    runtime = (runtime or RuntimeConfig()).merged(**given)
    runtime.apply_threads()
    task = registry.canonical_task(task) if task is not None else None
    if model is None:
        model = registry.TASKS[task].default
        if model is None:
            raise ValueError(f"task {task!r} has no default model: pass model=")
    if isinstance(model, nn.Module):
        return _from_module(task, model, tokenizer, pipeline_class, config, runtime, task_params)
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a Hub id, a folder path or an nn.Module, got {type(model).__name__}")

    folder = resolve(model, revision, gguf_file)
    hf_config = read_config(folder)
    task = task or registry.infer_task(hf_config, (folder / "modules.json").is_file())
    spec = registry.TASKS[task]
    cls = pipeline_class or spec.resolve_class(hf_config.get("model_type"))
    runtime = runtime.resolve(hf_config)
    processor = (
        _processor(tokenizer, revision, cls) if tokenizer is not None else load_processor(cls.processor_kind, folder)
    )
    module, max_length = None, processor.model_max_length
    if spec.model_classes is not None:
        model_cls = registry.model_class(task, hf_config)
        max_length = _min(max_length, model_cls.config_class.from_hf(hf_config).max_input_length)
        if load_weights:
            module = load_model(folder, model_cls, runtime, hf_config)
    return cls(
        module, processor, config=hf_config, model_path=folder, runtime=runtime, max_length=max_length, **task_params
    )


def _from_module(task, model, tokenizer, pipeline_class, config, runtime: RuntimeConfig, task_params) -> Pipeline:
    if task is None:
        raise ValueError("a model given as a module object needs the task")
    if tokenizer is None:
        raise ValueError("a model given as a module object needs tokenizer= (a Tokenizer, a folder or a Hub id)")
    runtime = runtime.resolve(config)
    model = model.to(device=runtime.device, dtype=runtime.dtype).eval()
    cls = pipeline_class or registry.TASKS[task].resolve_class((config or {}).get("model_type"))
    processor = _processor(tokenizer, None, cls)
    limit = getattr(getattr(model, "config", None), "max_input_length", None)
    return cls(
        model,
        processor,
        config=config,
        runtime=runtime,
        max_length=_min(processor.model_max_length, limit),
        **task_params,
    )


def _processor(given, revision, cls):
    """`tokenizer=` as given: a processor object, or a folder / Hub id to load the pipeline's processor from."""
    if isinstance(given, (str, Path)):
        return load_processor(cls.processor_kind, resolve(given, revision))
    if hasattr(given, "layout") and hasattr(given, "model_max_length"):
        return given
    raise TypeError(f"tokenizer must be a Tokenizer (or processor), a folder or a Hub id, got {type(given).__name__}")


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)

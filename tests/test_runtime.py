"""The runtime config: chosen once, passed as `runtime=`, its fields as keyword sugar, kept apart from task
parameters, with per-device budget defaults from one table."""

import pickle

import pytest
import torch

from pipelines import RuntimeConfig, pipeline
from pipelines.factory import split_runtime_options
from pipelines.runtime import DEVICE_DEFAULTS


@pytest.fixture(scope="module")
def classifier(checkpoint):
    return checkpoint("bert", "sequence-classification")


def test_runtime_object_sets_how_the_model_runs(classifier):
    """runtime= casts the weights and sets the micro-batch limits; the answers equal the float32 run's labels."""
    runtime = RuntimeConfig(device="cpu", dtype="bfloat16", batch_size=3, max_batch_tokens=64)
    pipe = pipeline("text-classification", classifier, runtime=runtime)
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    assert (pipe.batch_size, pipe.max_batch_tokens) == (3, 64)
    assert pipe.runtime.device == torch.device("cpu") and pipe.runtime.dtype is torch.bfloat16
    fp32 = pipeline("text-classification", classifier)
    texts = ["a first text", "and a second, longer text than the first"]
    assert [r["label"] for r in pipe(texts)] == [r["label"] for r in fp32(texts)]


def test_plain_keywords_override_the_runtime_and_task_parameters_stay_apart(classifier):
    """dtype= / batch_size= as keywords win over runtime=; top_k is a task parameter, not a runtime field."""
    pipe = pipeline(
        "text-classification",
        classifier,
        runtime=RuntimeConfig(dtype="bfloat16", batch_size=3),
        dtype="float32",
        top_k=2,
    )
    assert pipe.runtime.dtype is torch.float32 and pipe.runtime.batch_size == 3
    assert pipe.call_parameters().postprocess["top_k"] == 2
    assert len(pipe("a text")[0]) == 2  # top_k set at construction: wrapped in a list, as transformers does
    runtime, task = split_runtime_options({"dtype": "fp16", "top_k": 2, "max_batch_tokens": 8, "stride": 4})
    assert runtime == {"dtype": "fp16", "max_batch_tokens": 8} and task == {"top_k": 2, "stride": 4}


def test_unset_budgets_come_from_the_device_table(classifier):
    """Without budgets a CPU pipeline takes the cpu row of DEVICE_DEFAULTS; text generation reads its own
    columns (sequences at once, prefill tokens) from the same row."""
    pipe = pipeline("text-classification", classifier)
    cpu = DEVICE_DEFAULTS["cpu"]
    assert (pipe.batch_size, pipe.max_batch_tokens) == (cpu.batch_size, cpu.max_batch_tokens) == (128, 2048)


def test_call_parameters_merge_defaults_with_a_call_and_validate(classifier):
    """Construction-time parameters are the defaults a call overrides; a bad value fails once, named."""
    pipe = pipeline("text-classification", classifier, top_k=2, function_to_apply="sigmoid")
    params = pipe.call_parameters(top_k=1)
    assert params.postprocess["top_k"] == 1 and params.postprocess["function_to_apply"] == "sigmoid"
    assert pipe.call_parameters().postprocess["top_k"] == 2
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        pipe.call_parameters(top_k=0)
    with pytest.raises(TypeError, match="unknown parameters \\['topk'\\]; allowed: top_k"):
        pipe.call_parameters(topk=1)


def test_form_is_checked_where_the_config_is_made():
    """A driver without a GPU can describe GPU actors; a misspelt option or value fails naming what is allowed."""
    assert RuntimeConfig(device="cuda:1").device == "cuda:1"  # not resolved here: no CUDA needed
    with pytest.raises(ValueError, match="invalid device 'tpu'; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"):
        RuntimeConfig(device="tpu")
    with pytest.raises(TypeError, match="unknown runtime option\\(s\\) \\['dtpye'\\]; allowed: \\['device'"):
        RuntimeConfig().merged(dtpye="float16")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        RuntimeConfig(batch_size=0)


def test_accelerator_choice_and_merging():
    """Services and jobs ask for the accelerator unless a device is set; device and device_map replace each other;
    the config pickles (it travels in a Ray stage spec)."""
    assert RuntimeConfig().on_accelerator().device == "auto"
    assert RuntimeConfig(device="cpu").on_accelerator().device == "cpu"
    assert RuntimeConfig(device_map="auto").on_accelerator().device is None
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert RuntimeConfig(device="auto").resolve().device == torch.device(expected)
    assert RuntimeConfig(device="cpu").merged(device_map="auto").device is None
    assert RuntimeConfig(device_map="auto").merged(device="cpu").device_map is None
    assert RuntimeConfig(dtype="auto").resolve({"torch_dtype": "float16"}).dtype is torch.float16
    runtime = RuntimeConfig(dtype="bf16", max_batch_tokens=512)
    assert pickle.loads(pickle.dumps(runtime)) == runtime

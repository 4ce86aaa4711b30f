"""How a pipeline runs, chosen once: device and placement, dtype, quantization, threads, and the batching budgets.

    runtime = RuntimeConfig(device="auto", dtype="bfloat16", max_batch_tokens=4096)
    pipe = pipeline("sentence-embeddings", runtime=runtime)        # the plain keywords (device=, dtype=, ...) are sugar
    run_pipeline(ds, "sentence-embeddings", runtime=runtime)       # carried by the Ray stages, the Serve replicas

A `RuntimeConfig` holds what the caller asked for, checked for form only (names, types, ranges), so the driver of a
Ray job can describe GPU actors without having a GPU itself; `resolve()` turns it into concrete values where the model
is loaded: the torch device (`"auto"`: CUDA when present, else CPU) and the torch dtype (`"auto"`: config.json's).
Budgets left unset come from `DEVICE_DEFAULTS`, the one table of per-device defaults, for the device the model is
on. Task parameters (`top_k`, `max_new_tokens`, ...) are not runtime options: they belong to the pipeline's calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
QUANTIZATIONS = (None, "int8", "int4")
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class DeviceDefaults:
    """The budgets that suit one kind of device, used where the caller sets none."""

    batch_size: int  # rows per micro-batch of an encoder pipeline
    image_batch_size: int  # images per micro-batch of an image pipeline (fixed-size inputs: no token budget binds)
    max_batch_tokens: int  # padded tokens (rows x longest) per micro-batch of an encoder pipeline
    max_sequences: int  # generation: sequences running at once in the engine
    prefill_tokens: int  # generation: prompt tokens prefilled per engine step
    request_batch_tokens: int  # Serve: tokens of concurrent requests gathered into one model call
    kv_cache_bytes: int  # generation: the engine's KV cache (keys and values), allocated once


# On 2 CPU cores (MiniLM, mixed lengths) 128 rows / 2,048 tokens per micro-batch ran about 2x faster than 32 rows
# without a budget (BENCHMARKS.md); accelerators want bigger batches. A Serve model call gathers more tokens than one
# micro-batch holds: the pipeline cuts it into length-sorted micro-batches, so requests of mixed lengths pad little.
# Images: ViT-base on 2 CPU cores, 128 images, micro-batches of 16 against 128: bf16 106 against 132 ms/image, fp32
# 234 against 236, peak RSS in fp32 0.86 against 1.55 GB (BENCHMARKS.md, issue 14).
DEVICE_DEFAULTS: dict[str, DeviceDefaults] = {
    "cpu": DeviceDefaults(
        batch_size=128,
        image_batch_size=16,
        max_batch_tokens=2048,
        max_sequences=64,
        prefill_tokens=2048,
        request_batch_tokens=4096,
        kv_cache_bytes=512 * 2**20,
    ),
    "cuda": DeviceDefaults(
        batch_size=128,
        image_batch_size=64,
        max_batch_tokens=16384,
        max_sequences=64,
        prefill_tokens=8192,
        request_batch_tokens=16384,
        kv_cache_bytes=8 * 2**30,
    ),
    "mps": DeviceDefaults(
        batch_size=128,
        image_batch_size=32,
        max_batch_tokens=8192,
        max_sequences=64,
        prefill_tokens=4096,
        request_batch_tokens=8192,
        kv_cache_bytes=2 * 2**30,
    ),
}


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model is materialised and batched, chosen once per pipeline; never read from inside model code.

    device: None (cpu), "auto" (cuda when present, else cpu), "cpu", "cuda", "cuda:N", "mps", an int (-1 = cpu,
    N = cuda:N) or a torch.device; device_map instead of device: "auto", "balanced", "balanced_low_0", "sequential"
    or a dict of module -> device, through accelerate (max_memory, offload_folder for "disk"). dtype: float32
    (None), float16, bfloat16 (and short forms), a torch dtype, or "auto" (config.json's). quantization: None,
    "int8" (per-channel weight-only linear layers) or "int4" (group-wise weight-only on GGUF Q4_1's 32-wide
    asymmetric grid, torch's packed int4 CPU matmul; `pipelines.quantization`); on the CPU both compute their
    matmuls in bfloat16, and a tied LM head stays the embedding table's weight. allow_pickle: read `pytorch_model.bin` with
    `torch.load(weights_only=True)` (refused otherwise). threads: torch threads of the process that loads the
    model. batch_size / max_batch_tokens: the micro-batch limits (for text generation: sequences running at once
    and prompt tokens prefilled per step); kv_cache_tokens: the generation engine's KV budget.
    """

    device: str | int | torch.device | None = None
    dtype: str | torch.dtype | None = None
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | None = None
    quantization: str | None = None
    allow_pickle: bool = False
    threads: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    kv_cache_tokens: int | None = None

    def __post_init__(self):
        if self.device is not None and self.device_map is not None:
            raise ValueError("pass either device or device_map, not both")
        if self.device is not None and self.device != "auto":
            _device_form(self.device)
        if self.dtype is not None and self.dtype != "auto":
            parse_dtype(self.dtype)
        if isinstance(self.device_map, str) and self.device_map not in DEVICE_MAPS:
            raise ValueError(
                f"unknown device_map {self.device_map!r}; allowed: {DEVICE_MAPS} or a dict of module -> device"
            )
        if self.device_map is not None and not isinstance(self.device_map, (str, dict)):
            raise TypeError(f"device_map must be a string or a dict, got {type(self.device_map).__name__}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; allowed: {QUANTIZATIONS}")
        for name in ("threads", "batch_size", "max_batch_tokens", "kv_cache_tokens"):
            value = getattr(self, name)
            if value is not None:
                positive_int(name, value)

    @classmethod
    def create(cls, **options) -> RuntimeConfig:
        """A config from keyword options (the same names as the fields); None means unset."""
        return cls(**{k: v for k, v in options.items() if v is not None})

    def merged(self, **options) -> RuntimeConfig:
        """A copy with the options given (not None) replacing these; `device` and `device_map` replace each other."""
        given = {k: v for k, v in options.items() if v is not None}
        if not given:
            return self
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown runtime option(s) {unknown}; allowed: {[f.name for f in dataclasses.fields(self)]}"
            )
        if "device" in given:
            given.setdefault("device_map", None)
        elif "device_map" in given:
            given["device"] = None
        return dataclasses.replace(self, **given)

    def on_accelerator(self) -> RuntimeConfig:
        """Where a service or a job loads the model: the accelerator when one is present (device "auto"), unless
        a device or device_map is set."""
        if self.device is not None or self.device_map is not None:
            return self
        return dataclasses.replace(self, device="auto")

    def resolve(self, config: dict | None = None) -> RuntimeConfig:
        """Concrete values on this machine: a torch.device (checked to exist), a torch.dtype ("auto": config.json's).
        Budgets left unset stay None: the pipeline takes them from DEVICE_DEFAULTS for its model's device."""
        device = None if self.device_map is not None else parse_device(self.device)
        return dataclasses.replace(self, device=device, dtype=parse_dtype(self.dtype, config))

    def apply_threads(self) -> None:
        """Set this process's torch threads where `threads` is given (an entry point's choice, process-wide)."""
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


def parse_dtype(dtype, config: dict | None = None) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (and short forms), a torch.dtype, 'auto' (config.json's), or None (float32)."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        stored = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32"
        return parse_dtype(stored)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: {sorted(DTYPES)}, 'auto', or the torch dtypes")


def accelerator_type() -> str:
    """The device type "auto" picks on this machine: "cuda" when a CUDA device is present, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_form(device) -> torch.device:
    """The device `device` names, checked for form only (not whether this machine has it)."""
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise TypeError(f"device must be a string, an int or a torch.device, got {type(device).__name__}")
    if isinstance(device, int):
        device = "cpu" if device < 0 else f"cuda:{device}"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or an int") from e
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device type {device.type!r}; allowed: {', '.join(DEVICE_TYPES)}")
    return device


def parse_device(device) -> torch.device:
    """None (cpu), 'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:N', 'mps', an int (-1 = cpu,
    N = cuda:N) or a torch.device; ValueError for a device this machine does not have."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device(accelerator_type())
    device = _device_form(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has no CUDA device; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value

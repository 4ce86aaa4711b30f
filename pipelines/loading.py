"""From a model name to a ready module: resolve -> config.json -> meta build -> stream weights -> place.

resolve      a local folder, or a Hub id through the huggingface_hub cache (HF_HOME, HF_HUB_CACHE and
             HF_HUB_OFFLINE are honoured by huggingface_hub itself; `revision` pins a branch, tag or commit),
             or a GGUF file (pipelines/gguf.py), which then stands for the folder: config, weights and tokenizer
build        the class's config dataclass from config.json, the module built on the meta device (no memory)
stream       safetensors files (single or sharded) read tensor by tensor, renamed by the class's `WeightsMapper`
             (the family file's tables), cast to `dtype`, checked strictly (missing, unexpected, wrong shape)
place        `device`, or `device_map` through accelerate (auto / balanced / dict, max_memory, disk offload),
             and optional int8 or int4 weight-only quantization of the linear layers
No remote code is ever run. Pickled `.bin` weights are refused unless `allow_pickle=True`, and then read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pipelines.gguf import SUFFIX, GGUFCheckpoint
from pipelines.quantization import quantize_int4, quantize_int8
from pipelines.runtime import RuntimeConfig

logger = logging.getLogger(__name__)

# What a model folder may need: weights are chosen after listing (safetensors preferred over pickles).
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*/config.json", "*/*.safetensors"]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the module it is loaded into (missing, unexpected or mis-shaped keys)."""


# -- resolution -----------------------------------------------------------------------------------------
def resolve(model: str | Path, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """A local model folder, the snapshot folder of Hub id `model` at `revision` (downloaded if online), or a
    GGUF file: `model` itself (a path ending in .gguf), `gguf_file` inside the folder or Hub repository `model`, or
    a Hub repository's only .gguf file when it has no config.json."""
    path = Path(model).expanduser()
    if gguf_file is None and path.suffix == SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(model)!r} does not exist")
        return path
    if path.is_dir():
        return path if gguf_file is None else _gguf_in(path, gguf_file, str(model))
    name = str(model)
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = HUB_PATTERNS + ([gguf_file] if gguf_file is not None else ["*.gguf"])
    try:
        folder = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"model {name!r} (revision {revision or 'main'}) is not in the Hugging Face cache and could not be "
            f"downloaded ({type(e).__name__}). On an offline machine, import a local copy first: "
            f"`python -m pipelines.hub import FOLDER {name}`"
        ) from e
    if gguf_file is not None:
        return _gguf_in(folder, gguf_file, name)
    files = sorted(folder.glob("*" + SUFFIX))
    if not (folder / "config.json").is_file() and len(files) == 1:
        return files[0]
    if not (folder / "config.json").is_file() and files:
        raise ValueError(
            f"{name} holds several GGUF files: choose one with gguf_file=; files: {[f.name for f in files]}"
        )
    return folder


def _gguf_in(folder: Path, gguf_file: str, name: str) -> Path:
    path = folder / gguf_file
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*" + SUFFIX))
        raise FileNotFoundError(f"{name} has no GGUF file {gguf_file!r}; its GGUF files: {present}")
    return path


def read_config(folder: Path) -> dict:
    """config.json of a model folder; for a GGUF file, the config its metadata describes."""
    if folder.suffix == SUFFIX and folder.is_file():
        return GGUFCheckpoint.open(folder).config()
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_id2label(config: dict) -> tuple[str, ...]:
    """config.json's `id2label` as a tuple indexed by class id; `num_labels` (default 2) LABEL_i names without one.

    Shared by the families' `from_hf`; ValueError when the ids are not exactly 0..n-1."""
    if config.get("id2label"):
        id2label = {int(i): label for i, label in config["id2label"].items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label keys must be 0..n-1, got {sorted(id2label)}")
        return tuple(id2label[i] for i in range(len(id2label)))
    return tuple(f"LABEL_{i}" for i in range(config.get("num_labels", 2)))


# -- weights ----------------------------------------------------------------------------------------------
def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint files of `folder`, safetensors first; pickles only with `allow_pickle`; a GGUF file is its own."""
    if folder.suffix == SUFFIX and folder.is_file():
        return [folder]
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index, file = folder / index_name, folder / single
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [folder / s for s in shards]
        elif file.is_file():
            files = [file]
        else:
            continue
        if single.endswith(".bin") and not allow_pickle:
            raise ValueError(
                f"{folder} holds only pickled weights ({files[0].name}); unpickling can run arbitrary code. "
                "Convert them to safetensors, or pass allow_pickle=True to read them with torch.load(weights_only=True)"
            )
        return files
    raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        if path.suffix == SUFFIX:
            yield from GGUFCheckpoint.open(path).tensors()
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


@dataclass(frozen=True)
class WeightsMapper:
    """How one class's checkpoint keys become its state_dict keys: tables from the family file, applied here.

    Every checkpoint key goes through these steps, in order (vLLM's weights mapper has the same shape):

    1. `keys` (a whole key) and `suffixes` (a key's ending) rename it, or drop it where the new name is None:
       TF-era names (`LayerNorm.gamma`), legacy buffers (`position_ids`), copies of tied weights;
    2. a key of a bare base-model checkpoint (it starts with one of `base_parts`) gets `prefix`, the name the
       base model has inside a head class (`bert.`), so both checkpoint kinds read alike from here on;
    3. a key under one of `head_parts` (the parts only some classes have) is dropped unless it is under one of the
       `owned` parts: a classifier checkpoint loads into the bare encoder, a pretraining checkpoint's pooler and
       next-sentence head are skipped by the masked-LM class;
    4. for the base model itself (`bare`), `prefix` is removed.

    The family file declares one mapper per family and narrows it per class with `for_base_model()` and
    `for_head(...)`. `convert(name, tensor)` is the family's tensor hook, called with our key for tensors stored in
    another layout (GPT-2's Conv1D weights are transposed). A class without a `weights_mapper` loads its keys as
    stored.
    """

    prefix: str = ""
    base_parts: tuple[str, ...] = ()
    keys: Mapping[str, str | None] = field(default_factory=dict)
    suffixes: Mapping[str, str | None] = field(default_factory=dict)
    head_parts: tuple[str, ...] = ()
    owned: tuple[str, ...] = ()
    bare: bool = False
    tensor_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.base_parts and not self.prefix.endswith("."):
            raise ValueError(f"WeightsMapper prefix must end with '.', got {self.prefix!r}")
        foreign = [part for part in self.owned if not _under(part, self.head_parts)]
        if foreign:
            raise ValueError(f"owned parts {foreign} are not among this family's head parts {list(self.head_parts)}")

    def for_base_model(self) -> WeightsMapper:
        """The mapper of the family's base model: every head dropped, the prefix removed."""
        return replace(self, owned=(), bare=True)

    def for_head(self, *parts: str) -> WeightsMapper:
        """The mapper of a head class that has `parts` (some of `head_parts`, or parts under them)."""
        return replace(self, owned=parts, bare=False)

    def rename(self, key: str) -> str | None:
        """A checkpoint key as the class's state_dict key; None for a key the class does not use."""
        if key in self.keys:
            key = self.keys[key]
            if key is None:
                return None
        for old, new in self.suffixes.items():
            if key.endswith(old):
                if new is None:
                    return None
                key = key[: -len(old)] + new
        if _under(key, self.base_parts):
            key = self.prefix + key
        if _under(key, self.head_parts) and not _under(key, self.owned):
            return None
        return key.removeprefix(self.prefix) if self.bare else key

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor in the layout of our key `name` (the family's tensor hook; as stored without one)."""
        return tensor if self.tensor_hook is None else self.tensor_hook(name, tensor)


def _under(key: str, parts: tuple[str, ...]) -> bool:
    """Whether `key` is one of `parts` or lies below one of them (a whole dotted component, never a substring)."""
    return any(key == part or key.startswith(part + ".") for part in parts)


def load_weights(model: nn.Module, files: list[Path], dtype: torch.dtype) -> None:
    """Stream checkpoint tensors into a meta-built `model`, renamed by its class's `weights_mapper`, strictly checked.

    Weights a checkpoint omits because they are tied (`tied_weights`: our key -> the key it copies) are filled in
    only when the config's `tie_word_embeddings` (default true) says so; otherwise they are missing, and reported.
    """
    cls = type(model)
    mapper: WeightsMapper = getattr(cls, "weights_mapper", None) or WeightsMapper()
    expected = dict(model.state_dict())
    loaded: dict[str, torch.Tensor] = {}
    dropped = []
    for key, tensor in iter_tensors(files):
        name = mapper.rename(key)
        if name is None:
            dropped.append(key)
            continue
        if name not in expected:
            raise CheckpointError(
                f"checkpoint key {key!r} (as {name!r}) has no place in {cls.__name__}; "
                f"its weights are: {_sample(expected)}"
            )
        tensor = mapper.convert(name, tensor)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"checkpoint key {key!r} has shape {tuple(tensor.shape)}, {cls.__name__}.{name} needs "
                f"{tuple(expected[name].shape)}; does config.json match the weights?"
            )
        loaded[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", True)
    for target, source in getattr(cls, "tied_weights", {}).items() if tied else ():
        if target not in loaded and source in loaded:
            loaded[target] = loaded[source]
    expected = _drop_absent_parts(model, expected, loaded)
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise CheckpointError(
            f"checkpoint in {files[0].parent} has no weight for {missing[0]!r} needed by {cls.__name__} "
            f"({len(missing)} missing in all: {_sample(missing)}); the checkpoint has: {_sample(loaded)}"
        )
    if dropped:
        logger.info(
            "%s: ignored %d checkpoint keys not used by this class: %s", cls.__name__, len(dropped), _sample(dropped)
        )
    model.load_state_dict(loaded, strict=True, assign=True)


def _drop_absent_parts(model: nn.Module, expected: dict, loaded: dict) -> dict:
    """The class's `optional_parts` (submodules some checkpoints lack, e.g. a ViTModel's pooler in a classifier
    checkpoint) of which the checkpoint has no weight at all are set to None on `model`; the expected keys without
    them. A part with only some of its weights present is left in place, to be reported as missing."""
    for part in getattr(type(model), "optional_parts", ()):
        keys = [k for k in expected if _under(k, (part,))]
        if keys and not any(k in loaded for k in keys):
            parent, _, name = part.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, None)
            logger.info("%s: the checkpoint has no %s weights; built without it", type(model).__name__, part)
            expected = {k: v for k, v in expected.items() if not _under(k, (part,))}
    return expected


def _sample(keys, n: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# -- the whole path -------------------------------------------------------------------------------------
def build_model(cls: type[nn.Module], config: dict) -> nn.Module:
    """`cls` from config.json on the meta device: no memory is used until weights are assigned."""
    model_config = cls.config_class.from_hf(config)
    with torch.device("meta"):
        return cls(model_config)


def load_model(folder: Path, cls: type[nn.Module], runtime: RuntimeConfig, config: dict | None = None) -> nn.Module:
    """`cls` built from `folder`'s config.json and weights, cast, quantized and placed as `runtime` says."""
    config = read_config(folder) if config is None else config
    runtime = runtime.resolve(config)
    model = build_model(cls, config)
    load_weights(model, weight_files(folder, runtime.allow_pickle), runtime.dtype)
    model.eval()
    if runtime.quantization == "int8":
        quantize_int8(model)
    elif runtime.quantization == "int4":
        quantize_int4(model)
    if runtime.device_map is not None:
        return dispatch(model, runtime)
    return model.to(runtime.device)


def dispatch(model: nn.Module, runtime: RuntimeConfig) -> nn.Module:
    """Place `model` by `runtime.device_map` through accelerate; 'disk' entries need `offload_folder`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    device_map = runtime.device_map
    if isinstance(device_map, str):
        # Transformer blocks (the members of ModuleLists) are never split across devices.
        no_split = sorted({type(m).__name__ for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml})
        max_memory = runtime.max_memory
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model,
                max_memory=max_memory,
                no_split_module_classes=no_split,
                dtype=runtime.dtype,
                low_zero=device_map == "balanced_low_0",
            )
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=runtime.dtype
        )
    if "disk" in device_map.values() and runtime.offload_folder is None:
        raise ValueError("device_map offloads to 'disk': pass offload_folder=PATH for the offloaded weights")
    model = dispatch_model(model, device_map=device_map, offload_dir=runtime.offload_folder)
    model.hf_device_map = device_map
    return model


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its first weights (the embeddings), cpu for offloaded ones."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        return torch.device("cpu" if first in ("cpu", "disk") else first if isinstance(first, str) else f"cuda:{first}")
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

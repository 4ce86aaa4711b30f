"""The Pipeline contract: `_sanitize_parameters`, `preprocess`, `_forward`, `postprocess`, and iteration.

    raw input --preprocess (CPU)--> features --run_model (device, micro-batched)--> outputs --postprocess (CPU)--> answer

Device work happens only in `_forward`; preprocess and postprocess are plain Python on CPU, so the Ray
layer runs them as separate CPU stages around the model, through the same three public steps used
here: `preprocess_item`, `run_model`, `postprocess_item`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from pipelines.batching import ItemOutOfMemoryError, MicroBatcher
from pipelines.loading import input_device
from pipelines.runtime import DEVICE_DEFAULTS, RuntimeConfig, positive_int
from pipelines.tokenization import Tokenizer

Features = dict[str, Any]


class Parameters(NamedTuple):
    """A call's parameters, split by the step that takes them (the result of `_sanitize_parameters`)."""

    preprocess: dict
    forward: dict
    postprocess: dict


class Pipeline(nn.Module):
    """One call from raw input to a JSON-able answer. Subclasses implement the four seed methods.

    Parameters may be given at construction (defaults for every call) or per call (override those);
    `call_parameters` is the one place they are merged and checked. Input: one item, a list (returns a list)
    or any other iterable (returns an iterator that streams in windows of `window_batches * batch_size`
    items, so memory stays constant).
    """

    task = ""
    processor_kind = "text"  # the processor kind (pipelines/processors) that preprocess and postprocess use
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    token_outputs: tuple[str, ...] = ()  # outputs with one row per position, cut back to each item's length
    window_batches = 32  # inputs are length-sorted within windows of window_batches * batch_size
    # The DEVICE_DEFAULTS fields (pipelines/runtime.py) that fill batch_size and max_batch_tokens when the
    # runtime leaves them unset.
    budget_defaults = ("batch_size", "max_batch_tokens")

    def __init__(
        self,
        model: nn.Module | None,
        processor,
        *,
        config: dict | None = None,
        model_path=None,
        runtime: RuntimeConfig | None = None,
        max_length: int | None = None,
        **params,
    ):
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = processor if isinstance(processor, Tokenizer) else getattr(processor, "tokenizer", None)
        self.config = dict(config or {})
        self.model_path = model_path
        self.runtime = runtime if runtime is not None else RuntimeConfig()
        self.layout = processor.layout(self.model_input_names)
        self.max_length = max_length or processor.model_max_length
        self._defaults = Parameters(*self._sanitize_parameters(**params))

    @property
    def batch_size(self) -> int:
        """Items per micro-batch: the runtime's, else the default for the model's device."""
        return self.runtime.batch_size or getattr(DEVICE_DEFAULTS[self.device.type], self.budget_defaults[0])

    @property
    def max_batch_tokens(self) -> int:
        """Padded tokens per micro-batch: the runtime's, else the default for the model's device."""
        return self.runtime.max_batch_tokens or getattr(DEVICE_DEFAULTS[self.device.type], self.budget_defaults[1])

    def call_parameters(self, **params) -> Parameters:
        """The (preprocess, forward, postprocess) parameters of a call: the construction-time defaults overlaid
        with `params`, which are checked (unknown names and bad values raise). No params: the defaults."""
        if not params:
            return self._defaults
        call = self._sanitize_parameters(**params)
        return Parameters(*({**base, **given} for base, given in zip(self._defaults, call)))

    # -- the seed contract ----------------------------------------------------------------------------
    def _sanitize_parameters(self, **params) -> tuple[dict, dict, dict]:
        """Split user parameters into (preprocess, forward, postprocess) keyword dicts; reject unknown ones."""
        if params:
            raise TypeError(f"{type(self).__name__} got unknown parameters {sorted(params)}")
        return {}, {}, {}

    def preprocess(self, item, **params) -> Features:
        raise NotImplementedError

    def _forward(self, inputs: dict[str, torch.Tensor], **params) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def postprocess(self, outputs: Features, **params) -> Any:
        raise NotImplementedError

    # -- tensors ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.model is None else input_device(self.model)

    def forward(self, inputs: dict[str, torch.Tensor], **params) -> dict[str, torch.Tensor]:
        """One padded micro-batch through the model: inputs moved to the model's device, no autograd."""
        if self.model is None:
            raise RuntimeError(
                f"this {type(self).__name__} was built without weights: it can preprocess and postprocess only"
            )
        device = self.device
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        with torch.inference_mode():
            return self._forward(inputs, **params)

    # -- the three steps, public for the Ray stages -------------------------------------------------------
    def preprocess_item(self, item, index: int, params: dict | None = None) -> list[Features]:
        """Features for one input, as a list of forward passes (one here; several in a ChunkPipeline).
        A bad input raises TypeError / ValueError naming its index."""
        params = self._defaults.preprocess if params is None else params
        try:
            return self._parts(item, params)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):
                raise
            raise type(e)(f"input #{index}: {e}") from e

    def _parts(self, item, params: dict) -> list[Features]:
        return [self.preprocess(item, **params)]

    def run_model(
        self,
        features: Sequence[Features],
        *,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        params: dict | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Model outputs for each features dict, in order, on CPU: length-sorted token-budget micro-batches."""
        params = self._defaults.forward if params is None else params

        def forward(batch):
            return {k: v.detach().cpu() for k, v in self.forward(batch, **params).items()}

        batcher = MicroBatcher(
            forward,
            layout=self.layout,
            token_outputs=self.token_outputs,
            batch_size=batch_size or self.batch_size,
            max_batch_tokens=max_batch_tokens or self.max_batch_tokens,
        )
        return batcher.run(features)

    def feature_length(self, features: Features) -> int:
        """The length an item's features count for in token budgets (tokens, frames; 1 without a length)."""
        return self.layout.item_length(features)

    def postprocess_item(self, parts: list[Features], params: dict | None = None) -> Any:
        """The answer for one input from its features merged with their model outputs."""
        return self.postprocess(parts[0], **(self._defaults.postprocess if params is None else params))

    def encode_text(self, text, pair=None, **kwargs):
        """Tokenize a text (or pair) truncated to the pipeline's maximum length; TypeError for non-strings."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        if pair is not None and not isinstance(pair, str):
            raise TypeError(f"expected a string as text_pair, got {type(pair).__name__}")
        kwargs.setdefault("max_length", self.max_length)
        encoding = self.tokenizer.encode(text, pair, **kwargs)
        if not isinstance(encoding, list) and self.max_length is not None and len(encoding) > self.max_length:
            raise ValueError(
                f"the input has {len(encoding)} tokens, more than the model's maximum of "
                f"{self.max_length}; leave truncation on to cut it"
            )
        return encoding

    # -- calling ---------------------------------------------------------------------------------------------
    def __call__(
        self,
        inputs,
        *,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        progress: bool = False,
        **params,
    ):
        batch_size = positive_int("batch_size", self.batch_size if batch_size is None else batch_size)
        run = dict(
            params=self.call_parameters(**params),
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            progress=progress,
        )
        if self._is_single(inputs):
            return next(self._stream([inputs], **run))
        if isinstance(inputs, (list, tuple)):
            return list(self._stream(inputs, **run))
        if isinstance(inputs, Iterable):
            return self._stream(inputs, **run)
        return next(self._stream([inputs], **run))

    def _is_single(self, inputs) -> bool:
        return isinstance(inputs, (str, bytes, dict))

    def _stream(self, items: Iterable, *, params, batch_size, max_batch_tokens, progress) -> Iterator:
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc=self.task or type(self).__name__, unit="input")
        iterator, start = iter(items), 0
        while block := list(itertools.islice(iterator, self.window_batches * batch_size)):
            yield from self._run_block(block, start, params, batch_size, max_batch_tokens)
            start += len(block)

    def _run_block(self, block: list, start: int, params, batch_size, max_batch_tokens) -> Iterator:
        pre, fwd, post = params
        features, owners = [], []
        for offset, item in enumerate(block):
            parts = self.preprocess_item(item, start + offset, pre)
            features.extend(parts)
            owners.extend([offset] * len(parts))
        try:
            outputs = self.run_model(features, batch_size=batch_size, max_batch_tokens=max_batch_tokens, params=fwd)
        except ItemOutOfMemoryError as e:
            raise ItemOutOfMemoryError(start + owners[e.item], e.length) from e
        grouped: list[list[Features]] = [[] for _ in block]
        for owner, feature, output in zip(owners, features, outputs):
            grouped[owner].append({**feature, **output})
        for parts in grouped:
            yield self.postprocess_item(parts, post)


class ChunkPipeline(Pipeline):
    """A pipeline whose `preprocess` yields several features dicts per input (one per forward pass).

    All chunks of a window of inputs are micro-batched together, length-sorted across inputs, then
    regrouped: `postprocess` receives the list of one input's chunks, each merged with its outputs.
    """

    def _parts(self, item, params: dict) -> list[Features]:
        return list(self.preprocess(item, **params))

    def postprocess_item(self, parts: list[Features], params: dict | None = None) -> Any:
        return self.postprocess(parts, **(self._defaults.postprocess if params is None else params))

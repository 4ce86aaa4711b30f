"""The Pipeline contract: `_sanitize_parameters`, `preprocess`, `_forward`, `postprocess`, and iteration.

    raw input --preprocess (CPU)--> features --run_model (device, micro-batched)--> outputs --postprocess (CPU)--> answer

Device work happens only in `_forward`; preprocess and postprocess are plain Python on CPU, so the Ray
layer runs them as separate CPU stages around the model, through the same three public steps used
here: `preprocess_item`, `run_model`, `postprocess_item`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pipelines.batching import ItemOutOfMemoryError, MicroBatcher
from pipelines.loading import input_device

Features = dict[str, Any]


class Pipeline(nn.Module):
    """One call from raw input to a JSON-able answer. Subclasses implement the four seed methods.

    Parameters may be given at construction (defaults for every call) or per call (override those).
    Input: one item, a list (returns a list) or any other iterable (returns an iterator that streams
    in windows of `window_batches * batch_size` items, so memory stays constant).
    """

    task = ""
    output_name = "output"  # the result column when the pipeline runs as a Ray Data job
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    token_outputs: tuple[str, ...] = ()  # outputs with one row per token, cut back to each item's length
    window_batches = 32  # inputs are length-sorted within windows of window_batches * batch_size
    # Defaults of the micro-batch limits. A token budget keeps long inputs from padding a whole batch
    # to their length; on 2 CPU cores (MiniLM, mixed lengths) 128 rows / 2,048 tokens ran about 2x
    # faster than 32 rows without a budget (see BENCHMARKS.md); accelerators want bigger batches.
    default_batch_size = 128
    default_max_batch_tokens = {"cpu": 2048, "cuda": 16384, "mps": 8192}
    default_rows_per_batch = 4096  # rows per model call in a Ray job
    concurrent_batches = 1  # model calls one Ray actor runs at once

    def __init__(self, model: nn.Module | None, tokenizer, *, config: dict | None = None, model_path=None,
                 batch_size: int | None = None, max_batch_tokens: int | None = None,
                 max_length: int | None = None, **params):  # fmt: skip
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.model_path = model_path
        self.batch_size = _positive("batch_size", self.default_batch_size if batch_size is None else batch_size)
        self.max_batch_tokens = None if max_batch_tokens is None else _positive("max_batch_tokens", max_batch_tokens)
        self.max_length = max_length or tokenizer.model_max_length
        self._params = self._sanitize_parameters(**params)

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
            raise RuntimeError(f"this {type(self).__name__} was built without weights: it can preprocess and postprocess only")
        device = self.device
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        with torch.inference_mode():
            return self._forward(inputs, **params)

    # -- the three steps, public for the Ray stages -------------------------------------------------------
    def preprocess_item(self, item, index: int, params: dict | None = None) -> list[Features]:
        """Features for one input, as a list of forward passes (one here; several in a ChunkPipeline).
        A bad input raises TypeError / ValueError naming its index."""
        params = self._params[0] if params is None else params
        try:
            return self._parts(item, params)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError):
                raise
            raise type(e)(f"input #{index}: {e}") from e

    def _parts(self, item, params: dict) -> list[Features]:
        return [self.preprocess(item, **params)]

    def run_model(self, features: Sequence[Features], *, batch_size: int | None = None,
                  max_batch_tokens: int | None = None, params: dict | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """Model outputs for each features dict, in order, on CPU: length-sorted token-budget micro-batches."""
        params = self._params[1] if params is None else params

        def forward(batch):
            return {k: v.detach().cpu() for k, v in self.forward(batch, **params).items()}

        batcher = MicroBatcher(
            forward,
            input_names=self.model_input_names,
            pad_id=self.tokenizer.pad_token_id,
            padding_side=self.tokenizer.padding_side,
            token_outputs=self.token_outputs,
            batch_size=batch_size or self.batch_size,
            max_batch_tokens=max_batch_tokens or self.max_batch_tokens or self.default_max_batch_tokens.get(self.device.type),
        )
        return batcher.run(features)

    def postprocess_item(self, parts: list[Features], params: dict | None = None) -> Any:
        """The answer for one input from its features merged with their model outputs."""
        return self.postprocess(parts[0], **(self._params[2] if params is None else params))

    def arrow_type(self, params: dict | None = None):
        """The Arrow type of one answer where values cannot show it (an empty list of entities); None: inferred."""
        return None

    def encode_text(self, text, pair=None, **kwargs):
        """Tokenize a text (or pair) truncated to the pipeline's maximum length; TypeError for non-strings."""
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        if pair is not None and not isinstance(pair, str):
            raise TypeError(f"expected a string as text_pair, got {type(pair).__name__}")
        kwargs.setdefault("max_length", self.max_length)
        encoding = self.tokenizer.encode(text, pair, **kwargs)
        if not isinstance(encoding, list) and self.max_length is not None and len(encoding) > self.max_length:
            raise ValueError(f"the input has {len(encoding)} tokens, more than the model's maximum of "
                             f"{self.max_length}; leave truncation on to cut it")  # fmt: skip
        return encoding

    # -- calling ---------------------------------------------------------------------------------------------
    def __call__(self, inputs, *, batch_size: int | None = None, max_batch_tokens: int | None = None,
                 progress: bool = False, **params):  # fmt: skip
        pre, fwd, post = self._params
        if params:
            call_pre, call_fwd, call_post = self._sanitize_parameters(**params)
            pre, fwd, post = {**pre, **call_pre}, {**fwd, **call_fwd}, {**post, **call_post}
        batch_size = _positive("batch_size", self.batch_size if batch_size is None else batch_size)
        run = dict(params=(pre, fwd, post), batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=progress)
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
        return self.postprocess(parts, **(self._params[2] if params is None else params))


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value

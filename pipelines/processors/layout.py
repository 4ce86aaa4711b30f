"""How a features dict batches: each model input's padding rule, and which feature gives an item its length.

    layout = Layout({"input_ids": Padded(pad_id), "token_type_ids": Padded(0), "attention_mask": Mask("input_ids")},
                    length="input_ids")                       # text: pad to the longest, mask the padding
    layout = Layout({"pixel_values": Stacked()})              # images: every item the same shape, nothing to pad
    layout.collate([features, ...])                           # {name: tensor (B, ...)}

The micro-batcher knows nothing of modalities: it sorts items by `layout.item_length`, budgets rows x longest
length, and collates with the layout. Values may be lists (of ints or floats) or tensors / arrays whose first axis is
the padded one (audio frames x mel bins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class Padded:
    """Varies in length along its first axis: padded with `value` to the longest item of the micro-batch."""

    value: int | float = 0
    dtype: torch.dtype = torch.long


@dataclass(frozen=True)
class Stacked:
    """The same shape for every item (pixel values, fixed windows of audio): stacked, never padded."""

    dtype: torch.dtype | None = None  # None: as the values are (tensors), float32 for lists


@dataclass(frozen=True)
class Mask:
    """1 over the real positions of feature `of`, 0 over its padding: made by the batcher, not by the processor."""

    of: str


Rule = Padded | Stacked | Mask


@dataclass(frozen=True)
class Layout:
    """The batching rules of a pipeline's model inputs. `length`: the feature whose first-axis size is an item's
    length (tokens, frames), used to sort and to budget; None: items have no length (each counts as 1)."""

    fields: Mapping[str, Rule]
    length: str | None = None
    padding_side: str = "right"
    _names: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self):
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}")
        if self.length is not None and not isinstance(self.fields.get(self.length), Padded):
            raise ValueError(f"the length feature {self.length!r} must be a Padded field of the layout")
        object.__setattr__(self, "_names", tuple(self.fields))

    def item_length(self, features: Mapping) -> int:
        return 1 if self.length is None else len(features[self.length])

    def collate(self, items: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """The micro-batch: each field of the first item, padded or stacked as its rule says; fields the items do
        not have are left out (a tokenizer without token types)."""
        batch: dict[str, torch.Tensor] = {}
        for name in self._names:
            rule = self.fields[name]
            if isinstance(rule, Mask):
                longest = max(len(f[rule.of]) for f in items)
                rows = [_pad_list([1] * len(f[rule.of]), longest, 0, self.padding_side) for f in items]
                batch[name] = torch.tensor(rows, dtype=torch.long)
            elif name in items[0]:
                values = [f[name] for f in items]
                batch[name] = (
                    _padded(values, rule, self.padding_side) if isinstance(rule, Padded) else _stacked(values, rule)
                )
        return batch

    def padded_length(self, batch: Mapping[str, torch.Tensor]) -> int | None:
        """The padded length of a collated micro-batch (None without a length feature)."""
        return None if self.length is None else batch[self.length].shape[1]

    def cut(self, value: torch.Tensor, length: int, padded: int) -> torch.Tensor:
        """One row of a per-position output, cut back to the item's own `length` of the micro-batch's `padded`."""
        return value[:length] if self.padding_side == "right" else value[padded - length :]


def _padded(values: list, rule: Padded, side: str) -> torch.Tensor:
    longest = max(len(v) for v in values)
    if all(isinstance(v, list) for v in values):  # token ids: the common case, kept in plain Python
        return torch.tensor([_pad_list(v, longest, rule.value, side) for v in values], dtype=rule.dtype)
    tensors = [torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v) for v in values]
    out = tensors[0].new_full((len(tensors), longest, *tensors[0].shape[1:]), rule.value, dtype=rule.dtype)
    for row, t in enumerate(tensors):
        if side == "right":
            out[row, : len(t)] = t
        else:
            out[row, longest - len(t) :] = t
    return out


def _stacked(values: list, rule: Stacked) -> torch.Tensor:
    tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in values]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stacked features must all have one shape; got {sorted(shapes)}")
    out = torch.stack(tensors)
    dtype = rule.dtype or (
        torch.float32 if not isinstance(values[0], torch.Tensor) and out.is_floating_point() else None
    )
    return out if dtype is None else out.to(dtype)


def _pad_list(values: list, length: int, pad, side: str) -> list:
    fill = [pad] * (length - len(values))
    return list(values) + fill if side == "right" else fill + list(values)

"""fill-mask: the most likely tokens for each mask token of a text, as transformers' FillMaskPipeline."""

from __future__ import annotations

import logging
from functools import cached_property

import torch

from pipelines.base import Pipeline

logger = logging.getLogger(__name__)


class FillMaskPipeline(Pipeline):
    """Per input with one mask token, a list of `top_k` (default 5) dicts {"score", "token", "token_str",
    "sequence"}, best first; with several mask tokens, one such list per mask, in text order. Scores are
    the softmax over the vocabulary at each mask on its own (not a joint probability).

    `sequence` is the input with the prediction put in, decoded without special tokens (padding
    removed); with several masks the other masks stay visible, so special tokens are kept, as in
    transformers. `token_str` is the predicted token decoded on its own.

    `targets` (a string or a list) limits the scores to those tokens, as transformers does: a target
    that is a vocabulary entry (added tokens included) is used as is; any other is tokenized without
    special tokens and its FIRST token used instead, with a warning (so "Hello" may become "hello",
    "xyzzy" "x", and a word missing from a WordPiece vocabulary the unknown token); a target that
    tokenizes to nothing ("" or spaces) is dropped with a warning; duplicates count once; no target
    left is a ValueError. `top_k` is capped at the number of targets.

    Deviations from transformers: inputs longer than the model's window are truncated by default
    (`tokenizer_kwargs={"truncation": False}` turns that off: a too long input is then a ValueError); a
    mask cut off by truncation is a ValueError saying so; `top_k` above the vocabulary size is capped
    instead of failing; a one-element list returns a one-element list (transformers unwraps it).
    """

    task = "fill-mask"

    def _sanitize_parameters(self, top_k=None, targets=None, tokenizer_kwargs=None, **unknown):
        if unknown:
            raise TypeError(
                f"fill-mask got unknown parameters {sorted(unknown)}; allowed: top_k, targets, tokenizer_kwargs"
            )
        if self.tokenizer.token_id("mask_token") is None:
            raise ValueError(
                "fill-mask needs a tokenizer with a mask token; this one defines none "
                f"(special tokens: {self.tokenizer.special_tokens})"
            )
        pre = dict(tokenizer_kwargs or {})
        if set(pre) - {"truncation", "max_length"}:
            raise TypeError(f"tokenizer_kwargs supports truncation and max_length, got {sorted(pre)}")
        fwd = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
            fwd["top_k"] = top_k
        if targets is not None:
            fwd["target_ids"] = self.target_ids(targets)
        return pre, fwd, {}

    def target_ids(self, targets) -> tuple[int, ...]:
        """Token ids for `targets`, resolved as the class docstring says."""
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise TypeError(f"targets must be a string or a list of strings, got {targets!r}")
        ids = []
        for target in targets:
            id_ = self._vocab.get(target)
            if id_ is None:
                pieces = self.tokenizer.encode(target, add_special_tokens=False).input_ids
                if not pieces:
                    logger.warning(
                        "target %r does not exist in the model vocabulary and tokenizes to nothing; ignoring it", target
                    )
                    continue
                id_ = pieces[0]
                logger.warning(
                    "target %r does not exist in the model vocabulary; replacing it with %r",
                    target,
                    self.tokenizer.convert_ids_to_tokens([id_])[0],
                )
            ids.append(id_)
        if not ids:
            raise ValueError(f"no usable target among {list(targets)!r}: give at least one token of the vocabulary")
        return tuple(dict.fromkeys(ids))

    @cached_property
    def _vocab(self) -> dict[str, int]:
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(self.tokenizer.vocab_size)))
        return {token: i for i, token in enumerate(tokens) if token is not None}

    def preprocess(self, item, truncation=True, max_length=None):
        limit = max_length or self.max_length if truncation else None
        encoding = self.encode_text(item, max_length=limit)
        mask_token = self.tokenizer.special_tokens["mask_token"]
        if self.tokenizer.token_id("mask_token") not in encoding.input_ids:
            if mask_token in item:
                raise ValueError(f"the mask token {mask_token!r} was cut off by truncation to {limit} tokens")
            raise ValueError(f"no mask token {mask_token!r} in input {item[:80]!r}")
        return encoding.model_inputs()

    def _forward(self, inputs, top_k=5, target_ids=None):
        logits = self.model(**inputs)  # (B, T, V)
        is_mask = inputs["input_ids"] == self.tokenizer.token_id("mask_token")  # (B, T)
        most = int(is_mask.sum(dim=1).max())
        # positions of each row's masks first, in text order (a stable sort puts False = mask first)
        positions = torch.sort((~is_mask).to(torch.int8), dim=1, stable=True).indices[:, :most]  # (B, M)
        index = positions[..., None].expand(-1, -1, logits.shape[-1])
        probs = logits.gather(1, index).float().softmax(dim=-1)  # (B, M, V); rows past a row's masks unused
        if target_ids is not None:
            targets = torch.tensor(target_ids, device=probs.device)
            probs = probs[..., targets]
        scores, ids = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (B, M, k)
        if target_ids is not None:
            ids = targets[ids]
        return {"scores": scores, "token_ids": ids}

    def postprocess(self, outputs):
        input_ids = list(outputs["input_ids"])
        mask_id, pad_id = self.tokenizer.token_id("mask_token"), self.tokenizer.token_id("pad_token")
        positions = [i for i, t in enumerate(input_ids) if t == mask_id]
        single = len(positions) == 1
        rows = []
        for m, position in enumerate(positions):
            row = []
            for score, token in zip(outputs["scores"][m].tolist(), outputs["token_ids"][m].tolist()):
                filled = input_ids[:position] + [token] + input_ids[position + 1 :]
                filled = [t for t in filled if t != pad_id]
                row.append(
                    {
                        "score": score,
                        "token": token,
                        "token_str": self.tokenizer.decode([token], skip_special_tokens=False),
                        "sequence": self.tokenizer.decode(filled, skip_special_tokens=single),
                    }
                )
            rows.append(row)
        return rows[0] if single else rows

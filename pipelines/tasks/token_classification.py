"""token-classification (alias ner): a label per token, or entities grouped by word and tag."""

from __future__ import annotations

import functools
import warnings

import torch

from pipelines.base import ChunkPipeline

AGGREGATIONS = ("none", "simple", "first", "average", "max")
WORD_AGGREGATIONS = ("first", "average", "max")


class TokenClassificationPipeline(ChunkPipeline):
    """Outputs as transformers. `aggregation_strategy="none"` (default): one dict per token whose label
    is not ignored, with `entity`, `score`, `index` (position in the encoded input, special tokens
    counted), `word` (the token), `start`, `end` (offsets into the text). Otherwise entities: `entity_group`,
    `score` (mean over the group), `word` (the group's tokens through the decoder), `start`, `end`.

    - "simple" joins adjacent tokens of the same tag (B-X starts a new group, I-X or X continues one).
    - "first" / "average" / "max" first give every word one label: that of its first token, of the mean
      of its tokens' scores, or of its most confident token. Words are found as transformers does: with
      a `##`-style tokenizer (WordPiece) a token is a continuation when its text is longer or shorter than
      the token; otherwise (byte-level BPE, Unigram) when no space precedes it, with a warning.
    - `ignore_labels` (default ["O"]) drops tokens or groups with those labels.
    - `stride`: the text is cut into windows of the model's length overlapping by `stride` tokens, all
      are labelled, and entities found in several windows are de-duplicated (the longer one wins, then the
      more confident). Without `stride`, text beyond the model's window is truncated away, as in
      transformers. As in transformers, `stride` with `aggregation_strategy="none"` in the same call
      is an error, while `stride` alone keeps per-token output.

    Deviations from transformers: scores are Python floats, not numpy float32; `is_split_into_words`
    and `offset_mapping` are not supported; a non-string input raises TypeError (transformers:
    ValueError), an unknown strategy ValueError (transformers: KeyError), a stride that leaves no room
    next to the special tokens ValueError (transformers: a panic inside `tokenizers`).
    """

    task = "token-classification"
    token_outputs = ("scores",)

    def _sanitize_parameters(
        self, aggregation_strategy=None, ignore_labels=None, stride=None, is_split_into_words=False, **unknown
    ):
        if unknown:
            raise TypeError(
                f"token-classification got unknown parameters {sorted(unknown)}; "
                "allowed: aggregation_strategy, ignore_labels, stride"
            )
        if is_split_into_words:
            raise ValueError("is_split_into_words=True is not supported: pass each text as one string")
        pre, post = {}, {}
        if aggregation_strategy is not None:
            strategy = aggregation_strategy.lower() if isinstance(aggregation_strategy, str) else None
            if strategy not in AGGREGATIONS:
                raise ValueError(f"unknown aggregation_strategy {aggregation_strategy!r}; allowed: {AGGREGATIONS}")
            post["aggregation_strategy"] = strategy
        if ignore_labels is not None:
            if isinstance(ignore_labels, str) or not all(isinstance(label, str) for label in ignore_labels):
                raise TypeError(f"ignore_labels must be a list of label names, got {ignore_labels!r}")
            post["ignore_labels"] = list(ignore_labels)
        if stride is not None:
            pre["stride"] = self._check_stride(stride, post.get("aggregation_strategy"))
        return pre, {}, post

    def _check_stride(self, stride, strategy: str | None) -> int:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride must be a non-negative integer, got {stride!r}")
        if self.max_length is not None:
            room = self.max_length - self.tokenizer.num_special_tokens()
            if stride >= room:
                raise ValueError(
                    f"stride must be less than {room}: the model's {self.max_length} tokens "
                    f"less {self.max_length - room} special tokens, got {stride}"
                )
        if strategy == "none":
            raise ValueError(
                "stride covers the whole text by overlapping windows; it needs an aggregation_strategy "
                f'other than "none" (one of {AGGREGATIONS[1:]})'
            )
        return stride

    def preprocess(self, item, stride=None):
        if stride is None:
            encodings = [self.encode_text(item)]
        else:
            encodings = self.encode_text(item, stride=stride, return_overflowing=True)
        for i, encoding in enumerate(encodings):
            yield {
                **encoding.model_inputs(),
                "offsets": encoding.offsets,
                "special_tokens_mask": encoding.special_tokens_mask,
                "text": item if i == 0 else None,
            }

    def _forward(self, inputs):
        return {"scores": torch.softmax(self.model(**inputs).float(), dim=-1)}  # (B, T, num_labels)

    def postprocess(self, chunks, aggregation_strategy="none", ignore_labels=None):
        ignore = ["O"] if ignore_labels is None else ignore_labels
        text = chunks[0]["text"]
        if aggregation_strategy in WORD_AGGREGATIONS and self.tokenizer.continuing_subword_prefix is None:
            warnings.warn("Tokenizer does not support real words, using fallback heuristic", UserWarning, stacklevel=2)
        entities = []
        for chunk in chunks:
            tokens = self._tokens(text, chunk)
            if aggregation_strategy in WORD_AGGREGATIONS:
                found = self._group(self._words(tokens, aggregation_strategy))
            elif aggregation_strategy in ("none", "simple"):
                found = [self._token_entity(t) for t in tokens]
                found = found if aggregation_strategy == "none" else self._group(found)
            else:
                raise ValueError(f"unknown aggregation_strategy {aggregation_strategy!r}; allowed: {AGGREGATIONS}")
            entities += [e for e in found if e.get("entity") not in ignore and e.get("entity_group") not in ignore]
        return _drop_overlaps(entities) if len(chunks) > 1 else entities

    # -- tokens, words, groups ----------------------------------------------------------------------------
    def _tokens(self, text: str, chunk: dict) -> list[dict]:
        """One dict per non-special token: its text, score row, offsets, index and whether it continues a word."""
        word_aware = self.tokenizer.continuing_subword_prefix is not None
        unk = self.tokenizer.token_id("unk_token")
        ids, rows = chunk["input_ids"], chunk["scores"].tolist()
        names = self.tokenizer.convert_ids_to_tokens(ids)
        tokens = []
        for index, (token_id, word, (start, end)) in enumerate(zip(ids, names, chunk["offsets"])):
            if chunk["special_tokens_mask"][index]:
                continue
            if word_aware:  # a piece like "##ization" is longer than its text
                is_subword = len(word) != end - start
            else:
                is_subword = start > 0 and " " not in text[start - 1 : start + 1]
            if token_id == unk:
                word, is_subword = text[start:end], False
            tokens.append(
                {
                    "word": word,
                    "scores": rows[index],
                    "start": start,
                    "end": end,
                    "index": index,
                    "is_subword": is_subword,
                }
            )
        return tokens

    def _token_entity(self, token: dict) -> dict:
        best = _argmax(token["scores"])
        return {
            "entity": self.labels[best],
            "score": token["scores"][best],
            "index": token["index"],
            "word": token["word"],
            "start": token["start"],
            "end": token["end"],
        }

    def _words(self, tokens: list[dict], strategy: str) -> list[dict]:
        """Tokens merged into words, each word one label (that of its first or most confident token, or of the mean)."""
        words: list[list[dict]] = []
        for token in tokens:
            if words and token["is_subword"]:
                words[-1].append(token)
            else:
                words.append([token])
        merged = []
        for word in words:
            if strategy == "first":
                scores = word[0]["scores"]
            elif strategy == "max":
                scores = max(word, key=lambda t: max(t["scores"]))["scores"]
            else:
                scores = [sum(column) / len(word) for column in zip(*(t["scores"] for t in word))]
            best = _argmax(scores)
            text = self.tokenizer.convert_tokens_to_string([t["word"] for t in word])
            merged.append(
                {
                    "entity": self.labels[best],
                    "score": scores[best],
                    "word": text,
                    "start": word[0]["start"],
                    "end": word[-1]["end"],
                }
            )
        return merged

    def _group(self, entities: list[dict]) -> list[dict]:
        """Adjacent entities of one tag joined: a B- label starts a new group, I- or a bare label continues one."""
        groups: list[list[dict]] = []
        for entity in entities:
            begins, tag = _tag(entity["entity"])
            if groups and tag == _tag(groups[-1][-1]["entity"])[1] and not begins:
                groups[-1].append(entity)
            else:
                groups.append([entity])
        return [
            {
                "entity_group": group[0]["entity"].split("-", 1)[-1],
                "score": sum(e["score"] for e in group) / len(group),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]

    @functools.cached_property
    def labels(self) -> list[str]:
        """Label names by class id: config.json's id2label, else the module's config, else LABEL_i."""
        id2label = self.config.get("id2label")
        if id2label:
            return [id2label[k] for k in sorted(id2label, key=int)]
        labels = getattr(getattr(self.model, "config", None), "id2label", None)
        if labels:
            return list(labels)
        return [f"LABEL_{i}" for i in range(self.config.get("num_labels", 2))]


def _argmax(values: list[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy)."""
    return max(range(len(values)), key=values.__getitem__)


def _tag(label: str) -> tuple[bool, str]:
    """(starts an entity, tag): "B-PER" -> (True, "PER"), "I-PER" -> (False, "PER"), "O" -> (False, "O")."""
    if label.startswith(("B-", "I-")):
        return label.startswith("B-"), label[2:]
    return False, label


def _drop_overlaps(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows de-duplicated: of those starting inside another, the longer (then the
    more confident) is kept."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    kept, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                previous = entity
        else:
            kept.append(previous)
            previous = entity
    kept.append(previous)
    return kept

"""zero-shot-classification: candidate labels scored by an NLI model, as transformers' ZeroShotClassificationPipeline.

Each (sequence, "This example is {label}.") pair is one chunk, so the chunks of many inputs are batched
together; the entailment logits of an input's chunks are then compared.
"""

from __future__ import annotations

import logging

import torch

from pipelines.base import ChunkPipeline

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "This example is {}."


class ZeroShotClassificationPipeline(ChunkPipeline):
    """Per input, {"sequence", "labels", "scores"} with the labels sorted by score, best first.

    `candidate_labels`: a list of strings or one comma-separated string (given per call, at construction,
    or as the second positional argument). `hypothesis_template` turns a label into the hypothesis
    (default "This example is {}."). `multi_label=False`: softmax of the entailment logits across the
    labels (they sum to 1); `multi_label=True` (or a single label): for each label on its own, softmax
    of entailment vs contradiction.

    The entailment class is the first label in config.json's label2id whose name starts with "entail"
    (any case); the contradiction class is 0, or the last class when entailment is 0. As in transformers,
    a model with no such label gets a warning and its LAST class is taken as entailment.
    The sequence is truncated (never the hypothesis) to fit the model's window; a hypothesis too long
    to fit on its own is a ValueError (transformers then fails inside the model).
    """

    task = "zero-shot-classification"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entailment_id = self._entailment_id()
        if self.entailment_id == -1:
            logger.warning(
                "no label starting with 'entail' in the model's label2id %s; using the last class as "
                "entailment: give config.json a descriptive label2id",
                self._label2id(),
            )

    def _label2id(self) -> dict[str, int]:
        if self.config.get("label2id"):
            return {label: int(i) for label, i in self.config["label2id"].items()}
        if self.config.get("id2label"):
            return {label: int(i) for i, label in self.config["id2label"].items()}
        labels = getattr(getattr(self.model, "config", None), "id2label", ())
        return {label: i for i, label in enumerate(labels)}

    def _entailment_id(self) -> int:
        for label, i in self._label2id().items():
            if label.lower().startswith("entail"):
                return i
        return -1

    def _sanitize_parameters(self, candidate_labels=None, hypothesis_template=None, multi_label=None, **unknown):
        if unknown:
            raise TypeError(
                f"zero-shot-classification got unknown parameters {sorted(unknown)}; "
                "allowed: candidate_labels, hypothesis_template, multi_label"
            )
        pre, post = {}, {}
        if candidate_labels is not None:
            pre["candidate_labels"] = _parse_labels(candidate_labels)
        if hypothesis_template is not None:
            pre["hypothesis_template"] = _check_template(hypothesis_template)
        if multi_label is not None:
            if not isinstance(multi_label, bool):
                raise TypeError(f"multi_label must be True or False, got {multi_label!r}")
            post["multi_label"] = multi_label
        return pre, {}, post

    def __call__(self, inputs, *args, **kwargs):
        """`pipe(sequences, candidate_labels, ...)`: the labels may also come second, as in transformers."""
        if len(args) > 1 or (args and "candidate_labels" in kwargs):
            raise TypeError(f"unexpected positional arguments {args!r}: pass candidate_labels= once")
        if args:
            kwargs["candidate_labels"] = args[0]
        return super().__call__(inputs, **kwargs)

    def preprocess(self, item, candidate_labels=None, hypothesis_template=DEFAULT_TEMPLATE):
        if not isinstance(item, str):
            raise TypeError(f"expected a string sequence, got {type(item).__name__}")
        if not item:
            raise ValueError("the sequence is empty: give a non-empty string")
        if not candidate_labels:
            raise ValueError("no candidate labels: pass candidate_labels=[...] or a comma-separated string")
        for label in candidate_labels:
            hypothesis = hypothesis_template.format(label)
            self._check_room(hypothesis)
            encoding = self.encode_text(item, hypothesis, truncation="only_first")
            yield {**encoding.model_inputs(), "candidate_label": label, "sequence": item}

    def _check_room(self, hypothesis: str) -> None:
        """A ValueError unless the hypothesis and the special tokens leave room for the sequence."""
        if self.max_length is None:
            return
        hypothesis_tokens = len(self.tokenizer.encode(hypothesis, add_special_tokens=False))
        needed = hypothesis_tokens + self.tokenizer.num_special_tokens(True)
        if needed > self.max_length:
            raise ValueError(
                f"the hypothesis {hypothesis!r} takes {needed} of the model's {self.max_length} "
                "tokens with the special tokens, leaving none for the sequence; shorten the label "
                "or the template"
            )

    def _forward(self, inputs):
        return {"logits": self.model(**inputs)}  # (B, num_labels)

    def postprocess(self, chunks, multi_label=False):
        labels = [chunk["candidate_label"] for chunk in chunks]
        logits = torch.stack([chunk["logits"] for chunk in chunks]).float()  # (n, num_labels)
        entail = self.entailment_id
        if multi_label or len(labels) == 1:
            contradiction = -1 if entail == 0 else 0
            scores = logits[:, [contradiction, entail]].softmax(dim=-1)[:, 1]
        else:
            scores = logits[:, entail].softmax(dim=0)
        scores = scores.tolist()
        # as transformers: ascending (stable) order reversed, so equal scores list the later label first
        order = sorted(range(len(labels)), key=scores.__getitem__)[::-1]
        return {
            "sequence": chunks[0]["sequence"],
            "labels": [labels[i] for i in order],
            "scores": [scores[i] for i in order],
        }


def _parse_labels(labels) -> list[str]:
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise TypeError(f"candidate_labels must be a list of strings or a comma-separated string, got {labels!r}")
    if not labels:
        raise ValueError("no candidate labels: pass at least one label")
    return list(labels)


def _check_template(template) -> str:
    if not isinstance(template, str):
        raise TypeError(f"hypothesis_template must be a string, got {type(template).__name__}")
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError) as e:
        raise ValueError(f"hypothesis_template {template!r} must hold one '{{}}' for the label: {e!r}") from e
    if filled == template:
        raise ValueError(f"hypothesis_template {template!r} has no '{{}}' where the label should go")
    return template

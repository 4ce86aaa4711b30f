"""text-classification (alias sentiment-analysis): labels and scores for texts and text pairs."""

from __future__ import annotations

import torch

from pipelines.base import Pipeline

FUNCTIONS = ("softmax", "sigmoid", "none")
_UNSET = object()


class TextClassificationPipeline(Pipeline):
    """Outputs as transformers: with `top_k` left unset, the best label as a dict per input (and a
    one-element list for a single string); with `top_k=N` or `top_k=None`, a sorted list of dicts.

    `function_to_apply` defaults from config.json: none for regression, sigmoid for multi-label or a
    single label, softmax otherwise. Inputs longer than the model's window are truncated.
    Text pairs: `{"text": ..., "text_pair": ...}`.
    """

    task = "text-classification"

    def _sanitize_parameters(self, function_to_apply=None, top_k=_UNSET, truncation=None, max_length=None, **unknown):
        if unknown:
            raise TypeError(
                f"text-classification got unknown parameters {sorted(unknown)}; "
                "allowed: top_k, function_to_apply, truncation, max_length"
            )
        pre, post = {}, {}
        if truncation is not None:
            pre["truncation"] = truncation
        if max_length is not None:
            pre["max_length"] = max_length
        if top_k is not _UNSET:
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
            post["top_k"], post["legacy"] = top_k, False
        if function_to_apply is not None:
            name = str(function_to_apply).lower()
            if name not in FUNCTIONS:
                raise ValueError(f"unknown function_to_apply {function_to_apply!r}; allowed: {FUNCTIONS}")
            post["function_to_apply"] = name
        return pre, {}, post

    def __call__(self, inputs, **kwargs):
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, str) and "top_k" not in kwargs:
            return [result]
        return result

    def preprocess(self, item, truncation=True, max_length=None):
        if isinstance(item, dict):
            if set(item) - {"text", "text_pair"} or "text" not in item:
                raise ValueError(f"a text pair is a dict with keys 'text' and 'text_pair', got keys {sorted(item)}")
            text, pair = item["text"], item.get("text_pair")
        elif isinstance(item, (list, tuple)):
            raise TypeError('to classify a text pair, pass {"text": ..., "text_pair": ...}, not a list')
        else:
            text, pair = item, None
        limit = max_length or self.max_length if truncation else None
        return self.encode_text(text, pair, max_length=limit).model_inputs()

    def _forward(self, inputs):
        return {"logits": self.model(**inputs)}

    def postprocess(self, outputs, function_to_apply=None, top_k=1, legacy=True):
        logits = outputs["logits"].float()
        function = function_to_apply or self._default_function()
        if function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        labels = self._labels(len(scores))
        if legacy and top_k == 1:
            best = int(scores.argmax())
            return {"label": labels[best], "score": scores[best].item()}
        ranked = [{"label": labels[i], "score": s} for i, s in enumerate(scores.tolist())]
        if legacy:
            return ranked
        ranked.sort(key=lambda d: d["score"], reverse=True)
        return ranked if top_k is None else ranked[:top_k]

    def _default_function(self) -> str:
        problem = self.config.get("problem_type") or getattr(self._model_config(), "problem_type", None)
        if problem == "regression":
            return "none"
        if problem == "multi_label_classification" or len(self._labels(None)) == 1:
            return "sigmoid"
        return "softmax"

    def _labels(self, n: int | None) -> list[str]:
        """Label names by class id: config.json's id2label, else the module's config, else LABEL_i."""
        id2label = self.config.get("id2label")
        if id2label:
            return [id2label[k] for k in sorted(id2label, key=int)]
        labels = getattr(self._model_config(), "id2label", None)
        if labels:
            return list(labels)
        n = n if n is not None else self.config.get("num_labels", 2)
        return [f"LABEL_{i}" for i in range(n)]

    def _model_config(self):
        return getattr(self.model, "config", None)

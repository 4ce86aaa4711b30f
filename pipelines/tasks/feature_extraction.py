"""feature-extraction: the base model's last hidden states, one vector per token, as transformers returns them."""

from __future__ import annotations

from pipelines.base import Pipeline


class FeatureExtractionPipeline(Pipeline):
    """Per input, a nested list of shape (1, tokens, hidden) (special tokens included), or a tensor of that
    shape with `return_tensors=True`. Inputs longer than the model's window are truncated."""

    task = "feature-extraction"
    token_outputs = ("hidden_states",)

    def _sanitize_parameters(self, truncation=None, tokenize_kwargs=None, return_tensors=None, **unknown):
        if unknown:
            raise TypeError(
                f"feature-extraction got unknown parameters {sorted(unknown)}; "
                "allowed: truncation, tokenize_kwargs, return_tensors"
            )
        pre = dict(tokenize_kwargs or {})
        if set(pre) - {"truncation", "max_length"}:
            raise TypeError(f"tokenize_kwargs supports truncation and max_length, got {sorted(pre)}")
        if truncation is not None:
            if "truncation" in pre:
                raise ValueError("truncation given twice (as a keyword and in tokenize_kwargs)")
            pre["truncation"] = truncation
        post = {} if return_tensors is None else {"return_tensors": bool(return_tensors)}
        return pre, {}, post

    def preprocess(self, item, truncation=True, max_length=None):
        limit = max_length or self.max_length if truncation else None
        return self.encode_text(item, max_length=limit).model_inputs()

    def _forward(self, inputs):
        return {"hidden_states": self.model(**inputs)}

    def postprocess(self, outputs, return_tensors=False):
        hidden = outputs["hidden_states"][None]  # (1, T, H)
        return hidden if return_tensors else hidden.float().tolist()

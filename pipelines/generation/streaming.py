"""Streamed detokenisation: token ids arriving one at a time -> text deltas.

`TextStream` turns a growing list of token ids into text deltas whose concatenation is the text of all of them,
holding back a token that ends inside a multi-byte character (decoded as U+FFFD) until the next one completes it.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Incremental detokenisation: `push(token_id)` returns the text it adds (possibly ""), `flush()` the rest.

    Decodes a short window (from the last emitted boundary) rather than the whole sequence at each token, so
    cost stays flat with length; what it emits always concatenates to `decode(all ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # ids[prefix:read] is already emitted text, kept as decoding context
        self.before = ""  # decode(ids[prefix:read]), kept: it changes only when text is emitted
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids[self.prefix :])
        if len(text) <= len(self.before) or text.endswith("\ufffd"):
            return ""
        delta = text[len(self.before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.before = self.decode(self.ids[self.prefix : self.read])
        self.emitted += delta
        return delta

    def flush(self) -> str:
        """What is still held back; the concatenation of all deltas is then exactly `decode(ids)`."""
        full = self.decode(self.ids)
        if not full.startswith(self.emitted):  # a decoder that rewrites earlier text (rare): what was sent stays
            logger.debug("streamed text diverged from the full decode; nothing more is sent")
        delta = full[len(self.emitted) :] if full.startswith(self.emitted) else ""
        self.emitted += delta
        return delta

"""Streamed detokenisation: token ids arriving one at a time -> text deltas, cut at stop strings.

    TextStream        token ids -> text deltas, holding back a token that ends inside a multi-byte character
    StopStringStream  text deltas -> the deltas that may be sent, ending before the first stop string and holding
                      back a tail that could still grow into one (what is sent cannot be taken back)
    GeneratedText     one generated sequence: its token ids, its text (streamed or decoded once at the end), cut
                      at stop strings, and its finish reason

The concatenation of what each one lets out is the same text as decoding (and cutting) everything at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from pipelines.generation.sampling import truncate_at_stop

logger = logging.getLogger(__name__)


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


class StopStringStream:
    """Text arriving in pieces, let out so that it ends before the first stop string (the OpenAI convention).

    `push(piece)` returns what may be sent now: a tail that is the beginning of a stop string is held back until
    the next pieces show whether the stop string completes. `push(piece, final=True)` (the sequence ended) lets
    the held-back tail out unless it completed a stop string. `context` (the prompt) precedes the text, so a stop
    string begun in the prompt and finished by the text counts; the text sent never includes any of it.
    """

    def __init__(self, stops: Iterable[str], context: str = ""):
        self.stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stops!r}")
        self.context = context
        self.text = ""  # everything pushed
        self.sent = 0  # len(self.text) already let out
        self.stopped = False  # a stop string occurred: nothing more is let out

    def push(self, piece: str, final: bool = False) -> str:
        """Add `piece`; the text that may be sent now (possibly "")."""
        if self.stopped:
            return ""
        self.text += piece
        end = len(self.text)
        if self.stops:
            full, start = self.context + self.text, len(self.context)
            cut = len(truncate_at_stop(full, self.stops, start=start))
            self.stopped = cut < len(full)
            end = (cut if self.stopped or final else self._hold_back(full, cut, start)) - start
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    @property
    def output(self) -> str:
        """The text let out so far."""
        return self.text[: self.sent]

    def _hold_back(self, full: str, end: int, start: int) -> int:
        """Where sendable text ends: before the earliest tail of full[:end] that begins a stop string."""
        for p in range(max(end - max(map(len, self.stops)) + 1, 0), end):
            if any(s.startswith(full[p:end]) for s in self.stops):
                return max(p, start)
        return end


class GeneratedText:
    """One generated sequence as its tokens arrive: token ids, text cut at stop strings, finish reason.

    incremental=True decodes as tokens arrive (streaming: `push` returns the text that may be sent); otherwise the
    ids are decoded once, when the sequence ends, and `push` returns "" until then. A stop string found in the
    text ends the sequence here (finish_reason "stop") even where the engine, which checks tokens, went on.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops=(), context: str = "", incremental: bool = False):
        self.decode = decode
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = StopStringStream(stops, context)
        self.stream = TextStream(decode) if incremental else None

    def push(self, token: int, reason: str | None = None) -> str:
        """Add a generated token and the engine's finish reason (None while it runs); the text to send now."""
        if self.finish_reason is not None:  # ended, or already cut at a stop string
            return ""
        self.ids.append(token)
        self.finish_reason = reason
        if self.stream is not None:
            piece = self.stream.push(token) + (self.stream.flush() if reason else "")
        elif reason is not None:
            piece = self.decode(self.ids)
        else:
            return ""
        out = self.text.push(piece, final=reason is not None)
        if self.text.stopped:
            self.finish_reason = "stop"
        return out

    @property
    def output(self) -> str:
        """The text let out so far: once finished, the sequence's whole text before any stop string."""
        return self.text.output

"""The engine driven by a background thread, shared by every caller of one pipeline.

    loop = EngineLoop(engine)                                    # one per model: one KV cache, one running batch
    loop.submit(prompt_ids, max_new_tokens, on_event, ...)       # from any thread; on_event(TokenEvent | Exception)
    loop.cancel(seq_id)                                          # a client went away: its sequence leaves the batch

The engine (pipelines/generation/engine.py) is not thread-safe, so only the loop's thread touches it: `submit` and `cancel`
queue commands that the thread applies between steps. Callers on other threads (the in-process pipeline, the
threads of a Ray model actor that keeps several batches in flight, the asyncio loop of a Serve replica) therefore
share one running batch: a sequence joins it at the next step, whoever submitted it. When a step fails (out of
memory, a broken device), every sequence in the engine gets the exception and the engine starts empty again.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence

from pipelines.generation.engine import Engine, TokenEvent

logger = logging.getLogger(__name__)

OnEvent = Callable[[object], None]  # a TokenEvent, or the exception that ended the sequence


class EngineLoop:
    """Runs `engine.step()` on a daemon thread while any sequence is queued or running."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: deque = deque()
        self._callbacks: dict[Hashable, OnEvent] = {}
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        on_event: OnEvent,
        *,
        eos_token_ids=(),
        stop=None,
        sampler_state=None,
    ) -> int:
        """Queue a sequence; `on_event` is called on the loop's thread with each TokenEvent (the last one has
        finished=True) or with the exception that ended it. Returns the sequence id (for `cancel`)."""
        seq_id = next(self._ids)
        args = (seq_id, list(prompt_ids), max_new_tokens, eos_token_ids, stop, sampler_state)
        with self._wake:
            self._commands.append(("add", args, on_event))
            self._wake.notify()
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence (queued or running); no more events are delivered for it."""
        with self._wake:
            self._commands.append(("cancel", seq_id, None))
            self._wake.notify()

    def generate(self, requests: Sequence[dict]) -> list[tuple[list[int], str]]:
        """Blocking: run `requests` (keyword dicts for `submit` without on_event) together with whatever else
        is running; (generated ids, finish reason) of each, in order. Raises the first sequence's failure."""
        results: list = [None] * len(requests)
        done = threading.Semaphore(0)

        def collect(i, tokens):
            def on_event(event):
                if isinstance(event, BaseException):
                    results[i] = event
                    done.release()
                    return
                tokens.append(event.token_id)
                if event.finished:
                    results[i] = (tokens, event.finish_reason)
                    done.release()

            return on_event

        ids = [self.submit(on_event=collect(i, []), **request) for i, request in enumerate(requests)]
        try:
            for _ in requests:
                done.acquire()
        except BaseException:  # interrupted: do not leave the sequences running
            for seq_id in ids:
                self.cancel(seq_id)
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # -- the loop's thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self.engine.has_work():
                    self._wake.wait()
                commands = list(self._commands)
                self._commands.clear()
            for kind, payload, on_event in commands:
                self._apply(kind, payload, on_event)
            if not self.engine.has_work():
                continue
            try:
                events = self.engine.step()
            except Exception as e:
                logger.exception("generation step failed; failing the %d sequences in the engine", len(self._callbacks))
                self._fail_all(e)
                continue
            for event in events:
                self._deliver(event)

    def _apply(self, kind: str, payload, on_event: OnEvent | None) -> None:
        if kind == "cancel":
            self._callbacks.pop(payload, None)
            self.engine.abort(payload)
            return
        seq_id, prompt, max_new, eos, stop, state = payload
        try:
            self.engine.add(seq_id, prompt, max_new, eos, stop, state)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            _call(on_event, e)
            return
        self._callbacks[seq_id] = on_event

    def _deliver(self, event: TokenEvent) -> None:
        on_event = self._callbacks.get(event.seq_id)
        if event.finished:
            self._callbacks.pop(event.seq_id, None)
        if on_event is not None:
            _call(on_event, event)

    def _fail_all(self, error: Exception) -> None:
        callbacks, self._callbacks = self._callbacks, {}
        self.engine.reset()
        for on_event in callbacks.values():
            _call(on_event, error)


def _call(on_event: OnEvent, event) -> None:
    try:
        on_event(event)
    except Exception:
        logger.exception("a generation callback failed")

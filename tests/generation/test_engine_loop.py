"""The engine's background loop on its failure and cancellation paths: a forward pass that raises mid-batch fails
every sequence in the engine (none is left waiting forever) and the loop serves again afterwards; a sequence its
consumer cancels, running or queued, leaves the engine and frees its slot while the others go on unchanged; a
bad request or a failing callback harms no other sequence.

Each test holds the loop's thread inside a callback (`paused`) while it submits, so that what it submits reaches
the engine at one step whatever the thread scheduling: the step counts below do not depend on timing.
"""

import contextlib
import threading
import types

import pytest

from pipelines.generation import loop as loop_module
from pipelines.generation.engine import Engine, TokenEvent
from pipelines.generation.loop import EngineLoop
from pipelines.models import gpt2
from tests.checkpoints import load_ours

N = 12  # new tokens per sequence
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [20, 21, 22, 23]]  # token ids, all within the tiny vocab
WAIT_S = 30  # a sequence that has not ended by then is hanging


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_ours(checkpoint("gpt2", "causal-lm"), gpt2.GPT2LMHeadModel)


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's N greedy tokens, run by itself on a plain engine: the reference for every loop run."""
    engine = Engine(model, max_length=64)
    return [engine.generate([p], N)[0] for p in PROMPTS]


class Consumer:
    """One sequence's consumer: records its token ids, its finish reason or the exception that ended it."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.late: list = []  # events after the end: checked by _wait (an assert in a callback is only logged)
        self.on_token = on_token  # called with the token count after each token, on the loop's thread

    def __call__(self, event) -> None:
        if self.ended.is_set():
            self.late.append(event)
            return
        if isinstance(event, BaseException):
            self.error = event
            self.ended.set()
            return
        assert isinstance(event, TokenEvent)
        self.tokens.append(event.token_id)
        if event.finished:
            self.reason = event.finish_reason
            self.ended.set()
        if self.on_token is not None:
            self.on_token(len(self.tokens))


@contextlib.contextmanager
def paused(loop: EngineLoop):
    """Hold the loop's thread inside the callback of a one-token sequence; what is submitted meanwhile joins the
    engine at the next step, all together."""
    entered, release = threading.Event(), threading.Event()

    def hold(event):
        entered.set()
        release.wait(WAIT_S)

    loop.submit([1], 1, hold)
    assert entered.wait(WAIT_S), "the loop's thread never ran the holding sequence"
    try:
        yield
    finally:
        release.set()


def _wait(*consumers: Consumer) -> None:
    """Until each consumer's sequence has ended (a token with finished=True, or an exception), and exactly once."""
    assert all(c.ended.wait(WAIT_S) for c in consumers), "a sequence was left waiting: it neither finished nor failed"
    assert not [c.late for c in consumers if c.late], "events arrived after a sequence had ended"


def _record_steps(loop: EngineLoop) -> list[list]:
    """After each engine step (on the loop's thread), the ids of the running sequences."""
    steps, step = [], loop.engine.step

    def recorded():
        events = step()
        steps.append([s.seq_id for s in loop.engine.running])
        return events

    loop.engine.step = recorded
    return steps


def _wait_idle(loop: EngineLoop) -> None:
    """Until the engine holds no sequence: a cancel is applied by the loop's thread between two steps."""
    ended = threading.Event()
    loop.submit([1], 1, lambda event: ended.set())  # commands run in order: this one ends after every earlier one
    assert ended.wait(WAIT_S)
    assert not loop.engine.has_work() and not loop.engine.sequences


def _failing_forward(model, fail_on_decode: int):
    """Make the model raise on its `fail_on_decode`-th decode call (a (n, 1) input) from now on; returns the hook
    handle and the exception it raises."""
    error = RuntimeError("simulated device failure")
    decodes = 0

    def hook(_module, args):
        nonlocal decodes
        if args[0].shape[1] == 1:
            decodes += 1
            if decodes == fail_on_decode:
                raise error

    return model.register_forward_pre_hook(hook), error


def test_a_forward_that_raises_fails_every_sequence_and_the_loop_serves_on(model, alone):
    """The second decode step raises with two sequences running and one queued: all three get that exception (the
    queued one having had no token), none hangs, the engine is empty again, and the next request gets the same
    tokens as alone."""
    loop = EngineLoop(Engine(model, max_length=64, max_sequences=2))
    consumers = [Consumer() for _ in range(3)]
    with paused(loop):
        handle, error = _failing_forward(model, fail_on_decode=2)
        for prompt, consumer in zip(PROMPTS, consumers):
            loop.submit(prompt, N, consumer)
    try:
        _wait(*consumers)
    finally:
        handle.remove()
    assert [c.error for c in consumers] == [error] * 3
    # One token from the prefill and one from the first decode, then the failure; the queued one never ran.
    assert [c.tokens for c in consumers] == [alone[0][:2], alone[1][:2], []]
    assert not loop.engine.has_work() and not loop.engine.sequences and loop.engine.cache is None
    assert loop.generate([{"prompt_ids": PROMPTS[3], "max_new_tokens": N}]) == [(alone[3], "length")]


def test_generate_raises_the_failure_instead_of_hanging(model):
    """The blocking generate() of a caller whose sequence fails in a step raises that exception (it is called on a
    daemon thread, so that a generate() that hangs fails this test instead of blocking the run)."""
    loop = EngineLoop(Engine(model, max_length=64))
    handle, error = _failing_forward(model, fail_on_decode=1)
    outcome = {}

    def call():
        try:
            outcome["result"] = loop.generate([{"prompt_ids": p, "max_new_tokens": N} for p in PROMPTS[:2]])
        except Exception as e:  # noqa: BLE001 - the outcome is checked below
            outcome["error"] = e

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(WAIT_S)
    handle.remove()
    assert not caller.is_alive(), "generate() was left waiting after the failed step"
    assert outcome == {"error": error}


def test_a_running_sequence_cancelled_by_its_consumer_frees_its_slot(model, alone):
    """Sequence 1's consumer cancels it after its third token: it gets no further event, leaves the running batch
    at the next step, and its slot admits the queued sequence 2 at once; sequences 0 and 2 get the tokens they get
    alone."""
    loop = EngineLoop(Engine(model, max_length=64, max_sequences=2))
    ids = {}

    def cancel_after_three(count):
        if count == 3:
            loop.cancel(ids[1])

    cancelling = Consumer(on_token=cancel_after_three)
    consumers = [Consumer(), cancelling, Consumer()]
    with paused(loop):
        steps = _record_steps(loop)
        for i, (prompt, consumer) in enumerate(zip(PROMPTS, consumers)):
            ids[i] = loop.submit(prompt, N, consumer)
    _wait(consumers[0], consumers[2])
    _wait_idle(loop)
    assert cancelling.tokens == alone[1][:3] and not cancelling.ended.is_set()
    assert [(c.tokens, c.reason, c.error) for c in (consumers[0], consumers[2])] == [
        (alone[0], "length", None),
        (alone[2], "length", None),
    ]
    # Step 1 prefills 0 and 1 (a token each), steps 2 and 3 decode (tokens 2 and 3: the cancel is sent). The cancel
    # is applied before step 4, which decodes 0 and admits 2 into the freed slot, long before 0 ends at step 12.
    assert steps[:4] == [[ids[0], ids[1]], [ids[0], ids[1]], [ids[0], ids[1]], [ids[0], ids[2]]]
    assert all(ids[1] not in running for running in steps[3:])


def test_a_queued_sequence_cancelled_before_it_runs_never_starts(model, alone):
    """A sequence cancelled while it waits for a slot gets no event and is never prefilled; the others are
    unchanged."""
    loop = EngineLoop(Engine(model, max_length=64, max_sequences=2))
    consumers = [Consumer() for _ in range(3)]
    with paused(loop):
        steps = _record_steps(loop)
        ids = [loop.submit(prompt, N, consumer) for prompt, consumer in zip(PROMPTS, consumers)]
        loop.cancel(ids[2])
    _wait(consumers[0], consumers[1])
    _wait_idle(loop)
    assert consumers[2].tokens == [] and not consumers[2].ended.is_set()
    assert all(ids[2] not in running for running in steps)
    assert [consumers[0].tokens, consumers[1].tokens] == [alone[0], alone[1]]


def test_an_interrupted_generate_cancels_its_sequences(model, monkeypatch):
    """A caller of the blocking generate() interrupted while it waits (KeyboardInterrupt, a cancelled task) does not
    leave its sequences running: they are cancelled and the engine ends empty."""

    class Interrupted:
        """A semaphore whose first wait is interrupted."""

        def __init__(self, value):
            pass

        def acquire(self):
            raise KeyboardInterrupt

    loop = EngineLoop(Engine(model, max_length=64))
    with paused(loop):
        steps = _record_steps(loop)
        monkeypatch.setattr(loop_module, "threading", types.SimpleNamespace(Semaphore=Interrupted))
        with pytest.raises(KeyboardInterrupt):
            loop.generate([{"prompt_ids": p, "max_new_tokens": N} for p in PROMPTS[:2]])
        monkeypatch.undo()
    _wait_idle(loop)
    assert steps == [[]]  # only _wait_idle's own one-token sequence ran: the cancels came before any step


def test_a_bad_request_fails_alone(model, alone):
    """A request the engine refuses (an empty prompt, an id outside the vocabulary) gets its ValueError; the
    sequences submitted with it are unaffected."""
    loop = EngineLoop(Engine(model, max_length=64))
    consumers = [Consumer() for _ in range(4)]
    requests = [PROMPTS[0], [], [model.config.vocab_size], PROMPTS[1]]
    with paused(loop):
        for prompt, consumer in zip(requests, consumers):
            loop.submit(prompt, N, consumer)
    _wait(*consumers)
    assert isinstance(consumers[1].error, ValueError) and "prompt is empty" in str(consumers[1].error)
    assert isinstance(consumers[2].error, ValueError) and "vocab_size" in str(consumers[2].error)
    assert [(c.tokens, c.error) for c in (consumers[0], consumers[3])] == [(alone[0], None), (alone[1], None)]


def test_a_callback_that_raises_harms_no_other_sequence(model, alone):
    """A consumer whose callback raises (logged) does not stop the loop's thread: the other sequences finish with
    their own tokens and the loop keeps serving."""
    loop = EngineLoop(Engine(model, max_length=64))

    def broken(event):
        raise RuntimeError("a consumer bug")

    consumer = Consumer()
    with paused(loop):
        loop.submit(PROMPTS[0], N, broken)
        loop.submit(PROMPTS[1], N, consumer)
    _wait(consumer)
    assert (consumer.tokens, consumer.reason) == (alone[1], "length")
    _wait_idle(loop)

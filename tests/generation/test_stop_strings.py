"""The stop-string streamer: streamed text never shows a stop string (nor a piece of one that later completes),
what it lets out joins to the text cut before the first stop string, and a tail that only looked like the start
of a stop string is let out when the sequence ends."""

import pytest

from pipelines.generation.sampling import truncate_at_stop
from pipelines.generation.streaming import GeneratedText, StopStringStream


def _decode(ids: list[int]) -> str:
    """One character per token: token id = the character's code point."""
    return "".join(map(chr, ids))


def _pieces(choice: GeneratedText, text: str, reasons: dict | None = None) -> list[str]:
    """Push `text` one character (token) at a time; the pieces the choice lets out."""
    reasons = reasons or {len(text) - 1: "length"}
    return [choice.push(ord(c), reasons.get(i)) for i, c in enumerate(text) if choice.finish_reason is None]


@pytest.mark.parametrize(
    "text, stops, context, output, reason",
    [
        ("hello world", ("wor",), "", "hello ", "stop"),  # cut even where the engine did not stop
        ("lo there", ("Hello",), "say Hel", "", "stop"),  # a stop string begun in the prompt
        ("abx", ("abc",), "", "abx", "length"),  # held back while it could become "abc", then let out
        ("one two", ("zz", "two", "e t"), "", "on", "stop"),  # the earliest of several
        ("plain", (), "", "plain", "length"),
    ],
)
def test_streamed_text_never_shows_a_stop_string(text, stops, context, output, reason):
    """Streamed pieces join to the final text, which ends before the first stop string: a piece that could begin a
    stop string waits for the next tokens, since what is sent cannot be taken back; decoding once at the end
    gives the same text."""
    streamed = GeneratedText(_decode, stops, context, incremental=True)
    pieces = _pieces(streamed, text)
    assert "".join(pieces) == output == streamed.output and streamed.finish_reason == reason
    whole = GeneratedText(_decode, stops, context)
    assert all(piece == "" for piece in _pieces(whole, text)[:-1]) and whole.output == output


def test_a_possible_start_of_a_stop_string_is_held_back_exactly_as_long_as_needed():
    """ "ab" could begin "abc": nothing of it leaves until "x" shows it does not; the text before it leaves at once."""
    stream = StopStringStream(["abc"])
    assert stream.push("12a") == "12"
    assert stream.push("b") == ""
    assert stream.push("x") == "abx"
    assert not stream.stopped and stream.output == "12abx"


def test_a_stop_string_split_across_pieces_is_cut_and_nothing_follows():
    """The stop string arrives over three pieces; the text ends before it and later pieces are dropped."""
    stream = StopStringStream(["STOP"])
    assert [stream.push(p) for p in ("go S", "T", "OP and more", " still more")] == ["go ", "", "", ""]
    assert stream.stopped and stream.output == "go "


def test_the_end_of_the_sequence_lets_out_a_held_back_tail():
    """A tail that still could begin a stop string is let out when the sequence ends without completing it."""
    stream = StopStringStream(("</s>", "###"))
    assert stream.push("done <") == "done "
    assert stream.push("/", final=True) == "</"
    assert not stream.stopped and stream.output == "done </"


def test_a_single_string_is_one_stop_string_and_an_empty_one_is_refused():
    """A plain string names one stop string (not one per character); "" would stop everything and is refused."""
    stream = StopStringStream("ab")
    assert stream.push("xa", final=False) == "x" and stream.push("c", final=True) == "ac"
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringStream(["ok", ""])


@pytest.mark.parametrize("cuts", [(1,), (3, 4), (2, 5, 6), (1, 2, 3, 4, 5, 6, 7, 8, 9)])
def test_any_split_of_the_text_lets_out_what_truncate_at_stop_keeps(cuts):
    """However the text is split into pieces, what is let out joins to truncate_at_stop of the whole text."""
    text, stops, context = "a qu brown qux", ("qux", "brow"), "say a"
    bounds = [0, *cuts, len(text)]
    stream = StopStringStream(stops, context)
    pieces = [stream.push(text[a:b], final=b == len(text)) for a, b in zip(bounds, bounds[1:])]
    expected = truncate_at_stop(context + text, stops, start=len(context))[len(context) :]
    assert "".join(pieces) == expected == "a qu "

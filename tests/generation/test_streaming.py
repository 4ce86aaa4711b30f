"""TextStream, the incremental detokeniser: a token that ends inside a multi-byte UTF-8 character is held back until
the character completes, and what it lets out always joins to the decode of every id."""

import pytest

from pipelines.generation.streaming import TextStream


def _bytes_decode(ids: list[int]) -> str:
    """A byte-level vocabulary (one token per byte, as byte-fallback and byte-level BPE tokens can be): an
    incomplete character decodes to U+FFFD, as `tokenizers` decodes it."""
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize(
    "text",
    ["é", "naïve café", "🙂", "a🙂b", "日本語", "e\u0301 and 🙂🙂"],
)
def test_a_split_multibyte_character_is_held_back_until_it_completes(text):
    """Each byte of a multi-byte character but the last lets out nothing; the last lets out the whole character;
    no delta ever holds U+FFFD, and the deltas join to the text."""
    stream = TextStream(_bytes_decode)
    deltas = []
    for char in text:
        encoded = char.encode()
        for i, byte in enumerate(encoded):
            delta = stream.push(byte)
            if i < len(encoded) - 1:
                assert delta == "", (char, i, delta)
            deltas.append(delta)
        assert deltas[-1].endswith(char)
    deltas.append(stream.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_a_sequence_that_ends_inside_a_character_lets_out_what_the_full_decode_gives():
    """Generation cut mid-character (max_new_tokens): flush() lets out the full decode's replacement character,
    so the streamed text equals the non-streamed one."""
    stream = TextStream(_bytes_decode)
    ids = list("ok ".encode()) + list("🙂".encode())[:2]
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == "ok "
    assert "".join(deltas) + stream.flush() == _bytes_decode(ids) == "ok \ufffd"

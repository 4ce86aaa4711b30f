"""TextStream, the incremental detokeniser: a token that ends inside a multi-byte UTF-8 character (half of "é", a
piece of an emoji: byte-level BPE and byte-fallback tokens) is held back until the character completes, so that no
streamed piece shows a replacement character U+FFFD that the whole text does not have; what it lets out always joins
to the decode of every id; and each push decodes a short window, not the whole sequence."""

import pytest

from pipelines.generation.streaming import TextStream
from tests.checkpoints import write_decoder_tokenizer

REPLACEMENT = "\ufffd"


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


def _chunks_decode(chunks: list[bytes]):
    """A decoder whose token i is the bytes chunks[i]: UTF-8 with errors replaced, as byte-level BPE decodes."""
    return lambda ids: b"".join(chunks[i] for i in ids).decode("utf-8", errors="replace")


def _stream(decode, ids) -> tuple[list[str], str]:
    """Push ids one at a time: (the piece each push returns, what flush returns)."""
    stream = TextStream(decode)
    return [stream.push(i) for i in ids], stream.flush()


@pytest.mark.parametrize(
    "chunks, pieces",
    [
        # One byte per token. "é" is C3 A9: C3 alone is an incomplete character, held; A9 completes it.
        ([b"a", b"\xc3", b"\xa9", b"b"], ["a", "", "é", "b"]),
        # "€" is E2 82 AC (3 bytes), "🙂" is F0 9F 99 82 (4 bytes): nothing until the last byte of each.
        ([b"\xe2", b"\x82", b"\xac"], ["", "", "€"]),
        ([b"x", b"\xf0", b"\x9f", b"\x99", b"\x82", b"!"], ["x", "", "", "", "🙂", "!"]),
        # A token that completes one character and begins the next: the whole window waits ("a" with it, since
        # the decode of the window ends in U+FFFD), then comes out at once.
        ([b"a\xc3", b"\xa9\xf0\x9f", b"\x99\x82b"], ["", "", "aé🙂b"]),
        # Two characters split back to back.
        ([b"\xc3", b"\xa9\xc3", b"\xa9"], ["", "", "éé"]),
    ],
)
def test_multibyte_tokens_let_out_exactly_the_completed_text(chunks, pieces):
    """Each push returns the text that is final: a token ending inside a character adds nothing until the token
    that completes it, which then returns the whole character; flush has nothing left."""
    assert _stream(_chunks_decode(chunks), range(len(chunks))) == (pieces, "")


def test_a_byte_that_can_never_complete_does_not_stop_the_stream():
    """A stray continuation byte (A9 with no lead byte) can never become a character: it is let out, as the U+FFFD
    the decode of all ids has too, with the next complete text, instead of holding back everything after it."""
    assert _stream(_chunks_decode([b"\xa9", b"x", b"y"]), range(3)) == (["", REPLACEMENT + "x", "y"], "")


TEXT = "A café costs 3€ 🙂 中文 naïve"


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama"])
def test_real_tokenizers_stream_split_characters_whole(family, tmp_path):
    """With the tiny checkpoints' tokenizers (byte-level BPE for GPT-2 and Qwen2; byte fallback <0xF0>.. and
    Metaspace for Llama), the emoji, "€" and the CJK characters are several tokens, each alone decoding to U+FFFD:
    no streamed piece shows U+FFFD, and the pieces join to the decode of all ids, which is the text."""
    tokenizer = write_decoder_tokenizer(tmp_path, family)
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    decode = tokenizer.decode
    splits = [i for i in ids if decode([i]) == REPLACEMENT]
    assert len(splits) >= 4 + 3 + 2 * 3, "the text must split characters into tokens for this test to mean anything"
    pieces, rest = _stream(decode, ids)
    assert not [p for p in pieces + [rest] if REPLACEMENT in p]
    assert "".join(pieces) + rest == decode(ids) == TEXT
    assert rest == ""  # the text ends with a complete character: nothing was left held back


def test_each_push_decodes_a_short_window():
    """The cost of a push stays flat with the sequence's length: push decodes from the start of the last piece it
    emitted (two ids here, that piece's token and the new one); only flush decodes every id."""
    calls = []
    chunks = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz" * 8]

    def decode(ids):
        calls.append(len(ids))
        return _chunks_decode(chunks)(ids)

    stream = TextStream(decode)
    pieces = [stream.push(i) for i in range(len(chunks))]
    assert pieces == [chr(c) for c in b"abcdefghijklmnopqrstuvwxyz" * 8]
    assert max(calls) <= 2
    calls.clear()
    assert stream.flush() == "" and calls == [len(chunks)]

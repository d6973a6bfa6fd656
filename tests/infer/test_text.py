"""TextStreamer: text of a growing sequence of ids, never half a UTF-8 character, a bounded tail decoded per call."""

from gptforge.infer.text import TextStreamer


# ----------------------------------------------------------------------------------------------
# Text streaming


def byte_decode(vocab):
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def stream_text(streamer, ids):
    pieces, seen = [], []
    for i in ids:
        seen.append(i)
        pieces.append(streamer(seen))
    return pieces


def test_streamer_holds_back_a_partial_multibyte_character():
    vocab = {0: b"h", 1: b"i\xe2", 2: b"\x82", 3: b"\xac ", 4: b"\xf0\x9f", 5: b"\x98", 6: b"\x80!"}
    decode = byte_decode(vocab)
    ids = [0, 1, 2, 3, 4, 5, 6]
    pieces = stream_text(TextStreamer(decode), ids)
    assert pieces == ["h", "i", "", "\u20ac ", "", "", "\U0001F600!"]
    assert "".join(pieces) == decode(ids) == "hi\u20ac \U0001F600!"
    assert "\ufffd" not in "".join(pieces)


def test_streamer_one_byte_per_token_and_flush_of_an_unfinished_character():
    vocab = {b: bytes([b]) for b in range(256)}
    data = "añ€😀z".encode()
    streamer = TextStreamer(byte_decode(vocab))
    pieces = stream_text(streamer, list(data))
    assert "".join(pieces) == "añ€😀z"
    assert [p for p in pieces if p] == ["a", "ñ", "€", "😀", "z"]
    assert streamer.flush() == ""
    # generation ended after the first byte of "€": nothing printed until flush, which shows U+FFFD
    streamer = TextStreamer(byte_decode(vocab))
    assert stream_text(streamer, list(b"ok\xe2")) == ["o", "k", ""]
    assert streamer.flush() == "\ufffd"


def test_streamer_does_not_stall_on_invalid_bytes():
    vocab = {b: bytes([b]) for b in range(256)}
    data = b"a" + b"\x80" * 20 + b"b"
    pieces = stream_text(TextStreamer(byte_decode(vocab)), list(data))
    assert "".join(pieces) == data.decode("utf-8", errors="replace")
    # a run of invalid bytes is printed as it goes, not held back until the next valid character
    assert "".join(pieces[:-1]).count("\ufffd") >= 20 - TextStreamer.MAX_PENDING


def test_streamer_with_a_decoder_that_drops_the_first_leading_space():
    # SentencePiece-style: "_" marks a space, and the text's first space is dropped.
    words = {0: "_Hello", 1: ",", 2: "_world", 3: "_again"}

    def decode(ids):
        return "".join(words[i] for i in ids).replace("_", " ").removeprefix(" ")

    ids = [0, 1, 2, 3, 2]
    pieces = stream_text(TextStreamer(decode, context=2), ids)
    assert "".join(pieces) == decode(ids) == "Hello, world again world"


def test_streamer_decodes_only_a_bounded_tail():
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)

    stream_text(TextStreamer(decode, context=4), list(range(300)))
    assert max(lengths) <= 5



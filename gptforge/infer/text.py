"""Text from token ids as they are generated: never half a UTF-8 character, never a re-decode of the whole text."""

from __future__ import annotations

from typing import Callable, Sequence


class TextStreamer:
    """Newly printable text of one growing sequence of ids, one call per generated token.

    A character whose UTF-8 bytes are split over several tokens decodes to a trailing "\\ufffd"
    until its last byte arrives; that tail is held back and printed once complete. Only the ids
    since the last complete character are decoded (plus `context` ids before them, whose text is
    cut off again, so decoders that treat the first token specially, such as dropping a leading
    space, still give the right text), so each call costs the same however long the sequence grows.

        streamer = TextStreamer(tokenizer.decode)
        for next_ids in stream(model, idx, 200):
            ids.append(int(next_ids[0])); print(streamer(ids), end="", flush=True)
        print(streamer.flush())
    """

    MAX_PENDING = 8  # a UTF-8 character spans at most 4 byte tokens; beyond that the bytes are just invalid

    def __init__(self, decode: Callable[[Sequence[int]], str], context: int = 4):
        self.decode = decode
        self.context = context
        self._ids: Sequence[int] = ()
        self._done = 0  # the text of ids[:_done] has been printed in full
        self._printed = 0  # characters of the text of ids[_done:] printed already

    def __call__(self, ids: Sequence[int]) -> str:
        """The text not yet returned, less a trailing partial character. ids: the whole sequence so far."""
        self._ids = ids
        return self._take(final=False)

    def flush(self) -> str:
        """Whatever is held back (the generation ended mid-character: it prints as "\\ufffd")."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        ids, start = self._ids, self._done
        if len(ids) <= start:
            return ""
        ctx = max(0, start - self.context)
        prefix = self.decode(ids[ctx:start]) if ctx < start else ""
        text = self.decode(ids[ctx:])[len(prefix):]  # the text of ids[start:]
        end = len(text)
        if not final and len(ids) - start < self.MAX_PENDING:
            end = len(text.rstrip("\ufffd"))
        out = text[self._printed:end]
        if end == len(text):  # everything printed: a clean boundary to decode from next time
            self._done, self._printed = len(ids), 0
        else:
            self._printed = max(self._printed, end)
        return out

"""Log-probabilities in OpenAI's two response formats, from the engine's `TokenLogprob` entries.

- completions (`logprobs: N`): `{tokens, token_logprobs, top_logprobs, text_offset}`, four parallel lists; a
  token is its text, or "bytes:\\xNN..." when it is part of a character; `top_logprobs` holds the N most likely
  tokens and, as OpenAI's does, the chosen one if it is not among them (so up to N + 1, and N = 0 gives the
  chosen one alone); an echoed prompt's first token, which nothing predicts, has `null` for both.
- chat (`logprobs: true, top_logprobs: N`): `content`, a list of `{token, logprob, bytes, top_logprobs}` with
  exactly N alternatives (each `{token, logprob, bytes}`), most likely first.

The values are those the model computed (log_softmax of the raw logits, before temperature, top-k or top-p),
whatever the request's sampling settings, as vLLM reports them.
"""

from __future__ import annotations

import codecs
from typing import Any, Optional, Sequence

from gptforge.infer.scoring import TokenLogprob


def token_text(piece: bytes) -> str:
    """A token's text, or OpenAI's "bytes:\\xNN" form for bytes that are not UTF-8 on their own."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


class Offsets:
    """Where each token starts in the text, in characters: the characters that the pieces before it complete
    (a character split across tokens counts from the token that completes it)."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def feed(self, piece: bytes) -> int:
        start = self.chars
        self.chars += len(self._decoder.decode(piece))
        return start


def completion_logprobs(tok, entries: Sequence[TokenLogprob], offsets: Offsets) -> dict[str, list]:
    """The completions `logprobs` object of `entries`, their text offsets counted on from `offsets`."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        piece = tok.piece(e.id)
        text = token_text(piece)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["text_offset"].append(offsets.feed(piece))
        if e.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top = {token_text(tok.piece(i)): lp for i, lp in e.top}
        top.setdefault(text, e.logprob)
        out["top_logprobs"].append(top)
    return out


def _chat_token(tok, i: int, logprob: float) -> dict[str, Any]:
    piece = tok.piece(i)
    return {"token": token_text(piece), "logprob": logprob, "bytes": list(piece)}


def chat_logprobs(tok, entries: Sequence[TokenLogprob]) -> Optional[dict[str, list]]:
    """The chat `logprobs` object of `entries` (generated tokens: each has a logprob)."""
    return {"content": [{**_chat_token(tok, e.id, e.logprob),
                         "top_logprobs": [_chat_token(tok, i, lp) for i, lp in e.top]} for e in entries]}

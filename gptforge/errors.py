"""The one exception type for user mistakes (the CLI prints it as a single line and exits with status 2), and the
one helper that turns any message or exception into that single line."""

from __future__ import annotations

from typing import Optional, Union


class UserError(Exception):
    """Bad input from the user: a missing file, an unreadable corpus, a wrong value, a corrupt checkpoint."""


def one_line(msg: Union[str, BaseException], limit: Optional[int] = None, with_type: bool = False) -> str:
    """`msg` with its white space folded into single spaces; an exception as its text (`Type: text` with
    with_type); cut to `limit` characters with an ellipsis when given. A library's message cut like this is a
    last resort: where the cause is known, say it in our own sentence instead."""
    text = f"{type(msg).__name__}: {msg}" if with_type and isinstance(msg, BaseException) else str(msg)
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text

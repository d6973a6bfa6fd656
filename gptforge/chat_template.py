"""The chat template: turn markers as special tokens, and a conversation as token ids plus a loss mask.

Five markers, the same names for every tokenizer kind:

    <|bos|> [<|system|> text <|end|>] (<|user|> text <|end|> <|assistant|> text <|end|>)*

`add_chat_template` gives a tokenizer of the same kind with the markers as extra ids: for gpt2 GPT-2's padded
slots 50257..50261 (a GPT-2 model already has 50304 rows, so its weights need no resize), for char and bpe
the ids after the existing vocabulary. The template is part of the tokenizer's dict form (key "chat"), so a
data directory and every checkpoint carry it, and `gptforge.tokenizer.tokenizer_from_dict` restores it.

Markers exist only as ids: `encode` of ordinary text never produces one (a user typing "<|user|>" gets the
tokens of those characters), so a conversation's text cannot forge a turn.

`render_conversation` returns the ids and the loss mask: 1 exactly on what the assistant says and its
`<|end|>` (what the model should learn to produce), 0 on bos, system and user turns and on `<|assistant|>`.
"""

from __future__ import annotations

from typing import Any, Optional

from gptforge.errors import UserError
# The markers and the tokenizers that carry them live in gptforge.tokenizer (it reads tokenizer.json, with its
# "chat" key); this module renders conversations with them, and re-exports them as the chat interface.
from gptforge.tokenizer import (ASSISTANT, BOS, END, GPT2_FIRST_ID, MARKERS, ROLES, SYSTEM, USER,  # noqa: F401
                                ChatTemplate, Tokenizer, add_chat_template, chat_of)

__all__ = ["ASSISTANT", "BOS", "END", "GPT2_FIRST_ID", "MARKERS", "ROLES", "SYSTEM", "USER", "ChatTemplate",
           "add_chat_template", "chat_of", "render_conversation", "validate_messages"]

# ----------------------------------------------------------------------------------------------
# Conversations


def validate_messages(messages: Any, *, for_generation: bool = False) -> Optional[str]:
    """None when `messages` is a usable conversation, else why not (one short phrase).

    Usable: a list of {"role", "content"} dicts with string, non-blank content; an optional system message
    first, then user and assistant turns alternating from a user turn; ending with the assistant (or, with
    `for_generation`, with the user)."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i + 1} is not an object"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {i + 1} has role {role!r} (expected one of: {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"message {i + 1} ({role}) has no text content"
        if not content.strip():
            return f"message {i + 1} ({role}) is empty"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = i + 1 + (len(messages) - len(turns))
            return f"message {where} is a {m['role']} turn where a {expected} turn was expected"
    last = "user" if for_generation else "assistant"
    if not turns or turns[-1]["role"] != last:
        return f"the conversation does not end with a {last} turn"
    return None


def render_conversation(tok: Tokenizer, messages: list[dict[str, str]], *,
                        for_generation: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation in the template's layout; mask is 1 on the assistant's text and its
    <|end|>. With for_generation the last message is the user's and <|assistant|> is appended: the prompt
    a chat model continues. Raises UserError for a conversation `validate_messages` refuses."""
    template = chat_of(tok)
    problem = validate_messages(messages, for_generation=for_generation)
    if problem is not None:
        raise UserError(f"cannot render this conversation: {problem}")
    ids, mask = template.head(), [0]
    for m in messages:
        turn = template.turn(m["role"], tok.encode(m["content"]))
        ids += turn
        learn = 1 if m["role"] == "assistant" else 0  # its text and its <|end|>, not its <|assistant|>
        mask += [0] + [learn] * (len(turn) - 1)
    if for_generation:
        ids.append(template.assistant_id)
        mask.append(0)
    return ids, mask

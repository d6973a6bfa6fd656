"""`gptforge chat`: a multi-turn conversation with a chat model in the terminal.

A `ChatSession` keeps the conversation as token ids in the chat template's layout (gptforge.chat_template)
and the keys and values of those ids in one KV cache, so each turn runs the model only on what is new: the
user's message and, from the turn before, the assistant's closing <|end|>. Replies are decoded by
`gptforge.infer.engine.stream` on that cache and printed through `TextStreamer` (never half a UTF-8 character).
When the conversation no longer fits the model's context, the oldest exchanges are dropped (the system
prompt is kept) and the cache is rebuilt once for the shorter history.

`repl` is the terminal loop around a session (in-chat commands, Ctrl-C and Ctrl-D); `chat_checkpoint` is the
verb: load a checkpoint, refuse one without a chat template, answer one `-p` message or start the loop.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

from gptforge.device import autocast, pick_device, pick_dtype
from gptforge.errors import UserError, one_line
from gptforge.infer.engine import new_kv_cache, stream
from gptforge.infer.sampling import SamplingParams
from gptforge.infer.text import TextStreamer
from gptforge.modelio.load import load

HELP = "commands: /clear (forget the conversation), /system TEXT (new system prompt; /system alone removes it), /quit"


class ChatError(UserError):
    """A message the session cannot take (empty, or longer than the model's context)."""


class ChatSession:
    """One conversation with `model`: its history as ids, the KV cache of those ids, and the sampling settings.

    The history is `head` (<|bos|> and the system turn, if any) followed by `exchanges`, one per turn:
    <|user|> text <|end|> <|assistant|> reply <|end|>. The cache always holds a prefix of the history.
    """

    def __init__(self, model: torch.nn.Module, tok, *, system: Optional[str] = None, max_new_tokens: int = 256,
                 params: SamplingParams = SamplingParams(0.8, 200, None, 1337),
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                 note: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)):
        if tok.chat is None:
            raise ChatError("this tokenizer has no chat template")
        if max_new_tokens < 1:
            raise ChatError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.params = params.validate(seed_name="--seed")  # bad settings fail before the first turn
        self.model, self.tok, self.template = model, tok, tok.chat
        self.block_size = model.config.block_size
        self.max_new_tokens, self.device, self.dtype, self.note = max_new_tokens, device, dtype, note
        self.generator = params.generator(device)
        self.stop_ids = self.template.stop_ids(tok.eot_id)
        self.cut: Optional[str] = None  # why the last reply was cut short (no marker ended it), or None
        with torch.inference_mode(), autocast(device, dtype):  # the keys' dtype; written only in inference mode
            self.cache = new_kv_cache(model, 1, device)
        self.exchanges: list[list[int]] = []
        self._told_dropping = False
        self.set_system(system)

    # ---- the history

    @property
    def ids(self) -> list[int]:
        """The whole conversation so far, as the model reads it."""
        return self.head + [t for ex in self.exchanges for t in ex]

    def set_system(self, text: Optional[str]) -> None:
        """Start the history with this system prompt (None or blank: none); the exchanges are kept."""
        # the template's turns, kept as ids so that replies stay exactly as generated
        head = self.template.head(self.encode(text) if text and text.strip() else None)
        if len(head) + 4 >= self.block_size:  # 4: the least a user turn and one reply token take
            raise ChatError(f"the system prompt is {len(head) - 3} tokens; the model's whole context is "
                            f"{self.block_size}; give a shorter one")
        self.head = head
        self.cache.reset()

    def clear(self) -> None:
        """Forget every exchange; the system prompt stays."""
        self.exchanges = []
        self.cache.reset()

    def user_turn(self, text: str) -> list[int]:
        """<|user|> text <|end|> <|assistant|>: what a message adds to the history before the reply."""
        return self.template.user_turn(self.encode(text))

    def encode(self, text: str) -> list[int]:
        """The ids of a message; text the tokenizer cannot read (a character outside a char model's
        vocabulary) is a ChatError, which the chat reports and goes on from."""
        try:
            return self.tok.encode(text)
        except UserError as e:
            raise ChatError(f"{one_line(e)}; say it another way") from None

    def make_room(self, turn: list[int]) -> list[int]:
        """The prompt for `turn`: the history plus the turn, after dropping the oldest exchanges until a reply
        of min(max_new_tokens, a quarter of the context) tokens fits."""
        if len(self.head) + len(turn) >= self.block_size:  # before dropping anything: it would not help
            raise ChatError(f"that message is {len(turn) - 3} tokens; with the system prompt it leaves no room "
                            f"in the model's context of {self.block_size}; say it shorter")
        room = min(self.max_new_tokens, max(1, self.block_size // 4))
        history_len = len(self.ids)
        dropped = False
        while self.exchanges and history_len + len(turn) + room > self.block_size:
            history_len -= len(self.exchanges.pop(0))
            dropped = True
        if dropped:
            self.cache.reset()  # positions have shifted: the cache is rebuilt from the shorter history
            if not self._told_dropping:
                self._told_dropping = True
                self.note(f"(the conversation is longer than the model's context of {self.block_size} tokens: "
                          "the oldest turns are dropped from now on)")
        return self.ids + turn

    # ---- a turn

    def reply(self, text: str, write: Optional[Callable[[str], None]] = None) -> str:
        """The assistant's answer to `text`, streamed to `write` as it is decoded; both go into the history.

        Interrupted (Ctrl-C), the part already decoded stays in the history as the answer."""
        if not text.strip():
            raise ChatError("the message is empty")
        turn = self.user_turn(text)
        prompt = self.make_room(turn)
        if self.cache.pos > len(prompt):  # cannot happen while the cache holds a prefix; rebuild rather than trust it
            self.cache.reset()
        new = torch.tensor([prompt[self.cache.pos:]], dtype=torch.long, device=self.device)  # (1, T_new)
        n = min(self.max_new_tokens, self.block_size - len(prompt))
        answer: list[int] = []
        self.cut = None
        streamer = TextStreamer(self.tok.decode)
        try:
            with autocast(self.device, self.dtype):
                for row in stream(self.model, new, n, *self.params.filters, eot_id=self.template.end_id,
                                  vocab_size=self.tok.vocab_size, generator=self.generator, kv_cache=self.cache):
                    token = int(row[0])
                    if token in self.stop_ids:
                        break
                    answer.append(token)
                    if write is not None:
                        write(streamer(answer))
                else:  # no marker: the reply was cut at its limit
                    self.cut = (f"reply cut at {n} tokens, the --max-new-tokens limit" if n == self.max_new_tokens
                                else f"reply cut: the conversation filled the model's context of {self.block_size} "
                                "tokens")
        finally:
            # every token of `answer` was yielded before the next was fed, so the cache still holds a prefix
            self.exchanges.append(turn + answer + [self.template.end_id])
            if write is not None:
                write(streamer.flush())
        return self.tok.decode(answer)


# ----------------------------------------------------------------------------------------------
# The terminal loop


def handle_command(session: ChatSession, line: str, say: Callable[[str], None]) -> bool:
    """Carry out an in-chat command (a line starting with "/"); False for /quit."""
    cmd, _, arg = line.strip().partition(" ")
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/clear":
        session.clear()
        say("(conversation cleared)")
    elif cmd == "/system":
        session.set_system(arg.strip() or None)
        say("(system prompt set)" if arg.strip() else "(system prompt removed)")
    else:
        say(f"(unknown command {cmd}; {HELP})")
    return True


def repl(session: ChatSession, *, read: Callable[[str], str] = input, out=None) -> int:
    """Talk until /quit or Ctrl-D (exit status 0) or Ctrl-C at the prompt (130). Ctrl-C during a reply
    stops that reply; the conversation goes on."""
    out = out or sys.stdout

    def say(msg: str) -> None:
        out.write(msg + "\n")
        out.flush()

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read("> ")
        except EOFError:  # Ctrl-D
            say("")
            return 0
        except KeyboardInterrupt:  # a Ctrl-C at the prompt (often the second one of a stopped reply) ends the chat
            say("")
            return 130
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/"):
                if not handle_command(session, line, say):
                    return 0
                continue
            session.reply(line, write)
            say(f" [...]\n({session.cut})" if session.cut else "")
        except KeyboardInterrupt:
            say("\n(stopped)")
        except ChatError as e:
            say(f"({e})")


def chat_checkpoint(run, *, prompt: Optional[str] = None, system: Optional[str] = None, max_new_tokens: int = 256,
                    temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None,
                    seed: int = 1337, which: str = "latest", device: str = "auto", dtype: str = "auto", out=None,
                    read: Callable[[str], str] = input) -> int:
    """`gptforge chat`: answer `prompt` and return, or talk in the terminal; the exit status."""
    out = out or sys.stdout
    if prompt is not None and not prompt.strip():
        raise ChatError("-p needs a message")
    if max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    params = SamplingParams(temperature, top_k, top_p, seed).validate(seed_name="--seed")  # before the model loads
    dev = pick_device(device)
    ck = load(run, dev, which, dtype)
    if getattr(ck.tokenizer, "chat", None) is None:
        raise ChatError(f"{run} has no chat template (it was not fine-tuned on conversations): use "
                        f"`gptforge sample {run}` for plain text, or fine-tune it on data from "
                        "`gptforge prepare FILE --chat`")
    session = ChatSession(ck.model, ck.tokenizer, system=system, max_new_tokens=max_new_tokens, params=params,
                          device=dev, dtype=pick_dtype(ck.config.train.dtype, dev))
    if prompt is not None:
        session.reply(prompt, lambda text: (out.write(text), out.flush()))
        out.write("\n")
        out.flush()
        if session.cut:  # on stderr: a script reading the reply from stdout gets the reply alone
            print(f"({session.cut})", file=sys.stderr, flush=True)
        return 0
    if read is input:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    print(f"chatting with {ck.path} (context {session.block_size} tokens). {HELP}; Ctrl-D ends, Ctrl-C stops a reply",
          file=sys.stderr, flush=True)
    return repl(session, read=read, out=out)

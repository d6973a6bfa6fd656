"""Tokenizers: one `Tokenizer` interface over three kinds, and their complete, portable JSON form.

- ``char``: one token per distinct character of the training corpus (nanoGPT's shakespeare_char),
  plus an end-of-text token when the corpus has more than one document.
- ``gpt2``: OpenAI's GPT-2 byte-level BPE through tiktoken (50257 tokens, end-of-text 50256).
- ``bpe``: our own byte-level BPE trained with Hugging Face ``tokenizers``.

A tokenizer is saved as ``tokenizer.json`` next to prepared data and inside checkpoints. That file is
complete: ``tokenizer_from_dict`` rebuilds the tokenizer from it alone, with no network and no cache
(the gpt2 kind embeds its 50k merge ranks). ``fingerprint()`` hashes it, so data and checkpoints can
check they use the same tokenizer.

``encode`` treats its input as ordinary text: the literal string ``<|endoftext|>`` is encoded like any
other text, never as the special token, so a corpus cannot inject document boundaries.

Each kind can carry the chat template's five turn markers (``add_chat_template``; the same never-from-text
rule holds for them). They are here, not in gptforge.chat_template, because ``tokenizer_from_dict`` must
restore them from tokenizer.json; that is what makes this module longer than most.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gptforge.errors import UserError, one_line
from gptforge.files import atomic_write
from gptforge import network

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FORMAT = "gptforge-tokenizer/1"
KINDS = ("char", "gpt2", "bpe")
# 256 byte tokens + the end-of-text token + at least one merge, or BPE has nothing to learn.
MIN_BPE_VOCAB = 257 + 1
# 2**20 = 1,048,576: four times the largest vocabularies in use (~256k), still a uint32 token file. HF's trainer
# allocates for the vocabulary it is asked for (10**12 aborted the process), and a model needs an embedding row
# per token: 2**20 x 768 is already 0.8B parameters.
MAX_BPE_VOCAB = 1 << 20


class Tokenizer:
    """Text <-> token ids. Subclasses set `kind`, `vocab_size` and `eot_id`."""

    kind: str
    vocab_size: int
    eot_id: int | None
    chat: Any = None  # the gptforge.chat_template.ChatTemplate of a tokenizer with turn markers
    _fingerprint: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ordinary text (special-token strings in `text` are not special)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text; parallel where the backend offers it."""
        return [self.encode(t) for t in texts]

    def set_threads(self, n: int) -> None:
        """Have `encode_batch` use `n` threads (1: the calling thread only) where the tokenizer runs
        threads of its own: gpt2. char runs none; bpe's are HF's process-wide pool, which only the
        TOKENIZERS_PARALLELISM and RAYON_NUM_THREADS environment variables control."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of threads must be a whole number >= 1, got {n!r}")

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_batch` as int64 arrays: what `prepare` streams to disk (char overrides it to skip lists)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """int64 array (vocab_size,): UTF-8 byte length of each token, 0 for special tokens (for bits per byte)."""
        raise NotImplementedError

    def special_ids(self) -> frozenset[int]:
        """End-of-text and the chat markers, those the tokenizer has: never the text of a corpus, and each ends a
        reply (`ChatTemplate.stop_ids`)."""
        if self.chat is not None:
            return self.chat.stop_ids(self.eot_id)
        return frozenset() if self.eot_id is None else frozenset({self.eot_id})

    def piece(self, i: int) -> bytes:
        """The bytes token i stands for in decoded text (a special token: its text). A byte-level BPE token can
        hold part of a character, so a piece alone need not be valid UTF-8; the pieces of a sequence joined are."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable and complete: `tokenizer_from_dict` needs nothing else."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of `to_dict()`: equal fingerprints mean identical tokenizers."""
        if self._fingerprint is None:
            canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            self._fingerprint = hashlib.sha256(canonical.encode("ascii")).hexdigest()
        return self._fingerprint

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` atomically (gptforge.files); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        # sort_keys and no indentation: the same tokenizer always gives byte-identical files.
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
        return atomic_write(path, text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# ----------------------------------------------------------------------------------------------
# char


class CharTokenizer(Tokenizer):
    """One token per character; ids follow sorted code points (nanoGPT's order). EOT, if any, comes last."""

    kind = "char"

    def __init__(self, chars: str | Iterable[str], eot: bool):
        chars = sorted(set(chars))
        if not chars:
            raise UserError("cannot build a char vocabulary from an empty corpus")
        if any(len(c) != 1 for c in chars):
            raise UserError("a char vocabulary must hold single characters")
        if lone := next((c for c in chars if "\ud800" <= c <= "\udfff"), None):  # tokenizer.json is UTF-8
            raise UserError(f"character U+{ord(lone):04X} is a lone UTF-16 surrogate, which UTF-8 text cannot "
                            "hold; it cannot be in a char vocabulary")
        self.chars: list[str] = chars
        self.eot_id = len(chars) if eot else None
        self.vocab_size = len(chars) + (1 if eot else 0)
        self._itos = chars + ([EOT_TEXT] if eot else [])
        # Sorted code points: encoding is one vectorised searchsorted, fast for megabytes of text.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)

    def _encode_array(self, text: str) -> np.ndarray:
        if not text:
            return np.empty(0, dtype=np.int64)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        idx = np.searchsorted(self._codepoints, cps)
        found = self._codepoints[np.minimum(idx, len(self._codepoints) - 1)] == cps
        if not found.all():
            ch = text[int(np.argmin(found))]
            raise UserError(f"character {ch!r} (U+{ord(ch):04X}) is not in the char tokenizer's vocabulary "
                            f"(it never occurs in the text the vocabulary was built from)")
        return idx.astype(np.int64, copy=False)

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        itos = self._itos
        return "".join([itos[i] for i in np.asarray(ids, dtype=np.int64).tolist()])

    def token_bytes(self) -> np.ndarray:
        sizes = [len(c.encode("utf-8", "surrogatepass")) for c in self.chars]
        return np.array(sizes + [0] * (self.vocab_size - len(self.chars)), dtype=np.int64)

    def piece(self, i: int) -> bytes:
        return self._itos[i].encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {"format": TOKENIZER_FORMAT, "kind": "char", "chars": "".join(self.chars),
                "eot": self.eot_id is not None}


# ----------------------------------------------------------------------------------------------
# gpt2 (tiktoken)


# tiktoken's gpt2 encoding is built from these two files (tiktoken_ext/openai_public.py), each kept in its cache
# as sha1(url) (tiktoken/load.py, read_file_cached); test_tokenizer checks this against a cache tiktoken wrote.
TIKTOKEN_GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                      "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"
_TIKTOKEN_FIX = ("set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files (a copy of the "
                 "cache of a machine that has loaded the gpt2 tokenizer once)")


def _tiktoken_cache() -> str:
    """The folder tiktoken reads and writes its downloads in ("" when caching is switched off)."""
    import tempfile

    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))


def _tiktoken_gpt2_cached() -> bool:
    cache = _tiktoken_cache()
    return bool(cache) and all(os.path.isfile(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
                               for url in TIKTOKEN_GPT2_URLS)


def _tiktoken_failure(e: Exception) -> str:
    """Our sentence for why tiktoken could not load gpt2 (its own messages run to hundreds of characters)."""
    cache = _tiktoken_cache() or "switched off: TIKTOKEN_CACHE_DIR is empty"
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(("requests", "urllib3")):
        return (f"cannot download GPT-2's BPE files for the gpt2 tokenizer from {TIKTOKEN_HOST} "
                f"({type(e).__name__}: offline?) and they are not in tiktoken's cache ({cache}); {_TIKTOKEN_FIX}")
    if isinstance(e, ValueError) and "hash" in str(e).lower():
        return (f"the GPT-2 BPE files downloaded from {TIKTOKEN_HOST} do not match their known checksums "
                f"(a broken download, or a proxy that rewrites it); try again, or {_TIKTOKEN_FIX}")
    if isinstance(e, OSError):
        return (f"cannot keep GPT-2's BPE files in tiktoken's cache {cache} ({e.strerror or type(e).__name__}); "
                "set TIKTOKEN_CACHE_DIR to a folder you can write")
    return f"tiktoken could not load the gpt2 tokenizer ({one_line(e, with_type=True)}); {_TIKTOKEN_FIX}"


def _encoding_from_tiktoken() -> Any:
    import tiktoken

    # Ask first only when a download is needed: offline, tiktoken would wait on DNS for many seconds.
    if not _tiktoken_gpt2_cached() and not network.reachable(TIKTOKEN_HOST):
        cache = _tiktoken_cache() or "switched off: TIKTOKEN_CACHE_DIR is empty"
        raise UserError(f"cannot load the gpt2 tokenizer: GPT-2's BPE files are not in tiktoken's cache ({cache}) "
                        f"and {TIKTOKEN_HOST} cannot be reached (offline?); {_TIKTOKEN_FIX}")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests errors, hash mismatch, unwritable cache: each said in our words
        raise UserError(_tiktoken_failure(e)) from None


def _slices(texts: list[str], n: int) -> list[list[str]]:
    """`texts` as at most `n` contiguous, non-empty runs of about equal length in characters (so no
    thread gets all the long texts of a batch), in order: their concatenation is `texts`."""
    n = min(n, len(texts))
    if n <= 1:
        return [texts] if texts else []
    total = sum(map(len, texts))
    runs: list[list[str]] = []
    start = done = 0
    k = 1  # the run being filled ends once `done` reaches k/n of `total`
    for i, text in enumerate(texts):
        done += len(text)
        if k < n and done * n >= total * k:
            runs.append(texts[start: i + 1])
            start = i + 1
            while k < n and done * n >= total * k:  # a long text may cover several runs' share
                k += 1
    if start < len(texts):
        runs.append(texts[start:])
    return runs


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE via tiktoken. The dict form embeds the ranks, so loading it is offline."""

    kind = "gpt2"

    def __init__(self, encoding: Any = None, *, state: dict[str, Any] | None = None):
        import tiktoken

        if encoding is None and state is None:
            encoding = _encoding_from_tiktoken()
        if encoding is None:
            ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(state["mergeable_ranks"])}
            encoding = tiktoken.Encoding(state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks,
                                         special_tokens=dict(state["special_tokens"]),
                                         explicit_n_vocab=state["n_vocab"])
        self._enc = encoding
        self._state = state
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token
        # tiktoken releases the GIL, so threads encode a batch in parallel: by default one per core, up to 16.
        self.threads = max(1, min(16, os.cpu_count() or 1))

    def set_threads(self, n: int) -> None:
        super().set_threads(n)
        self.threads = n

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Not tiktoken's encode_ordinary_batch: it makes one thread-pool task per text, and on many
        # short texts that overhead costs more than the encoding. One task per thread, each a
        # contiguous slice, costs a few tasks per batch; concatenating the slices keeps the order.
        encode = self._enc.encode_ordinary
        slices = _slices(list(texts), self.threads)
        if len(slices) <= 1:
            return [encode(t) for s in slices for t in s]
        with ThreadPoolExecutor(len(slices)) as pool:
            return [ids for part in pool.map(lambda s: [encode(t) for t in s], slices) for ids in part]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(np.asarray(ids, dtype=np.int64).tolist())

    def piece(self, i: int) -> bytes:
        return self._enc.decode_single_token_bytes(i)

    def tokens_by_rank(self) -> list[bytes]:
        """The BPE tokens' bytes, in rank order (rank = id, for ids below end-of-text)."""
        # tiktoken keeps ranks private; `_mergeable_ranks`/`_pat_str`/`_special_tokens` are the
        # documented way to extend an Encoding (tiktoken's README), so they are stable enough.
        ranks: dict[bytes, int] = self._enc._mergeable_ranks
        tokens: list[bytes | None] = [None] * len(ranks)
        for tok, rank in ranks.items():
            tokens[rank] = tok
        if any(t is None for t in tokens):
            raise RuntimeError("tiktoken ranks are not contiguous; cannot serialise this encoding")
        return tokens  # type: ignore[return-value]

    def token_bytes(self) -> np.ndarray:
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        tokens = self.tokens_by_rank()
        sizes[: len(tokens)] = [len(t) for t in tokens]
        for special_id in self._enc._special_tokens.values():
            sizes[special_id] = 0
        return sizes

    def to_dict(self) -> dict[str, Any]:
        if self._state is None:
            self._state = {
                "format": TOKENIZER_FORMAT, "kind": "gpt2", "name": self._enc.name,
                "pat_str": self._enc._pat_str, "n_vocab": self._enc.n_vocab,
                "special_tokens": dict(sorted(self._enc._special_tokens.items())),
                "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in self.tokens_by_rank()],
            }
        return self._state


# ----------------------------------------------------------------------------------------------
# bpe (Hugging Face tokenizers)


class BPETokenizer(Tokenizer):
    """A byte-level BPE we trained; its dict form embeds the HF tokenizer JSON."""

    kind = "bpe"

    def __init__(self, hf_json: dict[str, Any]):
        from tokenizers import Tokenizer as HFTokenizer

        self._hf_json = hf_json
        self._tok = HFTokenizer.from_str(json.dumps(hf_json))
        # Not saved in the HF JSON, so set on every load: "<|endoftext|>" in text is ordinary text.
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = self._tok.token_to_id(EOT_TEXT)
        self._added = frozenset(t["id"] for t in hf_json.get("added_tokens", []))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking, which we never use.
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        special = {t["id"] for t in self._hf_json.get("added_tokens", []) if t.get("special")}
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in special:
                # The ByteLevel pre-tokenizer maps every byte to exactly one character.
                sizes[i] = len(self._tok.id_to_token(i))
        return sizes

    def piece(self, i: int) -> bytes:
        token = self._tok.id_to_token(i)
        if token is None:
            raise KeyError(f"no token {i}")
        if i in self._added:  # end-of-text and the markers: their text, not byte-level characters
            return token.encode("utf-8")
        return bytes(_byte_level_decoder()[c] for c in token)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TOKENIZER_FORMAT, "kind": "bpe", "hf_tokenizer": self._hf_json}


@functools.lru_cache(maxsize=1)
def byte_level_chars() -> tuple[str, ...]:
    """The character that stands for each byte 0..255 in a byte-level BPE vocabulary (GPT-2's table, which
    HF's ByteLevel and llama.cpp use): the printable bytes stand for themselves, the other 68 for the code
    points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(shifted)}
    return tuple(chars[b] for b in range(256))


def byte_level_spelling(data: bytes) -> str:
    """`data` as a byte-level BPE vocabulary spells it (one character per byte)."""
    chars = byte_level_chars()
    return "".join(chars[b] for b in data)


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Character -> byte of the byte-level alphabet (the inverse of `byte_level_chars`)."""
    return {c: b for b, c in enumerate(byte_level_chars())}


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE on `texts` (documents or chunks of them, split at newlines).

    HF's BpeTrainer breaks count ties by pair id and merges deterministically: the same texts give the
    same tokenizer JSON in every process and with any thread count (tests/test_tokenizer.py checks it).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_tokenizer_args("bpe", vocab_size)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = [0]

    def nonempty() -> Iterable[str]:
        for text in texts:
            if text:
                seen[0] += 1
                yield text

    tok.train_from_iterator(nonempty(), trainer=trainer)
    if not seen[0]:
        raise UserError("cannot train a BPE tokenizer on an empty corpus")
    return BPETokenizer(json.loads(tok.to_str()))


# ----------------------------------------------------------------------------------------------
# construction, loading


def check_tokenizer_args(kind: str, vocab_size: int | None) -> None:
    """Reject a bad kind/vocab_size pair before any work is done."""
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(KINDS)}")
    if kind != "bpe" and vocab_size is not None:
        raise UserError(f"--vocab-size only applies to the bpe tokenizer; the {kind} tokenizer's vocabulary is fixed")
    if kind == "bpe":
        if vocab_size is None:
            raise UserError("the bpe tokenizer needs --vocab-size (e.g. 4096)")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise UserError(f"--vocab-size must be an integer of at least {MIN_BPE_VOCAB} "
                            f"(256 bytes + end-of-text + 1 merge), got {vocab_size!r}")
        if vocab_size > MAX_BPE_VOCAB:
            raise UserError(f"--vocab-size must be at most {MAX_BPE_VOCAB:,} (2**20; the largest vocabularies in "
                            f"use have ~256k tokens), got {vocab_size}")


def train_tokenizer(kind: str, documents: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer for `documents`: the char vocabulary, a trained bpe, or GPT-2's (documents unused)."""
    check_tokenizer_args(kind, vocab_size)
    if isinstance(documents, str):
        documents = [documents]  # one document, not one per character
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bpe":
        return train_bpe(documents, vocab_size)  # type: ignore[arg-type]
    seen: set[str] = set()
    n_docs = 0
    for doc in documents:
        if doc:  # empty documents are skipped, as prepare does
            n_docs += 1
            seen.update(doc)
    return CharTokenizer(seen, eot=n_docs > 1)


# ----------------------------------------------------------------------------------------------
# Chat markers: the same five turn markers for every kind, as ids ordinary text never encodes to (rendering a
# conversation with them is gptforge.chat_template's). They live here, beside the kinds they extend, because
# tokenizer_from_dict restores them from tokenizer.json.

BOS, SYSTEM, USER, ASSISTANT, END = "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
MARKERS = (BOS, SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
_ROLE_MARKER = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
GPT2_FIRST_ID = 50257  # the first of GPT-2's padded slots (its real vocabulary is 0..50256)


@dataclass
class ChatTemplate:
    """marker -> token id, for the five markers."""

    ids: dict[str, int]

    @property
    def bos_id(self) -> int:
        return self.ids[BOS]

    @property
    def system_id(self) -> int:
        return self.ids[SYSTEM]

    @property
    def user_id(self) -> int:
        return self.ids[USER]

    @property
    def assistant_id(self) -> int:
        return self.ids[ASSISTANT]

    @property
    def end_id(self) -> int:
        return self.ids[END]

    def stop_ids(self, eot_id: Optional[int] = None) -> frozenset[int]:
        """The ids that end a reply: its <|end|>, any other marker (a model that starts a turn of its own has
        finished its answer) and end-of-text (`eot_id`, the tokenizer's, if it has one)."""
        return frozenset(self.ids.values()) | (frozenset() if eot_id is None else {eot_id})

    def head(self, system: Optional[list[int]] = None) -> list[int]:
        """<|bos|> and, with the ids of a system prompt, <|system|> text <|end|>: how a conversation begins."""
        return [self.bos_id] + (self.turn("system", system) if system is not None else [])

    def turn(self, role: str, text: list[int]) -> list[int]:
        """<|role|> text <|end|>: one message of a conversation, role one of ROLES."""
        return [self.ids[_ROLE_MARKER[role]], *text, self.end_id]

    def user_turn(self, text: list[int]) -> list[int]:
        """A user message and the <|assistant|> that asks for the reply: what a turn of a chat adds before it."""
        return [*self.turn("user", text), self.assistant_id]

    def to_dict(self) -> dict[str, Any]:
        return {"markers": {m: self.ids[m] for m in MARKERS}}

    @classmethod
    def from_dict(cls, d: Any) -> ChatTemplate:
        markers = d.get("markers") if isinstance(d, dict) else None
        if not isinstance(markers, dict) or set(markers) != set(MARKERS):
            raise UserError(f"the tokenizer's chat template must list the markers {', '.join(MARKERS)}")
        ids = {m: markers[m] for m in MARKERS}
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids.values()) \
                or len(set(ids.values())) != len(MARKERS):
            raise UserError("the tokenizer's chat template has marker ids that are not distinct whole numbers")
        return cls(ids)


# ----------------------------------------------------------------------------------------------
# The tokenizer kinds with markers


class ChatCharTokenizer(CharTokenizer):
    """A char tokenizer whose markers follow its characters (and end-of-text)."""

    def __init__(self, chars: Any, eot: bool, template: ChatTemplate):
        super().__init__(chars, eot)
        expected = {m: self.vocab_size + i for i, m in enumerate(MARKERS)}
        if template.ids != expected:
            raise UserError("the char tokenizer's chat markers must follow its vocabulary "
                            f"(ids {self.vocab_size}..{self.vocab_size + len(MARKERS) - 1})")
        self.chat = template
        self.vocab_size += len(MARKERS)
        self._itos = self._itos + list(MARKERS)  # decode shows a marker as its name

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "chat": self.chat.to_dict()}


class ChatBPETokenizer(BPETokenizer):
    """A bpe tokenizer whose markers are special added tokens of its HF JSON (encode never matches them:
    BPETokenizer sets encode_special_tokens)."""

    def __init__(self, hf_json: dict[str, Any], template: ChatTemplate):
        super().__init__(hf_json)
        for marker, i in template.ids.items():
            if self._tok.token_to_id(marker) != i:
                raise UserError(f"the bpe tokenizer's chat marker {marker} is not its token {i}")
        self.chat = template

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "chat": self.chat.to_dict()}


def _gpt2_with_markers(tok: GPT2Tokenizer) -> GPT2Tokenizer:
    state = dict(tok.to_dict())
    if state["n_vocab"] != GPT2_FIRST_ID:
        raise UserError(f"the gpt2 tokenizer has {state['n_vocab']} tokens, not GPT-2's {GPT2_FIRST_ID}")
    template = ChatTemplate({m: GPT2_FIRST_ID + i for i, m in enumerate(MARKERS)})
    state["special_tokens"] = {**state["special_tokens"], **template.ids}
    state["n_vocab"] = GPT2_FIRST_ID + len(MARKERS)
    state["chat"] = template.to_dict()
    return attach_template(GPT2Tokenizer(state=state), state)


def _bpe_with_markers(tok: BPETokenizer) -> ChatBPETokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(tok.to_dict()["hf_tokenizer"]))
    first = hf.get_vocab_size(with_added_tokens=True)
    hf.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    template = ChatTemplate({m: first + i for i, m in enumerate(MARKERS)})
    return ChatBPETokenizer(json.loads(hf.to_str()), template)


def add_chat_template(tok: Tokenizer) -> Tokenizer:
    """`tok` with the five markers (a tokenizer that has them already is returned as it is)."""
    if getattr(tok, "chat", None) is not None:
        return tok
    if isinstance(tok, GPT2Tokenizer):
        return _gpt2_with_markers(tok)
    if isinstance(tok, BPETokenizer):
        return _bpe_with_markers(tok)
    if isinstance(tok, CharTokenizer):
        template = ChatTemplate({m: tok.vocab_size + i for i, m in enumerate(MARKERS)})
        return ChatCharTokenizer(tok.chars, tok.eot_id is not None, template)
    raise UserError(f"no chat template for the {tok.kind} tokenizer")


def attach_template(tok: Tokenizer, d: dict[str, Any]) -> Tokenizer:
    """The tokenizer built from dict `d` (which has a "chat" key) with its template: what
    tokenizer_from_dict calls, and where the markers are checked against the vocabulary."""
    template = ChatTemplate.from_dict(d["chat"])
    if isinstance(tok, GPT2Tokenizer):
        specials = tok._enc._special_tokens
        if any(specials.get(m) != i for m, i in template.ids.items()):
            raise UserError("the gpt2 tokenizer's chat markers are not among its special tokens")
        tok.chat = template
        return tok
    if isinstance(tok, BPETokenizer):
        return ChatBPETokenizer(d["hf_tokenizer"], template)
    if isinstance(tok, CharTokenizer):
        return ChatCharTokenizer(d["chars"], bool(d["eot"]), template)
    raise UserError(f"no chat template for the {tok.kind} tokenizer")


def chat_of(tok: Tokenizer) -> ChatTemplate:
    template = getattr(tok, "chat", None)
    if template is None:
        raise UserError(f"this {tok.kind} tokenizer has no chat template (prepare conversation data with "
                        "`gptforge prepare FILE --chat` to get one)")
    return template


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output (offline)."""
    try:
        kind = d["kind"]
        if kind == "char":
            tok: Tokenizer = CharTokenizer(d["chars"], eot=bool(d["eot"]))
        elif kind == "gpt2":
            tok = GPT2Tokenizer(state=d)
        elif kind == "bpe":
            tok = BPETokenizer(d["hf_tokenizer"])
        else:
            raise UserError(f"unknown tokenizer kind {kind!r} (this gptforge knows: {', '.join(KINDS)})")
    except UserError:
        raise
    except Exception as e:  # a truncated or hand-edited file: say so in one line
        raise UserError(f"not a valid gptforge tokenizer: {one_line(e, 200, with_type=True)}") from None
    if d.get("chat") is not None:  # turn markers (gptforge.chat_template), checked against the vocabulary
        tok = attach_template(tok, d)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `path/tokenizer.json` (path a directory) or the tokenizer file `path` itself."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no tokenizer file at {file}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenizer file {file}: {one_line(e, 200, with_type=True)}") from None
    if not isinstance(d, dict):
        raise UserError(f"{file}: not a gptforge tokenizer file")
    try:
        return tokenizer_from_dict(d)
    except UserError as e:
        raise UserError(f"{file}: {e}") from None

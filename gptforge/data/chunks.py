"""What every reader of a corpus gives, and cutting text into chunks.

Owns the `Input` interface (one input of a corpus, read as a stream of non-empty text chunks that
returns its manifest record at the end), `FileInput` (an input that is one local file), `RowInput` (an
input made of records: JSON lines, parquet rows, dataset rows, read by `rows` for both paths: the text
path takes one field of each record, gptforge.data.conversations maps each to messages), `Bad` (a row
that could not be decoded), and how a long text is cut into chunks of about CHUNK_BYTES without
changing its tokens (see `cut`). The readers, one per kind of input, build on this module:
gptforge.data.text_files (text, JSON), parquet_files, hf_dataset (hf:) and builtin_sources (shakespeare,
pydoc); gptforge.data.sources picks among them.
"""

from __future__ import annotations

import hashlib
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator

from gptforge import errors
from gptforge.errors import UserError
from gptforge.files import path_problem

# Text is read and cut into chunks of about this many bytes, so a multi-GB file never sits in memory.
# Readers look these up on this module when they read (not at import), so a test can shrink them.
CHUNK_BYTES = 1 << 18
MAX_CHUNK_BYTES = 4 * CHUNK_BYTES
# A JSON line (a document, a conversation) is held whole to parse it, which costs a few times its size; a longer
# one is never held (gptforge.data.text_files.lines). 256 MiB is ~64M tokens of text: far past any context.
MAX_LINE_BYTES = 1 << 28

Tally = Callable[[int], None]  # told how many source bytes were just read (for the progress bar)
Chunks = Generator[tuple[str, bool], None, dict[str, Any]]  # (text, starts a document); returns the record
Rows = Generator[tuple[str, Any], None, dict[str, Any]]  # (where, the record or a Bad); returns the manifest record


def one_line(e: BaseException, limit: int = 300) -> str:
    """`errors.one_line`, or the exception's type where it has no message (an empty "()" helps nobody)."""
    return errors.one_line(e, limit) or type(e).__name__


class Input(ABC):
    """One input of a corpus: a file, the documents of a built-in corpus, or a streamed dataset."""

    name: str  # in the manifest: path relative to a source folder, a file name, or the source itself
    display: str  # in error messages: the path as the user can find it
    size: int | None  # bytes, for the progress bar (None: unknown)

    @abstractmethod
    def stamp(self) -> list[Any]:
        """What must not change for an interrupted preparation to resume (checked without reading)."""

    @abstractmethod
    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        """Its non-empty chunks in order; returns its manifest record (name, bytes, sha256 or dataset ids)."""

    def check(self, text_field: str) -> None:
        """Fail now on what would otherwise fail hours into the run (a missing column); cheap."""


@dataclass
class FileInput(Input):
    """An input that is one local file."""

    name: str
    display: str
    size: int | None
    path: Path
    mtime_ns: int = 0

    @classmethod
    def of(cls, path: Path, name: str, display: str) -> FileInput:
        try:
            st = path.stat()
        except OSError as e:
            raise UserError(f"{display}: cannot read it ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):  # a device or pipe would be read forever, or never
            raise UserError(f"{display} {path_problem(path, 'file')}")
        return cls(name=name, display=display, size=st.st_size, path=path, mtime_ns=st.st_mtime_ns)

    def stamp(self) -> list[Any]:
        return [self.name, self.size, self.mtime_ns]

    def cannot_read(self, e: OSError) -> UserError:
        return UserError(f"{self.display}: cannot read it ({e.strerror or one_line(e)})")


class Bad(str):
    """A row that could not even be decoded (bad JSON, not UTF-8, a line too long): why. The text path stops at
    the first (`hint` says how to fix it there); a conversation reader counts it and goes on."""

    hint: str

    def __new__(cls, reason: str, hint: str = "") -> Bad:
        bad = super().__new__(cls, reason)
        bad.hint = hint
        return bad


class RowInput(Input):
    """An input made of records (dicts), one document or conversation each."""

    @abstractmethod
    def rows(self, tally: Tally, columns: list[str] | None = None) -> Rows:
        """(where, record or Bad) for each record in order, `where` naming it for messages ("FILE:LINE");
        returns the manifest record. `columns`: the fields the caller needs; a reader of columns (parquet,
        hf:) reads only those and fails on a missing one, naming the columns there are."""

    def text_of(self, where: str, row: Any, text_field: str) -> str:
        """The document in `row` (its `text_field`), or a one-line error naming `where`."""
        if isinstance(row, Bad):
            raise UserError(f"{where}: {row}{row.hint}")
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise UserError(f"{where}: no string field {text_field!r} (pick the field with --text-field)")
        return row[text_field]

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        return text_chunks(self, self.rows(tally, [text_field]), text_field)


def text_chunks(inp: RowInput, rows: Rows, text_field: str) -> Chunks:
    """The text path's reading of records: the document chunks of each record's `text_field`."""
    while True:
        try:
            where, row = next(rows)
        except StopIteration as stop:
            return stop.value
        yield from document_chunks(inp.text_of(where, row, text_field))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Cutting text into chunks


def _is_plain(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E  # printable ASCII other than space


_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def cut(buf: bytes) -> int:
    """Where to end a chunk in `buf` (0 = keep reading).

    Best: at a "\n" followed by printable ASCII. GPT-2's pre-tokenizer regex (tiktoken's and HF
    ByteLevel's) makes such a newline a piece of its own, and a whitespace run before it ("\r", "\n",
    spaces) a piece of its own too, so cutting after the newline (when printable ASCII precedes it) or
    before it (when ASCII whitespace does) gives exactly the tokens of the uncut text. Only without
    such a newline in MAX_CHUNK_BYTES do we cut at any newline, then at any character boundary, which
    may change a few gpt2/bpe tokens at the cut. char tokens never depend on chunking."""
    pos = buf.rfind(b"\n", 1, len(buf) - 1)
    while pos > 0:
        if _is_plain(buf[pos + 1]):
            if _is_plain(buf[pos - 1]):
                return pos + 1
            if buf[pos - 1] in _ASCII_SPACE:
                return pos
        pos = buf.rfind(b"\n", 1, pos)
    if len(buf) < MAX_CHUNK_BYTES:
        return 0
    pos = buf.rfind(b"\n")
    if pos >= 0:
        return pos + 1
    end = len(buf) - 1
    while end > 0 and buf[end] & 0xC0 == 0x80:  # back up over UTF-8 continuation bytes
        end -= 1
    return end or len(buf)


def cut_blocks(blocks: Iterable[bytes], decode: Callable[[bytes, int], str]) -> Iterator[str]:
    """Blocks of bytes -> text chunks ending at `cut` points; `decode(data, offset)` makes them text."""
    buf, offset = b"", 0
    for block in blocks:
        buf += block
        if at := cut(buf):
            yield decode(buf[:at], offset)
            buf, offset = buf[at:], offset + at
    if buf:
        yield decode(buf, offset)


def _pieces(text: str) -> Iterator[str]:
    """A document held as one string, in chunks: a 100 MB row is encoded as many batch items."""
    if len(text) <= CHUNK_BYTES:
        if text:
            yield text
        return
    data = text.encode("utf-8", "surrogatepass")  # JSON may hold lone surrogates; keep them as they are
    blocks = (data[i: i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES))
    yield from cut_blocks(blocks, lambda b, _offset: b.decode("utf-8", "surrogatepass"))


def document_chunks(text: str) -> Iterator[tuple[str, bool]]:
    """(chunk, starts_the_document) for one document; an empty document has none."""
    first = True
    for piece in _pieces(text):
        yield piece, first
        first = False

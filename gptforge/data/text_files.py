"""Readers of text files and JSON-lines files, plain or gzip-compressed.

    a text file (.txt, .md, .txt.gz, any other name)   one document, read in chunks of about CHUNK_BYTES
    a JSON-lines file (.jsonl, .jsonl.gz, .json.gz)    one document per line, from the text field

Owns reading a file through a tap that hashes every byte (the manifest's sha256, computed on the way),
checking it is not binary, the user errors of bad gzip, bad UTF-8 and bad JSON lines, and reading JSON
lines in bounded memory (`lines`, `json_value`: gptforge.data.chat_prepare reads its rows with them too).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterator
from typing import Any

from gptforge.data import chunks
from gptforge.data.chunks import Chunks, FileInput, Tally, document_chunks, one_line
from gptforge.errors import UserError

SNIFF_BYTES = 8192


class _Tap(io.RawIOBase):
    """A file read through: every byte read updates its sha256, its size and the progress tally."""

    def __init__(self, f: Any, tally: Tally):
        self.f, self.tally = f, tally
        self.sha256, self.n = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        if n:
            self.sha256.update(memoryview(b)[:n])
            self.n += n
            self.tally(n)
        return n

    def record(self, name: str) -> dict[str, Any]:
        while self.read(1 << 20):  # whatever the reader left unread (a gzip trailer) is part of the hash
            pass
        return {"name": name, "bytes": self.n, "sha256": self.sha256.hexdigest()}


def _open_tapped(inp: FileInput, tally: Tally) -> tuple[_Tap, Any]:
    """(tap, binary stream of the decompressed content), after checking the content is not binary."""
    try:
        raw = open(inp.path, "rb")
    except OSError as e:
        raise inp.cannot_read(e) from None
    tap = _Tap(raw, tally)
    stream: Any = io.BufferedReader(tap, chunks.CHUNK_BYTES)
    if inp.path.name.lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    try:
        head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raw.close()
        raise UserError(f"{inp.display}: not a valid gzip file ({one_line(e)})") from None
    except BaseException:
        raw.close()
        raise
    if b"\0" in head:
        raw.close()
        raise UserError(f"{inp.display}: looks like a binary file (NUL bytes); only UTF-8 text is supported")
    return tap, stream


def _gzip_errors(inp: FileInput, read: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from read
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a truncated or corrupt .gz: the user's data
        raise UserError(f"{inp.display}: corrupt or truncated gzip data ({one_line(e)})") from None


class TextFile(FileInput):
    """One document: the whole file, cut into chunks at newlines."""

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        tap, stream = _open_tapped(self, tally)
        with tap.f, stream:
            blocks = _gzip_errors(self, iter(lambda: stream.read(chunks.CHUNK_BYTES), b""))
            first = True
            for chunk in chunks.cut_blocks(blocks, self._decode):
                if chunk:
                    yield chunk, first
                    first = False
            return tap.record(self.name)

    def _decode(self, data: bytes, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{self.display}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                            f"{offset + e.start}); convert it to UTF-8 first") from None


class JsonlFile(FileInput):
    """One document per non-blank line: the string in its `text_field`."""

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        tap, stream = _open_tapped(self, tally)
        with tap.f, stream:
            for lineno, raw in _gzip_errors(self, lines(stream)):
                where = f"{self.display}:{lineno}"
                if raw is None:
                    raise UserError(f"{where}: {too_long_line()} (a line is held whole to parse it); put a "
                                    "document that long in a text file of its own")
                yield from document_chunks(_json_text(raw, where, text_field))
            return tap.record(self.name)


def _json_text(raw: bytes, where: str, text_field: str) -> str:
    try:
        obj = json_value(raw)
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    except ValueError as e:
        raise UserError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise UserError(f"{where}: no string field {text_field!r} (pick the field with --text-field)")
    return obj[text_field]


# ----------------------------------------------------------------------------------------------
# JSON lines in bounded memory


def lines(stream: Any) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of each non-blank line of a binary stream, read in blocks; None in place of a line
    longer than chunks.MAX_LINE_BYTES, which is never held whole. So memory stays within a block and a line,
    whatever the file holds: a .gz of a billion newlines, a gigabyte without one."""
    limit, lineno = chunks.MAX_LINE_BYTES, 0
    head: list[bytes] = []  # the unfinished line's pieces (dropped once it is too long) and its length
    size = 0
    for block in iter(lambda: stream.read(chunks.CHUNK_BYTES), b""):
        if not size and not block.strip():  # only blank lines: counted, not split
            cut = block.rfind(b"\n") + 1
            lineno, tail = lineno + block.count(b"\n", 0, cut), block[cut:]
        else:
            *ended, tail = block.split(b"\n")
            for part in ended:
                lineno += 1
                if line := _line(head, part, size + len(part), limit):
                    yield lineno, None if line is _TOO_LONG else line
                head, size = [], 0
        size += len(tail)
        if size > limit:
            head = []
        elif tail:
            head.append(tail)
    if size and (line := _line(head, b"", size, limit)):
        yield lineno + 1, None if line is _TOO_LONG else line


_TOO_LONG = b"<too long>"


def _line(head: list[bytes], part: bytes, size: int, limit: int) -> bytes:
    """The line made of `head` and `part` (`size` bytes): b"" when blank, _TOO_LONG past `limit`."""
    if size > limit:
        return _TOO_LONG
    line = b"".join([*head, part]) if head else part
    return line if line.strip() else b""


def too_long_line() -> str:
    limit = chunks.MAX_LINE_BYTES
    return f"a line longer than {f'{limit >> 20} MiB' if limit % (1 << 20) == 0 else f'{limit} bytes'}"


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def json_value(raw: bytes) -> Any:
    """One JSON text (a line) -> its value. ValueError if it is not JSON: UnicodeDecodeError (a subclass) when
    it is not UTF-8, "nested too deeply" past Python's recursion limit. A lone UTF-16 surrogate, which JSON
    can spell ("\\ud800") but no UTF-8 text holds, becomes U+FFFD, as tiktoken makes it."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return _replace_surrogates(value) if _SURROGATE_ESCAPE.search(raw) else value


def _replace_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate in its strings (dict keys too) replaced by U+FFFD, in place; no
    recursion, so as deep as json.loads went."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    stack = [value] if isinstance(value, (dict, list)) else []
    while stack:
        node = stack.pop()
        pairs = list(node.items() if isinstance(node, dict) else enumerate(node))
        if isinstance(node, dict):
            node.clear()
        for key, item in pairs:
            if isinstance(item, (dict, list)):
                stack.append(item)
            node[_replace_surrogates(key)] = _replace_surrogates(item) if isinstance(item, str) else item
    return value

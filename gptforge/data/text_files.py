"""Readers of text files and JSON-lines files, plain or gzip-compressed.

    a text file (.txt, .md, .txt.gz, any other name)   one document, read in chunks of about CHUNK_BYTES
    a JSON-lines file (.jsonl, .jsonl.gz, .json.gz)    one document per line, from the text field

Owns reading a file through a tap that hashes every byte (the manifest's sha256, computed on the way),
checking it is not binary, and the user errors of bad gzip, bad UTF-8 and bad JSON lines.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
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
            for lineno, raw in enumerate(_gzip_errors(self, iter(stream)), 1):
                if raw.strip():
                    yield from document_chunks(_json_text(raw, f"{self.display}:{lineno}", text_field))
            return tap.record(self.name)


def _json_text(raw: bytes, where: str, text_field: str) -> str:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    except ValueError as e:
        raise UserError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise UserError(f"{where}: no string field {text_field!r} (pick the field with --text-field)")
    return obj[text_field]

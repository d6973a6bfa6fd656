"""Readers of text files and JSON files, plain or gzip-compressed.

    a text file (.txt, .md, .txt.gz, any other name)   one document, read in chunks of about CHUNK_BYTES
    a JSON-lines file (.jsonl, .jsonl.gz, .json.gz)    one record per line (JsonlFile)
    a JSON file of conversations (.json, .json.gz)     JSON lines, or one JSON array of records (JsonFile;
                                                       gptforge.data.conversations reads these)

Owns reading a file through a tap that hashes every byte (the manifest's sha256, computed on the way),
checking a text file is not binary, the user errors of bad gzip and bad UTF-8, and decoding JSON in
bounded memory: a line at a time (`lines`), a record that cannot be decoded kept as a `Bad` row (bad
JSON, nested too deeply, not UTF-8, a line past chunks.MAX_LINE_BYTES), JSON's lone surrogates read as
U+FFFD (`json_value`), and a JSON array parsed whole only after checking it fits in free memory.
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
from gptforge.data.chunks import Bad, Chunks, FileInput, RowInput, Rows, Tally, one_line, text_chunks
from gptforge.errors import UserError

SNIFF_BYTES = 8192
ARRAY_BLOCK = 1 << 24  # a JSON array is read in blocks of this many bytes, checking free memory after each
ARRAY_MEMORY = 4  # parsing a JSON array holds about 4x its size (the bytes, their text, the rows: measured on Alpaca)


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


def _open_tapped(inp: FileInput, tally: Tally, refuse_binary: bool = True) -> tuple[_Tap, Any]:
    """(tap, binary stream of the decompressed content), after checking that a gzip file is one and, with
    `refuse_binary`, that the content is not binary."""
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
    if refuse_binary and b"\0" in head:
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


class JsonlFile(FileInput, RowInput):
    """One record per non-blank line. The text path refuses a binary file and stops at the first line that
    is not a JSON object with a string `text_field`; `rows` gives every line, undecodable ones as Bad rows."""

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        return text_chunks(self, self._rows(tally, refuse_binary=True), text_field)

    def rows(self, tally: Tally, columns: list[str] | None = None) -> Rows:
        return self._rows(tally, refuse_binary=False)

    def _rows(self, tally: Tally, refuse_binary: bool) -> Rows:
        tap, stream = _open_tapped(self, tally, refuse_binary)
        with tap.f, stream:
            yield from _gzip_errors(self, self._records(stream))
            return tap.record(self.name)

    def _records(self, stream: Any) -> Iterator[tuple[str, Any]]:
        for lineno, raw in lines(stream):
            yield f"{self.display}:{lineno}", json_record(raw)


class JsonFile(JsonlFile):
    """JSON lines, or, when the file starts with "[", one JSON array of records (Alpaca's layout), parsed whole
    after checking it fits in memory. A line of a JSON-lines file that is an array is a bad row like any other."""

    def _records(self, stream: Any) -> Iterator[tuple[str, Any]]:
        if stream.peek(SNIFF_BYTES)[:SNIFF_BYTES].lstrip()[:1] != b"[":
            yield from super()._records(stream)
            return
        yield from ((f"{self.display}[{i}]", row) for i, row in enumerate(json_array(stream, self.display), 1))


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


def json_record(raw: bytes | None) -> Any:
    """One line of `lines` -> its JSON value, or a Bad row saying why it has none."""
    if raw is None:
        return Bad(too_long_line(), " (a line is held whole to parse it); put a document that long in a text file "
                                    "of its own")
    try:
        return json_value(raw)
    except UnicodeDecodeError:
        return Bad("not UTF-8 text")
    except ValueError as e:  # "nested too deeply" included
        return Bad(f"invalid JSON ({getattr(e, 'msg', e)})")


def json_array(stream: Any, display: str) -> list[Any]:
    """The values of a stream holding one JSON array, read in blocks and refused as soon as parsing what it holds
    would not fit in free memory (gptforge.device.check_memory)."""
    # Here, not at the top: gptforge.device imports torch, seconds of start-up that only a JSON array needs.
    import torch

    from gptforge.device import check_memory

    blocks, n = [], 0
    while block := stream.read(ARRAY_BLOCK):
        blocks.append(block)
        n += len(block)
        check_memory(ARRAY_MEMORY * n, torch.device("cpu"), f"{display}: parsing this JSON array",
                     "write it as JSON lines, one row a line (e.g. jq -c '.[]' FILE > rows.jsonl), which are read "
                     "row by row")
    rows = json_record(b"".join(blocks))
    if isinstance(rows, Bad) or not isinstance(rows, list):
        raise UserError(f"{display}: not a JSON array of rows ({rows if isinstance(rows, Bad) else 'an object'})")
    return rows


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Rows nest a few levels (a list of messages, each an object). json.loads recurses once per level, so the depth it
# may reach is ours to bound, not the recursion limit's: torch.compile raises that limit to 2000, and a row nested
# past what the C stack holds would end the process instead of being skipped.
MAX_JSON_DEPTH = 200
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def json_value(raw: bytes) -> Any:
    """One JSON text (a line) -> its value. ValueError if it is not JSON: UnicodeDecodeError (a subclass) when
    it is not UTF-8, "nested too deeply" past MAX_JSON_DEPTH levels. A lone UTF-16 surrogate, which JSON
    can spell ("\\ud800") but no UTF-8 text holds, becomes U+FFFD, as tiktoken makes it."""
    # only a text with that many brackets can nest that deep: the scan is skipped for every ordinary row
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise ValueError("nested too deeply")
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

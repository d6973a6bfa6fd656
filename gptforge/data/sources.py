"""Corpus sources: SOURCE -> an ordered stream of documents, each read as non-empty chunks of text.

Owns what a SOURCE may be and how each kind of input is read with bounded memory:

    a text file (.txt, .md, .txt.gz, any other name)   one document, read in chunks of about CHUNK_BYTES
    a JSON-lines file (.jsonl, .jsonl.gz, .json.gz)    one document per line, from the text field
    a parquet file (.parquet)                          one document per row, read in record batches
    a folder                                           every file above under it, sorted by relative path
    hf:NAME[:CONFIG][@SPLIT]                           a Hugging Face dataset, streamed (split "train")
    shakespeare, pydoc                                 built-in corpora

and what the manifest says about each input: name, bytes and sha256 for a file; for a dataset its name,
config, split, revision and fingerprint. `read` walks the inputs from any (input, chunk) position, which
is how an interrupted `prepare` skips what it already encoded without tokenizing it again. The hf:
reader (the optional `datasets` package, its errors and its records) is gptforge.data.hf_dataset.

Long documents are cut at newlines where GPT-2's pre-tokenizer would split anyway (see `_cut`), so a
chunk never changes the tokens while a 10 GB file or a 100 MB row never sits in memory whole.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import secrets
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from gptforge.errors import UserError

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 30
BUILTINS = ("shakespeare", "pydoc")
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)

# Text is read and cut into chunks of about this many bytes, so a multi-GB file never sits in memory.
CHUNK_BYTES = 1 << 18
MAX_CHUNK_BYTES = 4 * CHUNK_BYTES
SNIFF_BYTES = 8192
PARQUET_BATCH_ROWS = 1024

Tally = Callable[[int], None]  # told how many source bytes were just read (for the progress bar)
Chunks = Generator[tuple[str, bool], None, dict[str, Any]]  # (text, starts a document); returns the record


def cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    if os.environ.get("GPTFORGE_CACHE"):
        return Path(os.environ["GPTFORGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge"


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Inputs and the corpus


@dataclass
class Input:
    """One input: a file, the documents of a built-in corpus, or a streamed Hugging Face dataset."""

    name: str  # in the manifest: path relative to a source folder, a file name, or the source itself
    display: str  # in error messages: the path as the user can find it
    kind: str  # "text" | "jsonl" | "parquet" | "texts" | "hf"
    size: int | None  # bytes, for the progress bar (None: unknown)
    path: Path | None = None
    mtime_ns: int = 0
    texts: list[str] | None = None
    dataset: Any = None  # a datasets.IterableDataset
    meta: dict[str, Any] = field(default_factory=dict)  # hf: what the manifest records besides bytes

    def stamp(self) -> list[Any]:
        """What must not change for an interrupted preparation to resume (checked without reading)."""
        if self.path is not None:
            return [self.name, self.size, self.mtime_ns]
        return [self.name, self.size, self.meta]

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        if self.kind == "texts":
            return _texts_chunks(self, tally)
        if self.kind == "parquet":
            return _parquet_chunks(self, text_field, tally)
        if self.kind == "hf":
            from gptforge.data import hf_dataset  # imported here, not above: it builds on this module

            return hf_dataset.hf_chunks(self, text_field, tally)
        return _file_chunks(self, text_field, tally)


@dataclass
class Corpus:
    source: str
    inputs: list[Input]
    text_field: str

    @property
    def total_bytes(self) -> int | None:
        sizes = [i.size for i in self.inputs]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def read(corpus: Corpus, tally: Tally, start: tuple[int, int] = (0, 0),
         on_input_done: Callable[[int, dict[str, Any]], None] | None = None
         ) -> Iterator[tuple[str, bool, int, int]]:
    """(text, starts_document, input_index, chunks_read_of_that_input) for every non-empty chunk.

    From `start` = (input, chunk): earlier inputs are not opened, and the first `chunk` chunks of
    `input` are read (so its sha256 is complete) but not yielded. `on_input_done(index, record)` gets
    the manifest record of each input read to its end."""
    first, skip = start
    for index in range(first, len(corpus.inputs)):
        gen = corpus.inputs[index].chunks(corpus.text_field, tally)
        n = 0
        while True:
            try:
                text, doc_start = next(gen)
            except StopIteration as stop:
                if on_input_done is not None:
                    on_input_done(index, stop.value)
                break
            n += 1
            if index == first and n <= skip:
                continue
            yield text, doc_start, index, n


# ----------------------------------------------------------------------------------------------
# Cutting text into chunks


def _is_plain(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E  # printable ASCII other than space


_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def _cut(buf: bytes) -> int:
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


def _cut_blocks(blocks: Iterable[bytes], decode: Callable[[bytes, int], str]) -> Iterator[str]:
    """Blocks of bytes -> text chunks ending at `_cut` points; `decode(data, offset)` makes them text."""
    buf, offset = b"", 0
    for block in blocks:
        buf += block
        if cut := _cut(buf):
            yield decode(buf[:cut], offset)
            buf, offset = buf[cut:], offset + cut
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
    yield from _cut_blocks(blocks, lambda b, _offset: b.decode("utf-8", "surrogatepass"))


def document_chunks(text: str) -> Iterator[tuple[str, bool]]:
    """(chunk, starts_the_document) for one document; an empty document has none."""
    first = True
    for piece in _pieces(text):
        yield piece, first
        first = False


# ----------------------------------------------------------------------------------------------
# Files: text and JSON lines (plain or gzip), parquet


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


def _cannot_read(inp: Input, e: OSError) -> UserError:
    return UserError(f"{inp.display}: cannot read it ({e.strerror or one_line(e)})")


def _open_tapped(inp: Input, tally: Tally) -> tuple[_Tap, Any]:
    """(tap, binary stream of the decompressed content), after checking the content is not binary."""
    assert inp.path is not None
    try:
        raw = open(inp.path, "rb")
    except OSError as e:
        raise _cannot_read(inp, e) from None
    tap = _Tap(raw, tally)
    stream: Any = io.BufferedReader(tap, CHUNK_BYTES)
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


def _gzip_errors(inp: Input, read: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from read
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a truncated or corrupt .gz: the user's data
        raise UserError(f"{inp.display}: corrupt or truncated gzip data ({one_line(e)})") from None


def _file_chunks(inp: Input, text_field: str, tally: Tally) -> Chunks:
    tap, stream = _open_tapped(inp, tally)
    with tap.f, stream:
        if inp.kind == "jsonl":
            for lineno, raw in enumerate(_gzip_errors(inp, iter(stream)), 1):
                if raw.strip():
                    yield from document_chunks(_json_text(raw, f"{inp.display}:{lineno}", text_field))
        else:
            def decode(data: bytes, offset: int) -> str:
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{inp.display}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                                    f"{offset + e.start}); convert it to UTF-8 first") from None

            blocks = _gzip_errors(inp, iter(lambda: stream.read(CHUNK_BYTES), b""))
            first = True
            for chunk in _cut_blocks(blocks, decode):
                if chunk:
                    yield chunk, first
                    first = False
        return tap.record(inp.name)


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


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow: pip install pyarrow (or 'gptforge[hf]')") from None
    return pq


def _parquet_file(inp: Input, text_field: str) -> Any:
    """The opened file, after checking it has a string column `text_field` (footer only)."""
    pq = _pyarrow()
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(inp.path)
    except OSError as e:
        raise _cannot_read(inp, e) from None
    except (pa.ArrowException, ValueError) as e:
        raise UserError(f"{inp.display}: not a readable parquet file ({one_line(e)})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{inp.display}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "pick the column with --text-field")
    kind = schema.field(text_field).type
    is_text = [pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None)]
    if not any(f is not None and f(kind) for f in is_text):
        raise UserError(f"{inp.display}: column {text_field!r} holds {kind}, not text; "
                        "pick the text column with --text-field")
    return pf


def _parquet_chunks(inp: Input, text_field: str, tally: Tally) -> Chunks:
    import pyarrow as pa

    pf = _parquet_file(inp, text_field)
    rows, told = pf.metadata.num_rows, 0
    done = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field], use_threads=False):
            for text in batch.column(0).to_pylist():
                if text:  # null and "" are empty documents, skipped like empty files
                    yield from document_chunks(text)
            done += batch.num_rows
            share = (inp.size or 0) * done // max(rows, 1)  # progress in file bytes, by rows read
            tally(share - told)
            told = share
    except pa.ArrowException as e:
        raise UserError(f"{inp.display}: cannot read this parquet file ({one_line(e)})") from None
    finally:
        pf.close()
    tally((inp.size or 0) - told)
    assert inp.path is not None
    return {"name": inp.name, "bytes": inp.path.stat().st_size, "sha256": sha256_file(inp.path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _file_kind(name: str) -> str | None:
    lower = name.lower()
    for kind, suffixes in (("parquet", PARQUET_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if lower.endswith(suffixes):
            return kind
    return None


def _file_input(path: Path, name: str, display: str) -> Input:
    try:
        st = path.stat()
    except OSError as e:
        raise UserError(f"{display}: cannot read it ({e.strerror})") from None
    return Input(name=name, display=display, kind=_file_kind(path.name) or "text", size=st.st_size, path=path,
                 mtime_ns=st.st_mtime_ns)


def _folder_inputs(root: Path, source: str) -> list[Input]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and _file_kind(name) is not None:
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise UserError(f"{source}: no .txt, .md, .jsonl or .parquet files in this folder (hidden files are skipped)")
    found.sort()
    return [_file_input(path, rel, os.path.join(source, rel)) for rel, path in found]


# ----------------------------------------------------------------------------------------------
# Built-in corpora


def _texts_chunks(inp: Input, tally: Tally) -> Chunks:
    assert inp.texts is not None
    h = hashlib.sha256()
    for text in inp.texts:
        data = text.encode("utf-8")
        h.update(data)
        tally(len(data))
        yield from document_chunks(text)
    return {"name": inp.name, "bytes": inp.size, "sha256": h.hexdigest()}


def download(url: str, what: str, hint: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The bytes at url; offline or on any network error, one UserError line naming `what` and the way out."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = " ".join(str(getattr(e, "reason", e)).split())
        raise UserError(f"could not download {what} from {url} (offline?): {reason}; {hint}") from None


def fetch_shakespeare() -> Path:
    """The tinyshakespeare file, from the cache or downloaded (sha256-checked) into it."""
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file() and sha256_file(cached) == SHAKESPEARE_SHA256:
        return cached
    data = download(SHAKESPEARE_URL, "tinyshakespeare", "download it yourself and pass the file's path as SOURCE")
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"the downloaded tinyshakespeare has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                        f"not using it (from {SHAKESPEARE_URL})")
    return write_cached(cached, data)


def write_cached(cached: Path, data: bytes) -> Path:
    """Store a download in the cache atomically (a concurrent reader sees no file or the whole file)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.parent / f".{cached.name}.{secrets.token_hex(6)}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the download cache {cached.parent} ({e.strerror}); "
                        "set GPTFORGE_CACHE to a writable folder") from None
    return cached


# ----------------------------------------------------------------------------------------------
# SOURCE


def open_source(source: str, text_field: str) -> Corpus:
    """SOURCE -> Corpus. An existing path wins over a built-in name; "hf:" always means a dataset."""
    if source.startswith(HF_PREFIX):
        from gptforge.data import hf_dataset  # imported here, not above: it builds on this module

        return Corpus(source, [hf_dataset.open_hf(source, text_field)], text_field)
    path = Path(source).expanduser()
    if path.is_dir():
        inputs = _folder_inputs(path, source)
    elif path.is_file():
        inputs = [_file_input(path, path.name, source)]
    elif source == "shakespeare":
        file = fetch_shakespeare()
        inputs = [_file_input(file, "tinyshakespeare.txt", str(file))]
    elif source == "pydoc":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise UserError("this Python has no pydoc_data module (some distributions strip it); "
                            "pass a file or folder as SOURCE") from None
        texts = [topics[key] for key in sorted(topics)]
        size = sum(len(t.encode("utf-8")) for t in texts)
        inputs = [Input("pydoc_data.topics", "pydoc_data.topics", "texts", size, texts=texts)]
    else:
        raise UserError(f"{source}: no such file or folder, and not a built-in source ({', '.join(BUILTINS)}) "
                        "or a Hugging Face dataset (hf:NAME)")
    for inp in inputs:
        if inp.kind == "parquet":  # a missing column is found now, not hours into the run
            _parquet_file(inp, text_field).close()
    return Corpus(source, inputs, text_field)

"""`gptforge prepare`: a text corpus -> token files + tokenizer + manifest, written atomically.

Owns: reading sources (a text file, a folder of .txt/.md files, a .jsonl file, or a built-in corpus),
building the tokenizer on them, streaming the encoded tokens to disk with an end-of-text token *between*
documents, splitting train / test / val by token count, and the layout of a data directory:

    DATA_DIR/train.bin, val.bin, [test.bin]   flat uint16 (or uint32) arrays, np.memmap-able
    DATA_DIR/tokenizer.json                   the complete tokenizer (gptforge.tokenizer)
    DATA_DIR/manifest.json                    format, tokenizer, dtype, split sizes, input hashes

The output is a pure function of the input: no timestamps, no absolute paths, so preparing the same
corpus twice gives byte-identical files. Memory stays bounded by one batch of chunks, not the corpus.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import itertools
import json
import os
import secrets
import shutil
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptforge import __version__
from gptforge.config import save_json
from gptforge.errors import UserError
from gptforge.tokenizer import CharTokenizer, Tokenizer, check_tokenizer_args, train_tokenizer, train_bpe

MANIFEST_FORMAT = "gptforge-tokens/1"
MANIFEST_FILE = "manifest.json"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 30
BUILTINS = ("shakespeare", "pydoc")
TEXT_SUFFIXES = (".txt", ".md")

# Text files are read and encoded in chunks of about this many bytes, so a multi-GB file never sits
# in memory; a batch of chunks is encoded at once so tiktoken / HF tokenizers can use their threads.
CHUNK_BYTES = 1 << 18
MAX_CHUNK_BYTES = 4 * CHUNK_BYTES
BATCH_CHARS = 1 << 22
BATCH_ITEMS = 1024
COPY_TOKENS = 1 << 22  # tokens per block when splitting the all-tokens file
SNIFF_BYTES = 8192


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    if os.environ.get("GPTFORGE_CACHE"):
        return Path(os.environ["GPTFORGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge"


# ----------------------------------------------------------------------------------------------
# Sources: what the corpus is made of, and how it reads as documents of text chunks.


@dataclass
class _Input:
    """One input: a file on disk, or in-memory documents of a built-in corpus."""

    name: str  # in the manifest: path relative to a source folder, a file name, or a built-in's name
    display: str  # in error messages: the path as the user can find it
    size: int  # bytes, for the progress bar
    path: Path | None = None
    jsonl: bool = False
    texts: list[str] | None = None


@dataclass
class _Corpus:
    inputs: list[_Input]
    text_field: str

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.inputs)

    def documents(self, tally: Callable[[int, bytes], None]) -> Iterator[Iterator[str]]:
        """Each document as an iterator of text chunks; `tally(input_index, raw)` sees every byte read.

        A document's chunks must be consumed before asking for the next document."""
        for index, inp in enumerate(self.inputs):
            seen = functools.partial(tally, index)
            if inp.texts is not None:
                for text in inp.texts:
                    seen(text.encode("utf-8"))
                    yield iter((text,))
            elif inp.jsonl:
                yield from _jsonl_documents(inp, seen, self.text_field)
            else:
                yield _text_chunks(inp, seen)


def _open_text(inp: _Input) -> Any:
    """The input opened for binary reading, after checking it is not a binary file."""
    assert inp.path is not None
    try:
        f = open(inp.path, "rb")
    except OSError as e:
        raise UserError(f"{inp.display}: cannot read it ({e.strerror})") from None
    if b"\0" in f.read(SNIFF_BYTES):
        f.close()
        raise UserError(f"{inp.display}: looks like a binary file (NUL bytes); only UTF-8 text is supported")
    f.seek(0)
    return f


def _decode(data: bytes, inp: _Input, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{inp.display}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
                        "convert it to UTF-8 first") from None


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


def _text_chunks(inp: _Input, seen: Callable[[bytes], None]) -> Iterator[str]:
    with _open_text(inp) as f:
        buf, offset = b"", 0
        while block := f.read(CHUNK_BYTES):
            seen(block)
            buf += block
            if cut := _cut(buf):
                yield _decode(buf[:cut], inp, offset)
                buf, offset = buf[cut:], offset + cut
        if buf:
            yield _decode(buf, inp, offset)


def _jsonl_documents(inp: _Input, seen: Callable[[bytes], None], field: str) -> Iterator[Iterator[str]]:
    with _open_text(inp) as f:
        for lineno, raw in enumerate(f, 1):
            seen(raw)
            if not raw.strip():
                continue
            where = f"{inp.display}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            except ValueError as e:
                raise UserError(f"{where}: invalid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise UserError(f"{where}: no string field {field!r} (pick the field with --text-field)")
            yield iter((obj[field],))


def _folder_inputs(root: Path, source: str) -> list[_Input]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in TEXT_SUFFIXES:
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise UserError(f"{source}: no .txt or .md files in this folder (hidden files are skipped)")
    found.sort()
    return [_Input(name=rel, display=os.path.join(source, rel), size=path.stat().st_size, path=path)
            for rel, path in found]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch_shakespeare() -> Path:
    """The tinyshakespeare file, from the cache or downloaded (sha256-checked) into it."""
    cached = cache_dir() / "tinyshakespeare.txt"
    if cached.is_file() and _sha256_file(cached) == SHAKESPEARE_SHA256:
        return cached
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = " ".join(str(getattr(e, "reason", e)).split())
        raise UserError(f"could not download tinyshakespeare from {SHAKESPEARE_URL} (offline?): {reason}; "
                        "download it yourself and pass the file's path as SOURCE") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"the downloaded tinyshakespeare has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                        f"not using it (from {SHAKESPEARE_URL})")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.parent / f".tinyshakespeare.{secrets.token_hex(6)}.tmp"
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


def _open_source(source: str, text_field: str) -> _Corpus:
    path = Path(source).expanduser()
    if path.is_dir():
        return _Corpus(_folder_inputs(path, source), text_field)
    if path.is_file():
        inp = _Input(name=path.name, display=source, size=path.stat().st_size, path=path,
                     jsonl=path.suffix.lower() == ".jsonl")
        return _Corpus([inp], text_field)
    if source == "shakespeare":
        file = fetch_shakespeare()
        return _Corpus([_Input("tinyshakespeare.txt", str(file), file.stat().st_size, path=file)], text_field)
    if source == "pydoc":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise UserError("this Python has no pydoc_data module (some distributions strip it); "
                            "pass a file or folder as SOURCE") from None
        texts = [topics[key] for key in sorted(topics)]
        size = sum(len(t.encode("utf-8")) for t in texts)
        return _Corpus([_Input("pydoc_data.topics", "pydoc_data.topics", size, texts=texts)], text_field)
    raise UserError(f"{source}: no such file or folder, and not a built-in source ({', '.join(BUILTINS)})")


# ----------------------------------------------------------------------------------------------
# Encoding


class _TokenWriter:
    """Encodes batches of chunks and appends the ids to a file, with EOT between documents."""

    def __init__(self, f: Any, tok: Tokenizer, dtype: np.dtype):
        self.f, self.tok, self.dtype = f, tok, dtype
        self.n_tokens = 0
        self.n_docs = 0
        self._texts: list[str] = []
        self._starts: list[bool] = []
        self._chars = 0

    def add(self, text: str, doc_start: bool) -> None:
        self._texts.append(text)
        self._starts.append(doc_start)
        self._chars += len(text)
        if self._chars >= BATCH_CHARS or len(self._texts) >= BATCH_ITEMS:
            self.flush()

    def flush(self) -> None:
        if not self._texts:
            return
        pieces: list[np.ndarray] = []
        for doc_start, ids in zip(self._starts, self.tok.encode_arrays(self._texts), strict=True):
            if doc_start:
                if self.n_docs:
                    if self.tok.eot_id is None:  # only a char vocab of a 1-document corpus lacks it
                        raise RuntimeError("the tokenizer has no end-of-text token for a multi-document corpus")
                    pieces.append(np.array([self.tok.eot_id], dtype=np.int64))
                self.n_docs += 1
            pieces.append(ids)
        arr = np.concatenate(pieces).astype(self.dtype)
        self.f.write(arr.tobytes())
        self.n_tokens += len(arr)
        self._texts, self._starts, self._chars = [], [], 0


def _chunks(corpus: _Corpus, tally: Callable[[int, bytes], None]) -> Iterator[tuple[str, bool]]:
    """(chunk, starts_a_document) over the corpus; empty documents and chunks are skipped."""
    for doc in corpus.documents(tally):
        first = True
        for chunk in doc:
            if chunk:
                yield chunk, first
                first = False


def _bar(corpus: _Corpus, desc: str, progress: bool) -> tqdm:
    return tqdm(total=corpus.total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not progress, file=sys.stderr, dynamic_ncols=True)


def _build_tokenizer(corpus: _Corpus, source: str, kind: str, vocab_size: int | None, progress: bool) -> Tokenizer:
    if kind == "gpt2":
        return train_tokenizer("gpt2", [])
    n_docs = 0
    desc = "char vocabulary" if kind == "char" else f"train bpe ({vocab_size})"
    with _bar(corpus, desc, progress) as bar:
        chunks = _chunks(corpus, lambda _index, raw: bar.update(len(raw)))
        first = next(chunks, None)
        if first is None:  # say so before HF trains a tokenizer on nothing
            raise _empty(source)

        def texts() -> Iterator[str]:
            nonlocal n_docs
            for chunk, doc_start in itertools.chain([first], chunks):
                n_docs += doc_start
                yield chunk

        if kind == "bpe":
            return train_bpe(texts(), vocab_size)  # type: ignore[arg-type]
        chars: set[str] = set()
        for text in texts():
            chars.update(text)
    # EOT only separates documents, so a one-document corpus needs none (nanoGPT's 65 chars).
    return CharTokenizer(chars, eot=n_docs > 1)


def _empty(source: str) -> UserError:
    return UserError(f"{source}: the corpus is empty (no text to tokenize)")


def _encode(corpus: _Corpus, tok: Tokenizer, path: Path, dtype: np.dtype, progress: bool
            ) -> tuple[_TokenWriter, list[dict[str, Any]]]:
    hashes = [hashlib.sha256() for _ in corpus.inputs]
    sizes = [0] * len(corpus.inputs)
    with open(path, "wb") as f, _bar(corpus, f"encode ({tok.kind})", progress) as bar:

        def tally(index: int, raw: bytes) -> None:
            hashes[index].update(raw)
            sizes[index] += len(raw)
            bar.update(len(raw))

        writer = _TokenWriter(f, tok, dtype)
        for chunk, doc_start in _chunks(corpus, tally):
            writer.add(chunk, doc_start)
        writer.flush()
        f.flush()
        os.fsync(f.fileno())
    inputs = [{"name": inp.name, "bytes": size, "sha256": h.hexdigest()}
              for inp, size, h in zip(corpus.inputs, sizes, hashes, strict=True)]
    return writer, inputs


# ----------------------------------------------------------------------------------------------
# Splits and the data directory


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Token counts in file order train, test, val (a split with fraction 0 is left out).

    val is the last int-rounded fraction of the corpus exactly as in nanoGPT (it starts at
    int(n * (1 - val_fraction))), and test is the int(n * test_fraction) tokens just before it. So val
    is identical whether or not a test split is asked for, which int(n * (1 - val - test)) for train
    would not guarantee (the two roundings can move the val boundary by one token)."""
    val_start = int(n * (1 - val_fraction)) if val_fraction > 0 else n
    n_test = int(n * test_fraction) if test_fraction > 0 else 0
    sizes = {"train": val_start - n_test}
    if test_fraction > 0:
        sizes["test"] = n_test
    if val_fraction > 0:
        sizes["val"] = n - val_start
    return sizes


def _write_splits(tmp: Path, all_path: Path, sizes: dict[str, int], tok: Tokenizer,
                  dtype: np.dtype) -> dict[str, dict[str, Any]]:
    """Copy test/val out of the all-tokens file, then truncate it into train.bin (no copy of train)."""
    token_bytes = tok.token_bytes()
    info: dict[str, dict[str, Any]] = {}
    start = 0
    with open(all_path, "r+b") as f:
        for name, count in sizes.items():
            n_bytes = 0
            f.seek(start * dtype.itemsize)
            with contextlib.nullcontext() if name == "train" else open(tmp / f"{name}.bin", "wb") as out:
                # np.fromfile blocks rather than a memmap: memory stays one block even for huge corpora.
                for lo in range(0, count, COPY_TOKENS):
                    block = np.fromfile(f, dtype=dtype, count=min(COPY_TOKENS, count - lo))
                    n_bytes += int(token_bytes[block].sum())
                    if out is not None:
                        out.write(block.tobytes())
                if out is not None:
                    out.flush()
                    os.fsync(out.fileno())
            info[name] = {"file": f"{name}.bin", "tokens": count, "bytes": n_bytes}
            start += count
        f.truncate(sizes["train"] * dtype.itemsize)
        f.flush()
        os.fsync(f.fileno())
    os.replace(all_path, tmp / "train.bin")
    return {name: info[name] for name in ("train", "val", "test") if name in info}


def _is_data_dir(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("gptforge-tokens/")


def _check_out(out: Path, shown: str, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"{shown} exists and is not a folder; choose another --out")
    if _is_data_dir(out):
        if not overwrite:
            raise UserError(f"{shown} already holds prepared data; pass --overwrite to replace it")
        return
    if any(out.iterdir()):
        # Never delete a folder we did not write, --overwrite or not.
        raise UserError(f"{shown} is not empty and is not a gptforge data folder (no valid {MANIFEST_FILE}); "
                        "refusing to replace it, choose another --out")


def _new_hidden_dir(out: Path, tag: str) -> Path:
    """A fresh hidden sibling of `out`. Not mkdtemp: its 0700 mode would end up on DATA_DIR itself."""
    while True:
        path = out.parent / f".{out.name}.{secrets.token_hex(6)}.{tag}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _install(tmp: Path, out: Path) -> None:
    """Swap the finished temp dir into place; the old DATA_DIR is removed only once the new one is in."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = _new_hidden_dir(out, "old")
    os.rename(out, old / "data")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "data", out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for flag, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"{flag} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--val-fraction + --test-fraction must be below 1 (leaving tokens to train on), "
                        f"got {val_fraction} + {test_fraction}")


def prepare(source: str, out: str | Path, tokenizer: str = "char", vocab_size: int | None = None,
            val_fraction: float = 0.1, test_fraction: float = 0.0, text_field: str = "text",
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize SOURCE into DATA_DIR `out`; returns the manifest (also written to out/manifest.json).

    SOURCE is a text file (one document), a folder (every *.txt / *.md under it, sorted by relative
    path, hidden entries skipped; one document each), a .jsonl file (one document per line, from
    `text_field`), or a built-in name: "shakespeare" (downloaded once into the cache) or "pydoc"
    (CPython's bundled reference docs, one document per topic). An existing path wins over a name.
    """
    source = os.fspath(source)
    check_tokenizer_args(tokenizer, vocab_size)
    _check_fractions(val_fraction, test_fraction)
    shown = os.fspath(out)
    out = Path(os.path.abspath(Path(out).expanduser()))
    _check_out(out, shown, overwrite)
    corpus = _open_source(source, text_field)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Built next to DATA_DIR (same filesystem, so the final rename is atomic) and hidden.
        tmp = _new_hidden_dir(out, "tmp")
    except OSError as e:
        raise UserError(f"cannot write next to {shown}: {e.strerror or e}") from None
    try:
        tok = _build_tokenizer(corpus, source, tokenizer, vocab_size, progress)
        tok.save(tmp)
        dtype = token_dtype(tok.vocab_size)
        all_path = tmp / "all-tokens.bin"
        writer, inputs = _encode(corpus, tok, all_path, dtype, progress)
        if writer.n_docs == 0:
            raise _empty(source)
        n = writer.n_tokens
        sizes = split_sizes(n, val_fraction, test_fraction)
        for name, count in sizes.items():
            if count < 2:
                raise UserError(f"corpus too small for a {name} split: {n} tokens in all leave it {count} "
                                "(it needs at least 2); use more text or change the split fractions")
        splits = _write_splits(tmp, all_path, sizes, tok, dtype)
        manifest = {
            "format": MANIFEST_FORMAT,
            "gptforge_version": __version__,
            "source": source,
            "documents": writer.n_docs,
            "inputs": inputs,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                          "fingerprint": tok.fingerprint(), "file": "tokenizer.json"},
            "dtype": dtype.name,
            "tokens": n,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "splits": splits,
        }
        save_json(manifest, tmp / MANIFEST_FILE)
        _check_out(out, shown, overwrite)  # it may have changed while we worked
        _install(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, I/O error, a file vanishing: not a bug, one line
            raise UserError(f"preparing {shown} failed: {e.strerror or e} ({e.filename or 'no file'})") from None
        raise
    return manifest

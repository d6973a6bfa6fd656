"""A GGUF file run by llama.cpp itself, to check an export against gptforge: tokens, the logits of every
position, a greedy continuation, its chat template and decode speed.

Through llama.cpp's C library as the `llama-cpp-py-sync` wheel ships it prebuilt (no compiler; part of the dev
extra). The wheel's `Llama` class loads the model and context; the calls here go to the C functions directly
(`llama_decode`, `llama_get_logits_ith`, `llama_chat_apply_template`), since its own helpers ask for the
last position's logits only and sample with a fixed chain. The KV cache is float32 by default here
(llama.cpp's own default is f16), so an f32 file's logits can be compared with ours to float32 rounding.

The wheel's libraries ask for glibc 2.38 (Debian 13, Ubuntu 24.04) only for the C23 spellings of strtol,
strtoul, strtoull and sscanf. On an older glibc `_libraries` loads copies of them in which those four name the
classic functions (identical on every input but "0b" prefixes), made once into a cache folder; the wheel's
own files are never changed.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gptforge.errors import UserError
from gptforge.files import atomic_write

INSTALL_HINT = "pip install llama-cpp-py-sync"
_C23 = (b"strtol", b"strtoul", b"strtoull", b"sscanf")


def _elf_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        h ^= (h & 0xF0000000) >> 24
        h &= 0x0FFFFFFF
    return h


def _sections(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, size, link, info) of each section of a 64-bit little-endian ELF file."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count = struct.unpack_from("<HH", data, 0x3A)
    return [struct.unpack_from("<4xI16xQQII", data, shoff + i * entsize) for i in range(count)]


def _without_glibc_238(data: bytearray) -> bytearray:
    """`data` (a shared library) with its needs of GLIBC_2.38 pointed at GLIBC_2.2.5 and the __isoc23_ names of
    `_C23` renamed to the classic ones (in place in the dynamic string table: each new name is a suffix)."""
    secs = _sections(data)
    verneed = next((s for s in secs if s[0] == 0x6FFFFFFE), None)  # SHT_GNU_verneed
    if verneed is None:
        return data
    _, off, _, link, count = verneed
    strtab, size = secs[link][1], secs[link][2]
    name = lambda o: bytes(data[strtab + o:data.index(b"\0", strtab + o)])  # noqa: E731
    aux = []  # (file, offset of the vernaux entry, version name, its string offset)
    for _ in range(count):
        _, n_aux, file, first, nxt = struct.unpack_from("<HHIII", data, off)
        a = off + first
        for _ in range(n_aux):
            _, _, _, nm, step = struct.unpack_from("<IHHII", data, a)
            aux.append((name(file), a, name(nm), nm))
            a += step
        off += nxt
    base = next(nm for f, _, v, nm in aux if f == b"libc.so.6" and v == b"GLIBC_2.2.5")
    for f, a, v, _ in aux:
        if f == b"libc.so.6" and v == b"GLIBC_2.38":
            struct.pack_into("<I", data, a, _elf_hash(b"GLIBC_2.2.5"))
            struct.pack_into("<I", data, a + 8, base)
    table = bytes(data[strtab:strtab + size])
    for sym in _C23:
        old, i = b"\0__isoc23_" + sym + b"\0", -1
        while (i := table.find(old, i + 1)) >= 0:
            data[strtab + i + 1:strtab + i + 2 + len(sym)] = sym + b"\0"
    return data


def _libraries():
    """The wheel's loaded llama library: as installed, or on a glibc older than 2.38 the patched copies."""
    from llama_cpp_py_sync import _cffi_bindings as bindings
    from llama_cpp_py_sync import __version__ as version

    try:
        return bindings.get_lib()
    except RuntimeError as e:
        if "GLIBC_2.38" not in str(e):
            raise
    src = Path(bindings.__file__).parent
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptforge" / f"llamacpp-{version}"
    if not (cache / "complete").exists():  # written last: a copy another process has half made is not used
        cache.mkdir(parents=True, exist_ok=True)
        for lib in sorted(src.glob("*.so*")):
            atomic_write(cache / lib.name, bytes(_without_glibc_238(bytearray(lib.read_bytes()))))
        atomic_write(cache / "complete", "")
    bindings._lib = bindings.ffi.dlopen(str(cache / "libllama.so"))
    return bindings._lib


def _quiet(lib, ffi) -> None:
    """Send llama.cpp's load-time log lines nowhere (kept alive on the module: the C side holds the pointer)."""
    global _NO_LOG
    if "_NO_LOG" not in globals():
        _NO_LOG = ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda *a: None)
        lib.llama_log_set(_NO_LOG, ffi.NULL)


class LlamaCpp:
    """One GGUF model and one llama.cpp context of `n_ctx` tokens."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: Optional[int] = None, kv_type: str = "f32",
                 quiet: bool = True):
        try:
            from llama_cpp_py_sync import Llama
            from llama_cpp_py_sync._cffi_bindings import get_ffi
        except ImportError:
            raise UserError(f"running a GGUF file in llama.cpp needs its library: {INSTALL_HINT}") from None
        lib = _libraries()
        if quiet:
            _quiet(lib, get_ffi())
        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, type_k=kv_type, type_v=kv_type)
        self.lib, self.ffi = self.llm._lib, self.llm._ffi
        self.n_ctx, self.n_vocab = n_ctx, self.llm.n_vocab

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """llama.cpp's ids of `text`; with `special`, control tokens written in the text (the chat markers) are
        read as those tokens, as llama-server reads a rendered chat template."""
        return self.llm.tokenize(text, add_special=False, parse_special=special)

    def piece(self, token: int) -> bytes:
        return self.llm._token_to_bytes(token)

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.llm._ctx), True)

    def _decode(self, ids: Sequence[int], start: int, all_logits: bool) -> None:
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
            if (rc := self.lib.llama_decode(self.llm._ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
        finally:
            self.lib.llama_batch_free(batch)

    def _row(self, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.llm._ctx, i)
        return np.frombuffer(self.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), n_vocab) float32: the logits after every position, from an empty cache."""
        if not 0 < len(ids) <= self.n_ctx:
            raise ValueError(f"need 1..{self.n_ctx} tokens, got {len(ids)}")
        self.reset()
        self._decode(ids, 0, all_logits=True)
        return np.stack([self._row(i) for i in range(len(ids))])

    def greedy(self, ids: Sequence[int], n: int, n_vocab: Optional[int] = None) -> list[int]:
        """The `n` tokens llama.cpp's logits pick by argmax after `ids` (the prompt in one batch, then one token
        per decode, as llama-cli runs); with `n_vocab`, among the first n_vocab ids only (the tokenizer's, as
        gptforge samples: padded rows were never targets)."""
        self.reset()
        self._decode(ids, 0, all_logits=False)
        out: list[int] = []
        for k in range(n):
            out.append(int(np.argmax(self._row(-1)[:n_vocab])))
            if k + 1 < n:
                self._decode(out[-1:], len(ids) + k, all_logits=False)
        return out

    def decode_speed(self, ids: Sequence[int], n: int) -> float:
        """Tokens per second of `n` greedy single-token decode steps after prefilling `ids` (prefill not timed)."""
        self.reset()
        self._decode(ids, 0, all_logits=False)
        token, t0 = int(np.argmax(self._row(-1))), time.perf_counter()
        for k in range(n):
            self._decode([token], len(ids) + k, all_logits=False)
            token = int(np.argmax(self._row(-1)))
        return n / (time.perf_counter() - t0)

    def is_eog(self, token: int) -> bool:
        """Whether llama.cpp ends a generation at `token` (its end-of-generation set)."""
        return bool(self.lib.llama_vocab_is_eog(self.lib.llama_model_get_vocab(self.llm._model), token))

    def metadata(self, key: str) -> Optional[str]:
        """The GGUF metadata value of `key` as llama.cpp read it, or None."""
        buf = self.ffi.new("char[65536]")
        n = self.lib.llama_model_meta_val_str(self.llm._model, key.encode(), buf, 65536)
        return None if n < 0 else self.ffi.string(buf, n).decode("utf-8")

    def builtin_chat_format(self, messages: list[dict[str, str]], add_assistant: bool = True) -> Optional[str]:
        """The conversation as `llama_chat_apply_template` lays it out from the file's template: llama.cpp's
        built-in formats, picked by the template's text (not Jinja). None when it recognises none."""
        tmpl = self.lib.llama_model_chat_template(self.llm._model, self.ffi.NULL)
        if tmpl == self.ffi.NULL:
            return None
        keep = [(self.ffi.new("char[]", m["role"].encode()), self.ffi.new("char[]", m["content"].encode()))
                for m in messages]
        arr = self.ffi.new("llama_chat_message[]", len(keep))
        for i, (role, content) in enumerate(keep):
            arr[i].role, arr[i].content = role, content
        size = 4096 + 4 * sum(len(m["content"]) for m in messages)
        buf = self.ffi.new(f"char[{size}]")
        n = self.lib.llama_chat_apply_template(tmpl, arr, len(keep), add_assistant, buf, size)
        return None if n < 0 else self.ffi.string(buf, n).decode("utf-8")

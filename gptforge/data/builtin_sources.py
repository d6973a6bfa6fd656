"""The built-in corpora, SOURCE shakespeare and SOURCE pydoc.

    shakespeare   tinyshakespeare (1.1 MB), downloaded once into the gptforge cache and sha256-checked
    pydoc         the topics of Python's own help(), one document each (no download)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge import downloads
from gptforge.data.chunks import Chunks, Input, Tally, document_chunks, sha256_file
from gptforge.data.text_files import TextFile
from gptforge.errors import UserError

BUILTINS = ("shakespeare", "pydoc")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def fetch_shakespeare() -> Path:
    """The tinyshakespeare file, from the cache or downloaded (sha256-checked) into it."""
    cached = downloads.cache_dir() / "tinyshakespeare.txt"
    if cached.is_file() and sha256_file(cached) == SHAKESPEARE_SHA256:
        return cached
    data = downloads.download(SHAKESPEARE_URL, "tinyshakespeare",
                              "download it yourself and pass the file's path as SOURCE")
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise UserError(f"the downloaded tinyshakespeare has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                        f"not using it (from {SHAKESPEARE_URL})")
    return downloads.write_cached(cached, data)


@dataclass
class Texts(Input):
    """Documents already in memory (a built-in corpus shipped with Python)."""

    name: str
    display: str
    texts: list[str]
    size: int | None = None

    def __post_init__(self) -> None:
        self.size = sum(len(t.encode("utf-8")) for t in self.texts)

    def stamp(self) -> list[Any]:
        return [self.name, self.size, {}]

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        h = hashlib.sha256()
        for text in self.texts:
            data = text.encode("utf-8")
            h.update(data)
            tally(len(data))
            yield from document_chunks(text)
        return {"name": self.name, "bytes": self.size, "sha256": h.hexdigest()}


def open_builtin(name: str) -> Input:
    """The input of built-in corpus `name` (one of BUILTINS)."""
    if name == "shakespeare":
        file = fetch_shakespeare()
        return TextFile.of(file, "tinyshakespeare.txt", str(file))
    try:  # here, not at the top: some Python distributions strip pydoc_data
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module (some distributions strip it); "
                        "pass a file or folder as SOURCE") from None
    return Texts("pydoc_data.topics", "pydoc_data.topics", [topics[key] for key in sorted(topics)])

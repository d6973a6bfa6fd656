"""Writing files so that nobody ever sees half of one (the one helper for atomic writes), and checking an
output directory before anything is written into it.

Every file gptforge writes in place of another (configs, tokenizers, reports, caches, metrics) goes through
`atomic_write` or `atomic_path`: the bytes go to a uniquely named sibling, are flushed to disk and renamed over
the target, so a kill leaves the old file or the new one, and two writers never share a temporary name.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from gptforge.errors import UserError


def temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh name beside `path` that no other writer uses (hidden, random, so concurrent writers cannot collide)."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is fsynced and renamed over `path`, on failure removed.

    Not mkstemp: its 0600 mode would make shared data folders unreadable to others; the file gets the usual
    mode for new files.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes], encoding: str = "utf-8") -> Path:
    """Write `data` (text or bytes) to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data.encode(encoding) if isinstance(data, str) else data)
    return path


def check_output_dir(out: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse a target that is, contains or lies inside a source (replacing our file names there would
    destroy the source), one that is a file, and without overwrite a non-empty one. With overwrite only the
    files gptforge writes are replaced later; the user's other files in the target stay."""
    target = out.resolve()
    for src in sorted(sources, key=lambda s: s.resolve() != target):  # "is the source" before the others
        s = src.resolve()
        if target == s or s in target.parents or target in s.parents:
            how = "is" if target == s else "lies inside" if s in target.parents else "contains"
            raise UserError(f"cannot write into {out}: it {how} the source {src}; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; choose another directory or pass --overwrite")

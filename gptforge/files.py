"""Writing files so that nobody ever sees half of one (the one helper for atomic writes), and checking an
output directory before anything is written into it.

Every file gptforge writes in place of another (configs, tokenizers, reports, caches, metrics) goes through
`atomic_write` or `atomic_path`: the bytes go to a uniquely named sibling, are flushed to disk and renamed over
the target, so a kill leaves the old file or the new one, and two writers never share a temporary name.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

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


def check_apart(out: Path, sources: Iterable[Path]) -> None:
    """Refuse a target that is, contains or lies inside a source (writing or replacing files there would
    destroy the source): one line naming both. Paths are compared resolved (symlinks followed; a link that
    loops or dangles stays as written, for the reader of the source to report)."""
    target = Path(os.path.realpath(out))
    real = {src: Path(os.path.realpath(src)) for src in sources}
    for src in sorted(real, key=lambda s: real[s] != target):  # "is the source" before the others
        s = real[src]
        if target == s or s in target.parents or target in s.parents:
            how = "is" if target == s else "lies inside" if s in target.parents else "contains"
            raise UserError(f"cannot write into {out}: it {how} the source {src}; choose a directory outside it")


def check_output_dir(out: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse a target that overlaps a source (`check_apart`), one that is a file, and without overwrite a
    non-empty one. With overwrite only the files gptforge writes are replaced later; the user's other files
    in the target stay."""
    check_apart(out, sources)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; choose another directory or pass --overwrite")


def path_problem(path: Union[str, os.PathLike], want: str = "file") -> Optional[str]:
    """Why `path` cannot be read as a `want` ("file" or "folder"), as the end of a one-line error
    (`f"config file {path} {problem}"`), or None when it can. Tells a missing path from a folder given for
    a file (and the reverse), a device or pipe (/dev/zero would be read forever), a dangling symbolic link
    and one that loops."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return "does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops back on itself"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of its path is a file, not a folder)"
        return f"cannot be read ({e.strerror or e})"
    if want == "folder":
        if stat.S_ISDIR(st.st_mode):
            return None
        return "is a file, not a folder" if stat.S_ISREG(st.st_mode) else "is not a folder (a device, pipe or socket)"
    if stat.S_ISREG(st.st_mode):
        return None
    return "is a folder, not a file" if stat.S_ISDIR(st.st_mode) else "is not a regular file (a device, pipe or socket)"


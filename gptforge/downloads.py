"""Downloads and the download cache: where cached files live, fetching a URL with a one-line error when
it fails, and storing what was fetched so that a concurrent reader sees no file or the whole file.

Used by the built-in corpora (gptforge.data.builtin_sources) and by HellaSwag (gptforge.hellaswag); each
checks what it downloaded (a hash, a parse) before it asks `write_cached` to keep it.
"""

from __future__ import annotations

import http.client
import os
import urllib.request
from pathlib import Path

from gptforge.errors import UserError, one_line
from gptforge.files import atomic_write

DOWNLOAD_TIMEOUT_S = 30


def cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    if os.environ.get("GPTFORGE_CACHE"):
        return Path(os.environ["GPTFORGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge"


def download(url: str, what: str, hint: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The bytes at url; offline or on any network error, one UserError line naming `what` and the way out."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = one_line(getattr(e, "reason", e))
        raise UserError(f"could not download {what} from {url} (offline?): {reason}; {hint}") from None


def write_cached(cached: Path, data: bytes) -> Path:
    """Store a download in the cache atomically (gptforge.files.atomic_write); returns its path."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(cached, data)
    except OSError as e:
        raise UserError(f"cannot write the download cache {cached.parent} ({e.strerror or one_line(e)}); "
                        "set GPTFORGE_CACHE to a writable folder") from None

"""The files `gptforge prepare` writes: its resumable work folder, and the data directory cut from it.

Owns the work folder and the token stream in it,

    DATA_DIR.partial/tokens-000000.bin, ...   the token stream in files of exactly shard_tokens tokens (the last: fewer)
    DATA_DIR.partial/progress.json            the stream's length and the reader's position at its last checkpoint
    DATA_DIR.partial/tokenizer.json           the tokenizer the stream is encoded with
    DATA_DIR.partial/lock                     flock-ed while a prepare writes the folder

so that a killed run resumes after its last finished file (what was written past it is cut off); then
cutting the finished stream into splits (train | test | val, by token count, each one file or numbered
shards) in a hidden folder next to DATA_DIR, and installing that folder as DATA_DIR in one rename,
without ever replacing a folder that is not prepared data or deleting a file gptforge did not write.

Also the one writer of a data directory for both paths, text and chat (`write_data_dir`): its split files
(written by the caller), tokenizer.json and manifest.json (`manifest`: the fields every data directory has,
in one order, around what each path adds), installed in one rename. What the tokens say is
gptforge.data.prepare's and gptforge.data.chat_prepare's; this module only moves them between files, durably.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptforge import __version__
from gptforge.config import save_json
from gptforge.data.chunks import one_line
from gptforge.errors import UserError
from gptforge.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

MANIFEST_FILE = "manifest.json"
PROGRESS_FORMAT = "gptforge-prepare-progress/1"
PROGRESS_FILE = "progress.json"
DEFAULT_VAL_FRACTION = 0.1
MANIFEST_FORMAT = "gptforge-tokens/1"
COPY_TOKENS = 1 << 20  # tokens per block when copying the boundary shards into splits


def _utf8_bytes(ids: np.ndarray, lengths: np.ndarray) -> int:
    """How many bytes of text `ids` stand for, in blocks so the temporary arrays stay small."""
    return sum(int(np.take(lengths, ids[i: i + COPY_TOKENS]).sum(dtype=np.int64))
               for i in range(0, len(ids), COPY_TOKENS))


# ----------------------------------------------------------------------------------------------
# The work dir: the token stream in fixed-size files, and the progress that makes it resumable


def _token_file(work: Path, index: int) -> Path:
    return work / f"tokens-{index:06d}.bin"


class TokenStream:
    """Appends tokens to work/tokens-NNNNNN.bin files of exactly `size` tokens (the last one: fewer),
    continuing from the last checkpoint: anything written after it is cut off."""

    def __init__(self, work: Path, size: int, dtype: np.dtype, token_bytes: np.ndarray, state: dict[str, Any]):
        self.work, self.size, self.dtype, self.token_bytes = work, size, dtype, token_bytes
        self.shard_bytes: list[int] = list(state["shard_bytes"])  # UTF-8 bytes of each finished file
        self.tail, self.tail_bytes = state["tail_tokens"], state["tail_bytes"]
        for path in work.glob("tokens-*.bin"):
            if int(path.stem.split("-")[1]) > len(self.shard_bytes):
                path.unlink()
        self.f: Any = None
        if self.tail:
            self.f = open(_token_file(work, len(self.shard_bytes)), "r+b")
            self.f.truncate(self.tail * dtype.itemsize)
            self.f.seek(0, os.SEEK_END)
        elif (path := _token_file(work, len(self.shard_bytes))).exists():
            path.unlink()

    @property
    def tokens(self) -> int:
        return len(self.shard_bytes) * self.size + self.tail

    def write(self, ids: np.ndarray) -> bool:
        """Append `ids`; True if that finished at least one file."""
        finished, pos = False, 0
        while pos < len(ids):
            piece = ids[pos: pos + self.size - self.tail]
            if self.f is None:
                self.f = open(_token_file(self.work, len(self.shard_bytes)), "wb")
            self.f.write(piece.tobytes())
            self.tail += len(piece)
            self.tail_bytes += _utf8_bytes(piece, self.token_bytes)
            pos += len(piece)
            if self.tail == self.size:
                self.sync()
                self.f.close()
                self.f = None
                self.shard_bytes.append(self.tail_bytes)
                self.tail = self.tail_bytes = 0
                finished = True
        return finished

    def checkpoint(self, state: dict[str, Any], **reader: Any) -> None:
        """Make what is written durable, then record it in progress.json together with `reader`
        (position, documents, inputs, complete): the tokens on disk and where reading resumes."""
        self.sync()  # before progress.json says they are there
        state.update(reader, shard_bytes=self.shard_bytes, tail_tokens=self.tail, tail_bytes=self.tail_bytes)
        save_state(self.work, state)

    def sync(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def save_state(work: Path, state: dict[str, Any]) -> None:
    save_json(state, work / PROGRESS_FILE)


def fresh_state(options: dict[str, Any], dtype: np.dtype) -> dict[str, Any]:
    return {"format": PROGRESS_FORMAT, "options": options, "dtype": dtype.name, "complete": False,
            "position": [0, 0], "documents": 0, "shard_bytes": [], "tail_tokens": 0, "tail_bytes": 0,
            "inputs": []}


_OURS = re.compile(r"(lock|progress\.json(\.tmp)?|\.progress\.json\..*\.tmp|tokenizer\.json|\.tokenizer\.json\..*\.tmp|tokens-\d{6}\.bin)")


def _damage(work: Path, state: dict[str, Any]) -> str | None:
    """What is wrong with a work dir's files, or None."""
    try:
        item = np.dtype(state["dtype"]).itemsize
        size = state["options"]["shard_tokens"]
        for i in range(len(state["shard_bytes"])):
            if _token_file(work, i).stat().st_size != size * item:
                return f"{_token_file(work, i).name} has the wrong size"
        tail = _token_file(work, len(state["shard_bytes"]))
        if state["tail_tokens"] and (not tail.exists() or tail.stat().st_size < state["tail_tokens"] * item):
            return f"{tail.name} is shorter than recorded"
        load_tokenizer(work)
    except (OSError, KeyError, TypeError, ValueError, UserError) as e:
        return one_line(e)
    return None


def open_work(work: Path, options: dict[str, Any], overwrite: bool) -> tuple[dict[str, Any] | None, Any]:
    """(the saved state to resume from, or None to start afresh; a lock held on the work dir)."""
    if work.is_dir():
        entries = [p.name for p in work.iterdir()]
        if not all(_OURS.fullmatch(name) for name in entries):
            raise UserError(f"{work} exists and is not a gptforge work folder; move it away or choose another --out")
    elif work.exists() or work.is_symlink():
        raise UserError(f"{work} exists and is not a folder; move it away or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / "lock", "a+b")
    try:
        import fcntl

        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock
        pass
    except OSError:
        lock.close()
        raise UserError(f"another gptforge prepare is writing {work}; wait for it to finish") from None
    try:
        state = json.loads((work / PROGRESS_FILE).read_text(encoding="utf-8"))
        assert isinstance(state, dict) and state.get("format") == PROGRESS_FORMAT
    except FileNotFoundError:
        state = None
    except (OSError, ValueError, AssertionError):
        state = {"options": None}
    if state is not None:
        problem = None
        if state.get("options") != options:
            old = state.get("options") or {}
            diff = [k for k in options if old.get(k) != options[k]] or ["format"]
            problem = f"was started with other options or inputs ({', '.join(diff)} differ)"
        elif damage := _damage(work, state):
            problem = f"is damaged ({damage})"
        if problem:
            if not overwrite:
                lock.close()
                raise UserError(f"{work} holds an interrupted preparation that {problem}; pass --overwrite to "
                                "discard it and start afresh")
            state = None
    if state is None:  # start afresh: clear what an earlier attempt left (all of it ours, checked above)
        for path in work.iterdir():
            if path.name != "lock":
                path.unlink()
    return state, lock


# ----------------------------------------------------------------------------------------------
# Splits and the data directory


def split_sizes(n: int, val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = 0.0,
                val_tokens: int | None = None, test_tokens: int | None = None) -> dict[str, int]:
    """Token counts in file order train, test, val (a split of fraction or count 0 is left out).

    val is the last int-rounded fraction of the corpus exactly as in nanoGPT (it starts at
    int(n * (1 - val_fraction))), or its last `val_tokens`; test is the int(n * test_fraction) (or
    `test_tokens`) tokens just before it. So val is identical whether or not a test split is asked for,
    which int(n * (1 - val - test)) for train would not guarantee (two roundings can move the boundary)."""
    if val_tokens is not None:
        n_val = val_tokens
    else:
        n_val = n - int(n * (1 - val_fraction)) if val_fraction > 0 else 0
    if test_tokens is not None:
        n_test = test_tokens
    else:
        n_test = int(n * test_fraction) if test_fraction > 0 else 0
    sizes = {"train": n - n_val - n_test}
    if (test_tokens if test_tokens is not None else test_fraction) > 0:
        sizes["test"] = n_test
    if (val_tokens if val_tokens is not None else val_fraction) > 0:
        sizes["val"] = n_val
    return sizes


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy of a finished shard: it becomes a train shard as it is
    except OSError:
        shutil.copyfile(src, dst)


def _copy_tokens(work: Path, lo: int, hi: int, size: int, dtype: np.dtype, token_bytes: np.ndarray,
                 dst: Path) -> int:
    """Copy tokens [lo, hi) of the stream into `dst` in blocks (memory: one block); their UTF-8 bytes."""
    n_bytes = 0
    with open(dst, "wb") as out:
        pos = lo
        while pos < hi:
            index, offset = divmod(pos, size)
            count = min(hi - pos, size - offset)
            with open(_token_file(work, index), "rb") as f:
                f.seek(offset * dtype.itemsize)
                for done in range(0, count, COPY_TOKENS):
                    block = np.fromfile(f, dtype=dtype, count=min(COPY_TOKENS, count - done))
                    n_bytes += _utf8_bytes(block, token_bytes)
                    out.write(block.tobytes())
            pos += count
        out.flush()
        os.fsync(out.fileno())
    return n_bytes


def write_splits(work: Path, tmp: Path, sizes: dict[str, int], state: dict[str, Any],
                 token_bytes: np.ndarray) -> dict[str, dict[str, Any]]:
    """Each split as shards of at most shard_tokens tokens in `tmp`; the work dir is only read.

    train starts at token 0, so its full shards are the work dir's files themselves (hard-linked);
    only the shards that straddle a split boundary are copied."""
    size, dtype = state["options"]["shard_tokens"], np.dtype(state["dtype"])
    info: dict[str, dict[str, Any]] = {}
    start = 0
    for name, count in sizes.items():
        n_files = -(-count // size)
        shards, n_bytes = [], 0
        for j in range(n_files):
            lo, hi = start + j * size, min(start + (j + 1) * size, start + count)
            file = f"{name}.bin" if n_files == 1 else f"{name}-{j:06d}.bin"
            if lo % size == 0 and hi - lo == size:
                _link_or_copy(_token_file(work, lo // size), tmp / file)
                n_bytes += state["shard_bytes"][lo // size]
            else:
                n_bytes += _copy_tokens(work, lo, hi, size, dtype, token_bytes, tmp / file)
            shards.append({"file": file, "tokens": hi - lo})
        info[name] = {**({"file": shards[0]["file"]} if n_files == 1 else {}), "tokens": count, "bytes": n_bytes,
                      "shards": shards}
        start += count
    return {name: info[name] for name in ("train", "val", "test") if name in info}


def _is_data_dir(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("gptforge-tokens/")


_SPLIT_FILE = re.compile(r"(train|val|test)(-\d{6})?(\.mask)?\.bin")  # the names prepare gives split files


def _ours(out: Path) -> set[str]:
    """The entries of data dir `out` that gptforge wrote: the manifest, the tokenizer, and the split and mask
    files the manifest lists, each a plain file named as prepare names them. Every other entry is the user's."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    listed = {MANIFEST_FILE, TOKENIZER_FILE}
    for split in (splits.values() if isinstance(splits, dict) else ()):
        entries = [split, *split.get("shards", ())] if isinstance(split, dict) else []
        listed |= {e.get(key) for e in entries if isinstance(e, dict) for key in ("file", "mask")}
    return {name for name in listed if isinstance(name, str)
            and (name in (MANIFEST_FILE, TOKENIZER_FILE) or _SPLIT_FILE.fullmatch(name))
            and stat.S_ISREG(os.lstat(out / name).st_mode if os.path.lexists(out / name) else 0)}


def out_path(out: str | os.PathLike) -> tuple[Path, str]:
    """(DATA_DIR made absolute, DATA_DIR as the user wrote it, for messages); an empty name is refused (it
    would mean the current folder)."""
    shown = os.fspath(out)
    if not shown:
        raise UserError("--out is empty ''; name the data directory to write")
    return Path(os.path.abspath(Path(shown).expanduser())), shown


def check_out(out: Path, shown: str, overwrite: bool) -> None:
    """Refuse an `out` that must not be replaced: a file, a symbolic link, a non-empty folder that is not
    prepared data, prepared data without `overwrite`, or with it an entry gptforge would replace that its
    manifest does not list; and any `out` whose last --overwrite was cut short (`install`). `shown` is `out`
    as the user wrote it."""
    if out.parent.is_dir() and (old := next(out.parent.glob(f".{glob.escape(out.name)}.*.old"), None)):
        raise UserError(f"an earlier --overwrite of {shown} was interrupted: {old} may hold your files; move what "
                        f"you need back into {shown}, then delete {old}")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"{shown} exists and is not a folder; choose another --out")
    if out.is_symlink():  # replacing it would move the link, not the folder, and the files in it with it
        raise UserError(f"{shown} is a symbolic link; pass the folder it points to ({os.path.realpath(out)}) as --out")
    if _is_data_dir(out):
        if not overwrite:
            raise UserError(f"{shown} already holds prepared data; pass --overwrite to replace it")
        ours = _ours(out)
        if stray := sorted(p.name for p in out.iterdir() if _SPLIT_FILE.fullmatch(p.name) and p.name not in ours):
            raise UserError(f"{os.path.join(shown, stray[0])} is not listed in its {MANIFEST_FILE} (gptforge did not "
                            f"write it) and --overwrite would replace it; move it away")
        return
    if any(out.iterdir()):
        # Never delete a folder we did not write, --overwrite or not.
        raise UserError(f"{shown} is not empty and is not a gptforge data folder (no valid {MANIFEST_FILE}); "
                        "refusing to replace it, choose another --out")


def new_hidden_dir(out: Path, tag: str) -> Path:
    """A fresh hidden sibling of `out`. Not mkdtemp: its 0700 mode would end up on DATA_DIR itself."""
    while True:
        path = out.parent / f".{out.name}.{secrets.token_hex(6)}.{tag}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def install(tmp: Path, out: Path, shown: str) -> None:
    """Swap the finished temp dir in as `out`, in one rename, keeping the user's entries of an old `out`.

    The old `out` is renamed to a hidden OLD/data first, the new one into place, then the user's entries (all
    but `_ours`) are moved across and ours deleted, file by file: nothing is removed wholesale. Should that
    be cut short, what is left is in OLD, which the next prepare of `out` points to (check_out)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    ours = _ours(out)
    mine = sorted(name for name in os.listdir(out) if name not in ours)
    if clash := [name for name in mine if os.path.lexists(tmp / name)]:
        raise UserError(f"{os.path.join(shown, clash[0])} is not a file gptforge wrote, and the new data has one "
                        "by that name; move it away")
    old = new_hidden_dir(out, "old")
    os.rename(out, old / "data")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "data", out)
        old.rmdir()
        raise
    _move_back(old, out, shown, mine, ours)


def _move_back(old: Path, out: Path, shown: str, mine: list[str], ours: set[str]) -> None:
    """`install`'s last step: the user's entries `mine` from OLD/data into the new `out`, then our old files
    deleted by name and OLD removed (rmdir: it fails, rather than delete, if anything else is left)."""
    try:
        for name in mine:
            os.rename(old / "data" / name, out / name)
    except OSError as e:
        raise UserError(f"the new data is in {shown}, but moving the rest back failed ({e.strerror or e}): your "
                        f"other files in {shown} are in {old / 'data'}; move them back, then delete {old}") from None
    try:
        for name in ours:
            (old / "data" / name).unlink(missing_ok=True)
        (old / "data").rmdir()
        old.rmdir()
    except OSError as e:
        raise UserError(f"the new data is in {shown}, but removing the old one from {old} failed "
                        f"({e.strerror or e}); look through it and delete it") from None


# ----------------------------------------------------------------------------------------------
# What every prepared directory shares (text and chat alike)


Splits = dict[str, dict[str, Any]]  # split name -> its files, tokens and counts, as the manifest lists them


def manifest(source: str, tok: Tokenizer, splits: Splits, *, read: dict[str, Any], split: dict[str, Any],
             kind: str | None = None) -> dict[str, Any]:
    """A data directory's manifest: format, kind (none for text, which the loader assumes), version, source,
    `read` (what was read: documents, inputs, bad rows), the tokenizer, dtype and token count, `split` (how
    it was split: fractions, token counts, shard size) and the splits, train, val, test."""
    chat = {"chat": tok.chat.to_dict()} if tok.chat is not None else {}
    return {
        "format": MANIFEST_FORMAT, **({"kind": kind} if kind else {}), "gptforge_version": __version__,
        "source": source, **read,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "fingerprint": tok.fingerprint(), "file": TOKENIZER_FILE, **chat},
        "dtype": token_dtype(tok.vocab_size).name, "tokens": sum(s["tokens"] for s in splits.values()),
        **split,
        "splits": {name: splits[name] for name in ("train", "val", "test") if name in splits},
    }


def write_data_dir(out: Path, shown: str, overwrite: bool, tok: Tokenizer, write_splits: Callable[[Path], Splits],
                   describe: Callable[[Splits], dict[str, Any]],
                   taken: Callable[[UserError], UserError] | None = None) -> dict[str, Any]:
    """Write DATA_DIR `out` and return its manifest: in a fresh hidden sibling (the same filesystem, so the
    final rename is atomic), `write_splits(folder)` writes the split files, then the tokenizer and
    `describe(splits)` (a `manifest`) go beside them, and the folder is installed as `out`, after checking
    `out` again (it may have changed while we worked; `taken` may say more then). On any failure nothing
    is left behind and an old `out` is as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_hidden_dir(out, "tmp")
    try:
        made = describe(write_splits(tmp))
        tok.save(tmp)
        save_json(made, tmp / MANIFEST_FILE)
        try:
            check_out(out, shown, overwrite)
        except UserError as e:
            raise (taken(e) if taken else e) from None
        install(tmp, out, shown)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return made


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_splits(val_fraction: float | None, test_fraction: float | None, val_tokens: int | None,
                  test_tokens: int | None) -> tuple[float, float]:
    """The fractions to use (0 where a token count is given instead), after checking every value."""
    for split, fraction, tokens in (("val", val_fraction, val_tokens), ("test", test_fraction, test_tokens)):
        if fraction is not None and tokens is not None:
            raise UserError(f"--{split}-fraction and --{split}-tokens both given; pass one of them")
        if tokens is not None and not (is_count(tokens) and tokens >= 0):
            raise UserError(f"--{split}-tokens must be a whole number >= 0, got {tokens!r}")
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION if val_tokens is None else 0.0
    test_fraction = test_fraction or 0.0
    for flag, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"{flag} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--val-fraction + --test-fraction must be below 1 (leaving tokens to train on), "
                        f"got {val_fraction} + {test_fraction}")
    return val_fraction, test_fraction

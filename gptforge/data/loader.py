"""Reading prepared token files: the data directory, its splits as token streams, and batches.

A data directory (written by `gptforge prepare`) holds each split as one or more flat token files
(shards), read with np.memmap so a corpus far larger than memory costs nothing to open; a split of
several shards reads as one stream. Conversation data (manifest kind "chat") has a uint8 loss-mask
file beside each shard, one byte per token, memory-mapped the same way (`TokenData.mask`). Nothing in a data directory is trusted: `open_data` checks its
manifest, tokenizer and shard files (cheaply, without reading the shards) before anything is read.

Batches come from *slots*. A training step consumes `world_size x accum` micro-batches, and micro-batch m
of rank r is slot r * accum + m. Each slot owns a disjoint, contiguous block of the split and draws its
windows from there: at random offsets (nanoGPT's sampling) or sequentially (reading straight through
its block, which keeps memory-mapped reads sequential on disk). Because the slots depend only on the
total number of micro-batches per step, 2 processes x 1 micro-batch and 1 process x 2 micro-batches
see exactly the same data. A slot's position (its RNG state or its cursor) goes into every checkpoint,
so a resumed run draws exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Optional, Union

import numpy as np
import torch

from gptforge.errors import UserError, one_line
from gptforge.files import path_problem
from gptforge.nanogpt.data import nanogpt_manifest
from gptforge.tokenizer import TOKENIZER_FILE, load_tokenizer

MANIFEST = "manifest.json"


class ShardedTokens:
    """Several token files read as one array: len() and [a:b] slicing across shard boundaries."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # start of each shard in the stream
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("ShardedTokens supports only contiguous slices")
        start, stop, _ = item.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, pos = [], start
        for i in range(first, len(self.shards)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            pieces.append(self.shards[i][pos - lo:min(stop, hi) - lo])
            pos = min(stop, hi)
            if pos >= stop:
                break
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


Tokens = Union[np.ndarray, ShardedTokens]

# ----------------------------------------------------------------------------------------------
# Opening a data directory, and checking it first
#
# A data directory may come from anyone, so nothing in its manifest is trusted: every shard must be a
# file inside the directory, in a dtype prepare writes, of the size the manifest says, and the vocabulary
# must be tokenizer.json's. All of that is checked at open without reading the shards (sizes, and a
# token-range check on a few thousand tokens at each end of each shard).

TOKEN_DTYPES = ("uint16", "uint32")  # what prepare writes (gptforge.data.prepare.token_dtype)
DATA_KINDS = ("tokens", "chat")  # chat: each shard has a uint8 loss-mask file beside it ("mask"), one byte a token
MASK_DTYPE = np.dtype(np.uint8)
SAMPLE_TOKENS = 4096  # tokens read at each end of every shard to check their ids fit the vocabulary


@dataclass
class TokenData:
    """An opened data directory: its manifest and lazily memory-mapped splits."""

    path: Path
    manifest: dict[str, Any]
    known_tokenizer: Optional[Any] = field(default=None, repr=False)
    """the tokenizer, where it does not come from tokenizer.json (a nanoGPT directory's meta.pkl or GPT-2)"""

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def kind(self) -> str:
        """"tokens" (plain token streams) or "chat" (conversations, with a loss mask per token)."""
        return self.manifest.get("kind", "tokens")

    def shard_files(self, split: str) -> list[tuple[Path, int]]:
        """(file, tokens) of each shard of `split`, each checked to lie inside the directory."""
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.path} has no {split!r} split (it has: {', '.join(self.splits)})")
        where = f"{self.path / MANIFEST}: split {split!r}"
        info = self.manifest["splits"][split]
        if not isinstance(info, dict):
            raise UserError(f"{where} is not an object; prepare the data again")
        shards = info.get("shards") or [{"file": info.get("file"), "tokens": info.get("tokens")}]
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise UserError(f"{where}: 'shards' is not a list of objects; prepare the data again")
        files = []
        for shard in shards:
            tokens = shard.get("tokens")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise UserError(f"{where}: shard {shard.get('file')!r} has token count {tokens!r}, "
                                "not a whole number >= 0; prepare the data again")
            files.append((_inside(self.path, shard.get("file"), where), tokens))
        return files

    def tokens(self, split: str) -> Tokens:
        dtype = np.dtype(self.manifest["dtype"])
        arrays = []
        for file, tokens in self.shard_files(split):
            _check_size(file, tokens, dtype)
            arrays.append(np.memmap(file, dtype=dtype, mode="r"))
        return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)

    def mask_files(self, split: str) -> list[tuple[Path, int]]:
        """(mask file, tokens) of each shard of a chat split, each checked to lie inside the directory."""
        if self.kind != "chat":
            raise UserError(f"{self.path} holds plain token data, not conversations: it has no loss mask")
        info = self.manifest["splits"][split]
        shards = info.get("shards") or [info]
        where = f"{self.path / MANIFEST}: split {split!r}"
        return [(_inside(self.path, shard.get("mask"), where), tokens)
                for shard, (_, tokens) in zip(shards, self.shard_files(split))]

    def mask(self, split: str) -> Tokens:
        """The split's loss mask (uint8, 1 where the token is learned), memory-mapped like `tokens`."""
        arrays = []
        for file, tokens in self.mask_files(split):
            _check_size(file, tokens, MASK_DTYPE)
            arrays.append(np.memmap(file, dtype=MASK_DTYPE, mode="r") if tokens else np.empty(0, MASK_DTYPE))
        return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)

    def tokenizer(self):
        if self.known_tokenizer is not None:
            return self.known_tokenizer

        return load_tokenizer(_inside(self.path, TOKENIZER_FILE, str(self.path)))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])


def _inside(root: Path, name: Any, where: str) -> Path:
    """root/name, refused unless it is a relative path that resolves (symlinks too) inside root."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: shard file {name!r} is not a file name; prepare the data again")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or Path(name).is_absolute():
        problem = "is an absolute path"
    elif ".." in parts:
        problem = "climbs out with '..'"
    elif not Path(os.path.realpath(root / name)).is_relative_to(os.path.realpath(root)):  # realpath: loops too
        problem = f"resolves to {os.path.realpath(root / name)} (a symlink)"
    else:
        return root / name
    raise UserError(f"{where}: file {name!r} {problem}, outside the data directory {root}; refusing to read it")


def _check_size(file: Path, tokens: int, dtype: np.dtype) -> None:
    if not file.is_file():
        raise UserError(f"{file} is missing; prepare the data again")
    size = file.stat().st_size
    if size != tokens * dtype.itemsize:
        raise UserError(f"{file} has {size:,} bytes, but the manifest says {tokens:,} {dtype.name} tokens "
                        f"({tokens * dtype.itemsize:,} bytes); it is truncated or not this data; prepare the data again")


def _read_manifest(manifest_file: Path) -> dict[str, Any]:
    """The manifest, after checking its shape: splits, a dtype prepare writes, a vocabulary that fits it."""
    def bad(problem: str) -> UserError:
        return UserError(f"{manifest_file}: {problem}; prepare the data again")

    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise bad(f"unreadable ({one_line(e, 200)})") from None
    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if not isinstance(manifest.get("splits"), dict) or not manifest["splits"]:
        raise bad("no 'splits'")
    dtype = manifest.get("dtype")
    if dtype not in TOKEN_DTYPES:
        raise bad(f"dtype {dtype!r} is not one gptforge writes ({' or '.join(TOKEN_DTYPES)})")
    if manifest.get("kind", "tokens") not in DATA_KINDS:
        raise bad(f"kind {manifest.get('kind')!r} is not one gptforge writes ({' or '.join(DATA_KINDS)})")
    tok = manifest.get("tokenizer")
    vocab = tok.get("vocab_size") if isinstance(tok, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise bad(f"tokenizer.vocab_size is {vocab!r}, not a whole number >= 1")
    if vocab > np.iinfo(dtype).max + 1:
        raise bad(f"vocab_size {vocab:,} does not fit its dtype {dtype} (at most {np.iinfo(dtype).max + 1:,} ids)")
    return manifest


def _check_tokenizer(data: TokenData) -> None:
    """tokenizer.json is the one the manifest was written with: same vocabulary size and fingerprint."""
    tok, info = data.tokenizer(), data.manifest["tokenizer"]
    tok_file = data.path / TOKENIZER_FILE
    if tok.vocab_size != info["vocab_size"]:
        raise UserError(f"{data.path / MANIFEST}: vocab_size {info['vocab_size']:,} does not match {tok_file} "
                        f"({tok.vocab_size:,} tokens); prepare the data again")
    if info.get("fingerprint") is not None and info["fingerprint"] != tok.fingerprint():
        raise UserError(f"{data.path / MANIFEST}: the tokenizer fingerprint does not match {tok_file} "
                        "(the tokenizer was replaced after the data was prepared); prepare the data again")
    if data.kind == "chat" and getattr(tok, "chat", None) is None:
        raise UserError(f"{data.path / MANIFEST} says it holds conversations, but {tok_file} has no chat template; "
                        "prepare the data again")


def _check_sample(file: Path, dtype: np.dtype, vocab_size: int) -> None:
    """The first and last SAMPLE_TOKENS ids of a shard are inside the vocabulary (a cheap spot check)."""
    tokens = np.memmap(file, dtype=dtype, mode="r") if file.stat().st_size else np.empty(0, dtype)
    for piece in (tokens[:SAMPLE_TOKENS], tokens[-SAMPLE_TOKENS:]):
        if len(piece) and int(piece.max()) >= vocab_size:
            raise UserError(f"{file}: holds token id {int(piece.max()):,}, outside the vocabulary of "
                            f"{vocab_size:,} tokens; it is not this data; prepare the data again")


def open_data(path: str | Path) -> TokenData:
    """Open a prepared data directory, after checking it (see above): every failure is one UserError line."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if problem := path_problem(path, "folder"):
        fix = f"; create it with `gptforge prepare SOURCE --out {path}`" if problem == "does not exist" else ""
        raise UserError(f"data directory {path} {problem}{fix}")
    if not manifest_file.is_file() and (path / "train.bin").is_file():
        # nanoGPT's data/NAME/: train.bin, val.bin (+ meta.pkl)
        return TokenData(path, *nanogpt_manifest(path))
    if not manifest_file.is_file():
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST}); run `gptforge prepare` first")
    data = TokenData(path, _read_manifest(manifest_file))
    _check_tokenizer(data)
    dtype = np.dtype(data.manifest["dtype"])
    for split in data.splits:
        for file, tokens in data.shard_files(split):
            _check_size(file, tokens, dtype)
            _check_sample(file, dtype, data.vocab_size)
        if data.kind == "chat":
            for file, tokens in data.mask_files(split):
                _check_size(file, tokens, MASK_DTYPE)
    return data


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; on CUDA through pinned memory so the copy overlaps compute."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _split_xy(w: np.ndarray, device: Optional[torch.device]) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(w.astype(np.int64))  # (B, T + 1)
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # inputs and next-token targets, (B, T) each
    if device is not None:
        x, y = to_device(x, device), to_device(y, device)
    return x, y


class _Slot:
    """The block [lo, hi) of a split that slot `slot` of `n_slots` owns."""

    def __init__(self, tokens: Tokens, batch_size: int, block_size: int, slot: int, n_slots: int):
        n = len(tokens)
        self.lo, self.hi = n * slot // n_slots, n * (slot + 1) // n_slots
        if self.hi - self.lo < block_size + 1:
            per = f" (split into {n_slots} blocks, one per micro-batch slot)" if n_slots > 1 else ""
            raise UserError(f"split has {n} tokens{per}: fewer than block_size + 1 = {block_size + 1} per block; "
                            "use a smaller model.block_size, fewer processes/accumulation steps, or more data")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size


class RandomBatches(_Slot):
    """Windows of block_size + 1 tokens at uniformly random offsets inside the slot's block."""

    kind = "random"

    def __init__(self, tokens: Tokens, batch_size: int, block_size: int, seed: int, slot: int = 0, n_slots: int = 1):
        super().__init__(tokens, batch_size, block_size, slot, n_slots)
        self.rng = np.random.Generator(np.random.PCG64([seed, slot]))
        self._windows = None
        if isinstance(tokens, np.ndarray):  # one file: gather all windows with one fancy index, no copy first
            self._windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size + 1)

    def next(self, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ix = self.lo + self.rng.integers(0, self.hi - self.lo - self.block_size, size=self.batch_size)
        if self._windows is not None:
            w = self._windows[ix]  # (B, T + 1)
        else:
            w = np.stack([self.tokens[i:i + self.block_size + 1] for i in ix])
        return _split_xy(w, device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class SequentialBatches(_Slot):
    """Reads straight through the slot's block: each batch is the next batch_size x block_size tokens
    (rows are consecutive windows); at the end of the block it starts over."""

    kind = "sequential"

    def __init__(self, tokens: Tokens, batch_size: int, block_size: int, seed: int = 0, slot: int = 0,
                 n_slots: int = 1):
        super().__init__(tokens, batch_size, block_size, slot, n_slots)
        if self.hi - self.lo < batch_size * block_size + 1:
            raise UserError(f"each data block holds {self.hi - self.lo} tokens, too few for a batch of "
                            f"{batch_size} x {block_size} tokens; use sampling=random or a smaller batch")
        self.cursor, self.epoch = self.lo, 0

    def next(self, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.batch_size * self.block_size
        if self.cursor + span + 1 > self.hi:
            self.cursor, self.epoch = self.lo, self.epoch + 1
        buf = np.asarray(self.tokens[self.cursor:self.cursor + span + 1])
        self.cursor += span
        starts = np.arange(self.batch_size) * self.block_size
        w = buf[starts[:, None] + np.arange(self.block_size + 1)]  # (B, T + 1), overlapping by one token
        return _split_xy(w, device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "cursor": int(self.cursor), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor, self.epoch = int(state["cursor"]), int(state["epoch"])


SAMPLERS = {"random": RandomBatches, "sequential": SequentialBatches}


class SlotLoader:
    """The micro-batches of one rank: slots rank * accum ... rank * accum + accum - 1, in turn."""

    def __init__(self, tokens: Tokens, sampling: str, batch_size: int, block_size: int, seed: int,
                 rank: int, world_size: int, accum: int):
        self.n_slots, self.accum = world_size * accum, accum
        self.first = rank * accum
        cls = SAMPLERS[sampling]
        self.slots = [cls(tokens, batch_size, block_size, seed, self.first + m, self.n_slots) for m in range(accum)]
        self.sampling = sampling

    def next(self, micro: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slots[micro].next(device)

    def local_states(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self.slots]

    def load_states(self, all_states: list[dict[str, Any]]) -> bool:
        """Restore this rank's slots from the states of all slots; False if they do not fit (other layout)."""
        if len(all_states) != self.n_slots or any(s.get("kind") != self.sampling for s in all_states):
            return False
        for m, slot in enumerate(self.slots):
            slot.load_state_dict(all_states[self.first + m])
        return True

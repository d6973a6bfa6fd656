"""Reading prepared token files: the data directory, and batches drawn from it.

A data directory (written by `gptforge prepare`) holds flat token arrays per split, read with np.memmap
so a corpus far larger than memory costs nothing to open. Training batches are windows at random offsets
(nanoGPT's sampling); the sampler's position is its RNG state, which goes into every checkpoint so a
resumed run draws exactly the batches the uninterrupted run would have. Each rank gets its own stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gptforge.errors import UserError

MANIFEST = "manifest.json"


@dataclass
class TokenData:
    """An opened data directory: its manifest and lazily memory-mapped splits."""

    path: Path
    manifest: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def tokens(self, split: str) -> np.ndarray:
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.path} has no {split!r} split (it has: {', '.join(self.splits)})")
        info = self.manifest["splits"][split]
        file = self.path / info["file"]
        dtype = np.dtype(self.manifest["dtype"])
        if not file.is_file() or file.stat().st_size != info["tokens"] * dtype.itemsize:
            raise UserError(f"{file} is missing or truncated; prepare the data again")
        return np.memmap(file, dtype=dtype, mode="r")

    def tokenizer(self):
        from gptforge.tokenizer import load_tokenizer

        return load_tokenizer(self.path)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])


def open_data(path: str | Path) -> TokenData:
    path = Path(path)
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist; create it with `gptforge prepare SOURCE --out {path}`")
    if not manifest_file.is_file():
        raise UserError(f"{path} is not a prepared data directory (no {MANIFEST}); run `gptforge prepare` first")
    try:
        manifest = json.loads(manifest_file.read_text())
        manifest["splits"], manifest["dtype"], manifest["tokenizer"]["vocab_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest_file} is unreadable or incomplete ({e}); prepare the data again") from None
    return TokenData(path, manifest)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; on CUDA through pinned memory so the copy overlaps compute."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class RandomBatches:
    """Batches of `batch_size` windows of `block_size + 1` tokens at uniformly random offsets.

    Deterministic given (seed, rank); `state_dict()` captures the position in the stream exactly.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, rank: int = 0):
        if len(tokens) < block_size + 1:
            raise UserError(f"split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                            "use a smaller model.block_size or more data")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self._windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size + 1)  # (N - T, T + 1), no copy

    def next(self, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ix = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        w = torch.from_numpy(self._windows[ix].astype(np.int64))  # (B, T + 1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # inputs and next-token targets, (B, T) each
        if device is not None:
            x, y = to_device(x, device), to_device(y, device)
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "random":
            raise UserError(f"checkpoint's data position is of kind {state.get('kind')!r}, expected 'random'")
        self.rng.bit_generator.state = state["rng"]

"""nanoGPT's data directories, data/NAME/: uint16 train.bin and val.bin, and meta.pkl (read by an unpickler
that refuses every class reference, so only plain data can load) for a char-level vocabulary."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Union

import numpy as np

from gptforge.errors import UserError, one_line
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

META = "meta.pkl"
GPT2_VOCAB = 50257


class _PlainUnpickler(pickle.Unpickler):
    """Loads only what pickle builds from its own opcodes; any class or function reference is refused,
    and with it every way for a pickle to call something (REDUCE needs a callable found by name)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and meta.pkl may hold only plain data")


def read_meta(path: Union[str, Path]) -> CharTokenizer:
    """nanoGPT's `meta.pkl` ({'vocab_size', 'stoi', 'itos'}) as a char tokenizer with exactly its ids."""
    path = Path(path)
    try:
        meta = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except OSError as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None
    except Exception as e:  # UnpicklingError, truncation, garbage: all mean "not a plain meta.pkl"
        raise UserError(f"refusing {path}: {one_line(e, 160)} (nothing in it was run)") from None
    return _char_tokenizer(meta, path)


def _char_tokenizer(meta: Any, path: Path) -> CharTokenizer:
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict) or not isinstance(meta.get("itos"), dict):
        raise UserError(f"{path} is not a nanoGPT char vocabulary (a dict with 'stoi' and 'itos')")
    itos, stoi = meta["itos"], meta["stoi"]
    n = len(itos)
    if sorted(k for k in itos if isinstance(k, int)) != list(range(n)) or any(
            not isinstance(c, str) or len(c) != 1 for c in itos.values()):
        raise UserError(f"{path}: itos must map the ids 0..{n - 1} to single characters")
    chars = [itos[i] for i in range(n)]
    if stoi != {c: i for i, c in enumerate(chars)} or meta.get("vocab_size", n) != n:
        raise UserError(f"{path}: stoi, itos and vocab_size disagree")
    # CharTokenizer numbers characters in sorted order, as nanoGPT's prepare.py does; a vocabulary
    # numbered any other way cannot keep its ids, and the model's rows would mean other characters.
    if chars != sorted(chars):
        raise UserError(f"{path}: its ids are not in sorted character order (as nanoGPT's prepare.py writes them), "
                        "so a gptforge char tokenizer cannot keep them")
    return CharTokenizer(chars, eot=False)


def data_tokenizer(data_dir: Union[str, Path]) -> Tokenizer:
    """The tokenizer of a nanoGPT data directory: meta.pkl's characters, or GPT-2 BPE when there is none."""
    meta = Path(data_dir) / META
    return read_meta(meta) if meta.is_file() else GPT2Tokenizer()


# ----------------------------------------------------------------------------------------------
# data directories


def nanogpt_manifest(path: Union[str, Path]) -> tuple[dict[str, Any], Tokenizer]:
    """A directory with nanoGPT's train.bin and val.bin (uint16 token ids, no header): the manifest a prepared
    directory would have, and its tokenizer (`gptforge.data.loader.open_data` makes the TokenData)."""
    path = Path(path)
    splits = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        if not file.is_file():
            raise UserError(f"{path} looks like a nanoGPT data directory but has no {file.name}")
        size = file.stat().st_size
        if size % 2:
            raise UserError(f"{file} has an odd number of bytes; nanoGPT's .bin files hold uint16 token ids")
        splits[split] = {"file": file.name, "tokens": size // 2}
    tok = read_meta(path / META) if (path / META).is_file() else None
    kind, vocab = ("char", tok.vocab_size) if tok is not None else ("gpt2", GPT2_VOCAB)
    for split in splits:  # a cheap spot check, as for prepared data: ids at both ends fit the vocabulary
        ids = np.memmap(path / f"{split}.bin", dtype=np.uint16, mode="r") if splits[split]["tokens"] else []
        top = max([int(ids[:4096].max()), int(ids[-4096:].max())]) if len(ids) else 0
        if top >= vocab:
            raise UserError(f"{path / split}.bin holds token id {top:,}, outside the {kind} vocabulary of {vocab:,} "
                            f"tokens{' in meta.pkl' if tok is not None else ' (no meta.pkl: GPT-2 BPE)'}")
    manifest = {"format": "nanogpt", "dtype": "uint16", "splits": splits,
                "tokenizer": {"kind": kind, "vocab_size": vocab}}
    return manifest, tok if tok is not None else GPT2Tokenizer()


"""`gptforge prepare SOURCE --chat [auto|messages|sharegpt|alpaca]`: conversations -> tokens + loss masks.

The verb, on top of gptforge.data.conversations (which reads SOURCE's rows as messages, skipping and
counting the unusable ones). The data directory is the text path's (written by the same
gptforge.data.shards.write_data_dir) with, per split, a uint8 loss-mask file beside the tokens
(NAME.mask.bin, 1 = learned) and manifest kind "chat". Splits are cut between conversations: val (then
test) are the last fractions of the conversations, in order. SOURCE is read twice, row by row: once to
count the conversations and build the tokenizer, once to render and write them, so memory holds a row
and the tokenizer, not the data; the progress of each read shows on stderr (gptforge.progress). Not
resumable (conversation data is small next to pretraining corpora); the output is a pure function of the input and the options.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.data import shards
from gptforge.data.chunks import RowInput
from gptforge.data.conversations import (BadRows, Messages, check_format, conversation_files, conversations,
                                         open_conversations)
from gptforge.data.sources import check_outputs, read_bar, total_bytes
from gptforge.errors import UserError
from gptforge.tokenizer import Tokenizer, check_tokenizer_args, train_tokenizer


def prepare_chat(source: str, out: str | Path, *, fmt: str = "auto", tokenizer: str = "char",
                 vocab_size: Optional[int] = None, val_fraction: Optional[float] = None,
                 test_fraction: Optional[float] = None, overwrite: bool = False, progress: bool = True
                 ) -> dict[str, Any]:
    """Conversations of SOURCE -> data directory `out` of kind "chat"; returns its manifest. `progress`: show
    the progress of each of the two reads (a bar on a terminal, periodic lines off one: gptforge.progress)."""
    source = os.fspath(source)
    check_tokenizer_args(tokenizer, vocab_size)
    check_format(fmt)
    val_fraction, test_fraction = shards.check_splits(val_fraction, test_fraction, None, None)
    out, shown = shards.out_path(out)
    files = conversation_files(source)  # listed, not read: the output may not be, hold or lie in an input
    if files is not None:
        check_outputs(source, (f.path for f in files), (out,))
    shards.check_out(out, shown, overwrite)
    inputs = open_conversations(source, files)
    bad = BadRows()
    tok, n = _first_pass(tokenizer, inputs, fmt, bad, vocab_size, progress)
    if bad.count:
        print(f"gptforge: {bad.count} of {bad.count + n} rows are not usable conversations and were skipped; "
              f"the first {len(bad.first)}:", file=sys.stderr)
        for line in bad.first:
            print(f"  {line}", file=sys.stderr)
    counts = _split_counts(n, val_fraction, test_fraction)
    read = {"chat_format": fmt, "conversations": n, "documents": n,
            "bad_rows": {"count": bad.count, "first": bad.first}}
    split = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    return shards.write_data_dir(
        out, shown, overwrite, tok,
        lambda tmp: _write_splits(tmp, tok, conversations(inputs, fmt), counts, source, progress),
        lambda splits: shards.manifest(source, tok, splits, kind="chat", read=read, split=split))


def _first_pass(kind: str, inputs: list[RowInput], fmt: str, bad: BadRows, vocab_size: Optional[int],
                progress: bool) -> tuple[Tokenizer, int]:
    """Read 1: the tokenizer (built on every message's text, in order, as it streams by) and the number of
    usable conversations; the unusable rows are counted in `bad`. The bar is over the bytes read, or, when
    their total is unknown (hf:), the conversations."""
    n, total = 0, total_bytes(inputs)
    desc = {"char": "char vocabulary", "gpt2": "read conversations"}.get(kind, f"train bpe ({vocab_size})")
    with read_bar(total, desc, progress, unit="B" if total is not None else "conv") as bar:

        def texts() -> Iterator[str]:
            nonlocal n
            tally = bar.update if total is not None else lambda _: None
            for conv in conversations(inputs, fmt, bad, tally):
                n += 1
                if total is None:
                    bar.update(1)
                else:
                    bar.set_postfix_str(f"{n:,} conversations", refresh=False)
                yield from (m["content"] for m in conv)

        if kind == "gpt2":  # GPT-2's vocabulary is fixed: the texts are only counted
            collections.deque(texts(), maxlen=0)
            return add_chat_template(train_tokenizer(kind, [])), n
        return add_chat_template(train_tokenizer(kind, texts(), vocab_size)), n


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - val - test < 1 or val < 1:
        raise UserError(f"{n} usable conversations are too few for a train and a val split "
                        f"(val {val}, test {test}); use more conversations or change --val-fraction")
    return {"train": n - val - test, "test": test, "val": val}


def _write_splits(tmp: Path, tok: Tokenizer, convs: Iterator[Messages], counts: dict[str, int], source: str,
                  progress: bool) -> shards.Splits:
    """Read 2: the conversations rendered into each split's files in turn, `counts[split]` of them each."""
    dtype, splits = shards.token_dtype(tok.vocab_size), {}
    with read_bar(sum(counts.values()), f"encode ({tok.kind})", progress, unit="conv") as bar:
        for name, count in counts.items():
            if count:
                splits[name] = _write_split(tmp, name, tok, itertools.islice(convs, count), dtype, bar.update)
    if sum(s["conversations"] for s in splits.values()) != sum(counts.values()) or next(convs, None) is not None:
        raise UserError(f"{source} changed while it was prepared (another number of conversations on the second "
                        "read); prepare it again")
    return splits


def _write_split(tmp: Path, name: str, tok: Tokenizer, convs: Iterator[Messages], dtype: np.dtype,
                 done: Callable[[int], Any]) -> dict[str, Any]:
    """NAME.bin and NAME.mask.bin of `convs`, written one conversation at a time (`done(1)` after each)."""
    n = tokens = learned = 0
    with open(tmp / f"{name}.bin", "wb") as ids_file, open(tmp / f"{name}.mask.bin", "wb") as mask_file:
        for conv in convs:
            ids, mask = render_conversation(tok, conv)
            ids_file.write(np.asarray(ids, dtype=dtype).tobytes())
            mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
            n, tokens, learned = n + 1, tokens + len(ids), learned + sum(mask)
            done(1)
        for f in (ids_file, mask_file):
            f.flush()
            os.fsync(f.fileno())
    return {"file": f"{name}.bin", "mask": f"{name}.mask.bin", "tokens": tokens, "conversations": n,
            "learned_tokens": learned}

"""`gptforge prepare SOURCE --chat [auto|messages|sharegpt|alpaca]`: conversations -> tokens + loss masks.

Owns reading conversation rows and turning each format into the template's messages:

    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (OpenAI / HF chat)
    sharegpt   {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
    alpaca     {"instruction": ..., "input": optional, "output": ...}   (user: instruction, a blank line, input)

from a .jsonl / .jsonl.gz file (one row a line), a .json / .json.gz file (a JSON array of rows, or JSON
lines), a .parquet file (one row a row), a folder of those, or hf:NAME[:CONFIG][@SPLIT]. `auto` picks the
format of each row by its keys. A row that is not a usable conversation (bad JSON, nested too deeply, a line
past chunks.MAX_LINE_BYTES, not UTF-8, wrong roles, empty content, not ending with the assistant:
gptforge.chat_template.validate_messages) is counted and skipped, the first few shown; a file with no usable
row is an error. JSON's lone surrogates ("\\ud800") are read as U+FFFD (text_files.json_value).

The data directory is the text path's (gptforge.data.prepare) with, per split, a uint8 loss-mask file
beside the tokens (NAME.mask.bin, 1 = learned) and manifest kind "chat". Splits are cut between
conversations: val (then test) are the last fractions of the conversations, in order. SOURCE is read twice,
row by row: once to count the conversations and build the tokenizer, once to render and write them, so
memory holds a row and the tokenizer, not the data (JSON lines through gptforge.data.text_files.lines; only a
.json array is parsed whole, after checking it fits in memory). Not resumable (conversation data is small
next to pretraining corpora); the output is a pure function of the input and the options.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import os
import shutil
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gptforge import __version__
from gptforge.chat_template import add_chat_template, render_conversation, validate_messages
from gptforge.config import save_json
from gptforge.data import shards
from gptforge.data.sources import check_outputs, local_path
from gptforge.data.text_files import SNIFF_BYTES, json_value, lines, too_long_line
from gptforge.errors import UserError, one_line
from gptforge.tokenizer import Tokenizer, check_tokenizer_args, train_tokenizer

CHAT_FORMATS = ("auto", "messages", "sharegpt", "alpaca")
SHOW_BAD = 5  # bad rows shown by name; all are counted
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".json", ".parquet")

ARRAY_BLOCK = 1 << 24  # a .json array is read in blocks of this many bytes, checking free memory after each
ARRAY_MEMORY = 4  # parsing a JSON array holds about 4x its size (the bytes, their text, the rows: measured on Alpaca)

Row = tuple[str, Any]  # (where, the decoded row or a Bad reason)
ChatInput = tuple[str, Optional[Path], Callable[[], Iterator[Row]]]  # (display, local file or None, read its rows)


class Bad(str):
    """A row that could not even be decoded (bad JSON, not UTF-8): its reason."""


# ----------------------------------------------------------------------------------------------
# Rows -> messages


def to_messages(row: Any, fmt: str) -> tuple[Optional[list[dict[str, str]]], Optional[str]]:
    """(messages, None) or (None, why not) for one decoded row in format `fmt` ("auto": by its keys)."""
    if isinstance(row, Bad):
        return None, str(row)
    if not isinstance(row, dict):
        return None, f"a {type(row).__name__}, not an object"
    if fmt == "auto":
        fmt = ("messages" if "messages" in row else "sharegpt" if "conversations" in row
               else "alpaca" if "instruction" in row or "output" in row else "")
        if not fmt:
            fields = ", ".join(map(str, row))[:80]
            return None, f"no 'messages', 'conversations' or 'instruction'/'output' field (fields: {fields})"
    if fmt == "messages":
        messages = row.get("messages")
        if isinstance(messages, list):
            messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                        for m in messages]
    elif fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            return None, "no 'conversations' list"
        messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                    if isinstance(t, dict) else t for t in turns]
    else:
        instruction, extra, output = row.get("instruction"), row.get("input"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return None, "no string 'instruction' and 'output'"
        if extra is not None and not isinstance(extra, str):
            return None, "'input' is not a string"
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    problem = validate_messages(messages)
    return (messages, None) if problem is None else (None, problem)


# ----------------------------------------------------------------------------------------------
# Reading rows from files, folders, parquet and hf:


def _decode_line(raw: Optional[bytes]) -> Any:
    if raw is None:
        return Bad(too_long_line())
    try:
        return json_value(raw)
    except UnicodeDecodeError:
        return Bad("not UTF-8 text")
    except ValueError as e:  # "nested too deeply" included
        return Bad(f"invalid JSON ({getattr(e, 'msg', e)})")


def _json_rows(path: Path, display: str) -> Iterator[Row]:
    """The rows of a JSON-lines file, line by line; of a JSON array (Alpaca's layout: a file not named .jsonl
    that starts with "["), after parsing it whole. A .jsonl line that is an array is a bad row like any other."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lines_only = path.name.lower().endswith((".jsonl", ".jsonl.gz"))
    try:
        with opener(path, "rb") as f:
            if not lines_only and f.peek(SNIFF_BYTES)[:SNIFF_BYTES].lstrip()[:1] == b"[":
                yield from ((f"{display}[{i}]", row) for i, row in enumerate(_json_array(f, display), 1))
                return
            for lineno, raw in lines(f):
                yield f"{display}:{lineno}", _decode_line(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{display}: corrupt or truncated gzip data ({one_line(e)})") from None
    except OSError as e:
        raise UserError(f"{display}: cannot read it ({e.strerror or one_line(e)})") from None


def _json_array(f: Any, display: str) -> list[Any]:
    """The rows of a file holding one JSON array, read in blocks and refused as soon as parsing what it holds
    would not fit in free memory (gptforge.device.check_memory)."""
    import torch

    from gptforge.device import check_memory

    blocks, n = [], 0
    while block := f.read(ARRAY_BLOCK):
        blocks.append(block)
        n += len(block)
        check_memory(ARRAY_MEMORY * n, torch.device("cpu"), f"{display}: parsing this JSON array",
                     "write it as JSON lines, one row a line (e.g. jq -c '.[]' FILE > rows.jsonl), which are read "
                     "row by row")
    rows = _decode_line(b"".join(blocks))
    if isinstance(rows, Bad) or not isinstance(rows, list):
        raise UserError(f"{display}: not a JSON array of rows ({rows if isinstance(rows, Bad) else 'an object'})")
    return rows


def _parquet_rows(path: Path, display: str) -> Iterator[Row]:
    from gptforge.data.parquet_files import _pyarrow

    pq = _pyarrow()
    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=1024, use_threads=False):
            for row in batch.to_pylist():
                i += 1
                yield f"{display} row {i}", row
    except Exception as e:  # pyarrow's errors: unreadable or not parquet
        raise UserError(f"{display}: not a readable parquet file ({one_line(e)})") from None


def _hf_rows(source: str) -> Iterator[Row]:
    from gptforge.data.hf_dataset import _hf_error, parse_hf

    name, config, split = parse_hf(source)
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except ImportError:
        raise UserError(f"{source}: reading Hugging Face datasets needs the datasets package: "
                        "pip install 'gptforge[hf]'") from None
    except Exception as e:
        raise _hf_error(source, e) from None
    for i, row in enumerate(rows, 1):
        yield f"{source} row {i}", row


def chat_inputs(source: str) -> list[ChatInput]:
    """(display name, local file or None, its rows) of each input of SOURCE, in order (a folder: sorted by
    relative path). Listed, not read: each call of an input's third item reads its rows afresh."""
    if source.startswith("hf:"):
        return [(source, None, lambda: _hf_rows(source))]
    path = local_path(source)

    def input_of(p: Path, display: str) -> ChatInput:
        read = _parquet_rows if p.name.lower().endswith(".parquet") else _json_rows
        return display, p, lambda: read(p, display)

    if path is not None and path.is_dir():
        found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(SUFFIXES)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise UserError(f"{source}: no .jsonl, .json or .parquet files of conversations in this folder")
        return [input_of(path / rel, os.path.join(source, rel)) for rel in found]
    if path is not None:
        return [input_of(path, source)]
    raise UserError(f"{source}: no such file or folder (conversations come from .jsonl, .json, .parquet files, "
                    "folders of them, or hf:NAME)")


@dataclass
class BadRows:
    """Rows that are not usable conversations: how many, and the first SHOW_BAD described."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, described: str) -> None:
        self.count += 1
        if len(self.first) < SHOW_BAD:
            self.first.append(described)


def conversations(inputs: list[ChatInput], fmt: str, bad: Optional[BadRows] = None
                  ) -> Iterator[list[dict[str, str]]]:
    """The usable conversations of `inputs` in order, row by row; the other rows are counted in `bad`. An input
    without a usable row fails."""
    for display, _, read in inputs:
        good, first_problem, n_rows = 0, None, 0
        for where, row in read():
            n_rows += 1
            messages, problem = to_messages(row, fmt)
            if messages is None:
                first_problem = first_problem or f"{where}: {problem}"
                if bad is not None:
                    bad.add(f"{where}: {problem}")
                continue
            good += 1
            yield messages
        if not good:
            why = f"; the first: {first_problem}" if first_problem else ""
            raise UserError(f"{display}: no usable conversation in its {n_rows} rows (format {fmt}){why}")


def _check_format(fmt: str) -> None:
    if fmt not in CHAT_FORMATS:
        raise UserError(f"unknown chat format {fmt!r}; choose one of: {', '.join(CHAT_FORMATS)}")


def read_conversations(source: str, fmt: str) -> tuple[list[list[dict[str, str]]], int, list[str]]:
    """(conversations, bad rows, the first SHOW_BAD of them described), all in memory; a file without a usable
    row fails."""
    _check_format(fmt)
    bad = BadRows()
    convs = list(conversations(chat_inputs(source), fmt, bad))
    return convs, bad.count, bad.first


# ----------------------------------------------------------------------------------------------
# The verb


def _first_pass(kind: str, inputs: list[ChatInput], fmt: str, bad: BadRows, vocab_size: Optional[int]
                ) -> tuple[Tokenizer, int]:
    """Read 1: the tokenizer (built on every message's text, in order, as it streams by) and the number of
    usable conversations; the unusable rows are counted in `bad`."""
    n = 0

    def texts() -> Iterator[str]:
        nonlocal n
        for conv in conversations(inputs, fmt, bad):
            n += 1
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


def prepare_chat(source: str, out: str | Path, *, fmt: str = "auto", tokenizer: str = "char",
                 vocab_size: Optional[int] = None, val_fraction: Optional[float] = None,
                 test_fraction: Optional[float] = None, overwrite: bool = False, progress: bool = True
                 ) -> dict[str, Any]:
    """Conversations of SOURCE -> data directory `out` of kind "chat"; returns its manifest. (`progress` is
    accepted like prepare's, but there is no bar: conversation files are read in seconds.)"""
    source = os.fspath(source)
    check_tokenizer_args(tokenizer, vocab_size)
    _check_format(fmt)
    val_fraction, test_fraction = shards.check_splits(val_fraction, test_fraction, None, None)
    out, shown_out = shards.out_path(out)
    inputs = chat_inputs(source)  # listed, not read: the output may not be, hold or lie in an input
    if not source.startswith("hf:"):
        check_outputs(source, (p for _, p, _ in inputs if p is not None), (out,))
    shards.check_out(out, shown_out, overwrite)
    bad = BadRows()
    tok, n = _first_pass(tokenizer, inputs, fmt, bad, vocab_size)
    if bad.count:
        print(f"gptforge: {bad.count} of {bad.count + n} rows are not usable conversations and were skipped; "
              f"the first {len(bad.first)}:", file=sys.stderr)
        for line in bad.first:
            print(f"  {line}", file=sys.stderr)
    counts = _split_counts(n, val_fraction, test_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = shards.new_hidden_dir(out, "tmp")
    try:
        splits = _write_splits(tmp, tok, conversations(inputs, fmt), counts, source)
        tok.save(tmp)
        manifest = _manifest(source, fmt, tok, splits, bad, val_fraction, test_fraction)
        save_json(manifest, tmp / shards.MANIFEST_FILE)
        shards.check_out(out, shown_out, overwrite)  # it may have changed while we worked
        shards.install(tmp, out, shown_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(source: str, fmt: str, tok: Tokenizer, splits: dict[str, dict[str, Any]], bad: BadRows,
              val_fraction: float, test_fraction: float) -> dict[str, Any]:
    n = sum(s["conversations"] for s in splits.values())
    return {
        "format": shards.MANIFEST_FORMAT, "kind": "chat", "gptforge_version": __version__, "source": source,
        "chat_format": fmt, "conversations": n, "documents": n,
        "bad_rows": {"count": bad.count, "first": bad.first},
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "fingerprint": tok.fingerprint(), "file": "tokenizer.json", "chat": tok.chat.to_dict()},
        "dtype": shards.token_dtype(tok.vocab_size).name, "tokens": sum(s["tokens"] for s in splits.values()),
        "val_fraction": val_fraction, "test_fraction": test_fraction,
        "splits": {name: splits[name] for name in ("train", "val", "test") if name in splits},
    }


def _write_splits(tmp: Path, tok: Tokenizer, convs: Iterator[list[dict[str, str]]], counts: dict[str, int],
                  source: str) -> dict[str, dict[str, Any]]:
    """Read 2: the conversations rendered into each split's files in turn, `counts[split]` of them each."""
    dtype, splits = shards.token_dtype(tok.vocab_size), {}
    for name, count in counts.items():
        if count:
            splits[name] = _write_split(tmp, name, tok, itertools.islice(convs, count), dtype)
    if sum(s["conversations"] for s in splits.values()) != sum(counts.values()) or next(convs, None) is not None:
        raise UserError(f"{source} changed while it was prepared (another number of conversations on the second "
                        "read); prepare it again")
    return splits


def _write_split(tmp: Path, name: str, tok: Tokenizer, convs: Iterator[list[dict[str, str]]],
                 dtype: np.dtype) -> dict[str, Any]:
    """NAME.bin and NAME.mask.bin of `convs`, written one conversation at a time."""
    n = tokens = learned = 0
    with open(tmp / f"{name}.bin", "wb") as ids_file, open(tmp / f"{name}.mask.bin", "wb") as mask_file:
        for conv in convs:
            ids, mask = render_conversation(tok, conv)
            ids_file.write(np.asarray(ids, dtype=dtype).tobytes())
            mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
            n, tokens, learned = n + 1, tokens + len(ids), learned + sum(mask)
        for f in (ids_file, mask_file):
            f.flush()
            os.fsync(f.fileno())
    return {"file": f"{name}.bin", "mask": f"{name}.mask.bin", "tokens": tokens, "conversations": n,
            "learned_tokens": learned}

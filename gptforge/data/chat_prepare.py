"""`gptforge prepare SOURCE --chat [auto|messages|sharegpt|alpaca]`: conversations -> tokens + loss masks.

Owns reading conversation rows and turning each format into the template's messages:

    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (OpenAI / HF chat)
    sharegpt   {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
    alpaca     {"instruction": ..., "input": optional, "output": ...}   (user: instruction, a blank line, input)

from a .jsonl / .jsonl.gz / .json.gz file (one row a line), a .json file (a JSON array of rows, or JSON
lines), a .parquet file (one row a row), a folder of those, or hf:NAME[:CONFIG][@SPLIT]. `auto` picks the
format of each row by its keys. A row that is not a usable conversation (bad JSON, not UTF-8, wrong roles,
empty content, not ending with the assistant: gptforge.chat_template.validate_messages) is counted and
skipped, the first few shown; a file with no usable row is an error.

The data directory is the text path's (gptforge.data.prepare) with, per split, a uint8 loss-mask file
beside the tokens (NAME.mask.bin, 1 = learned) and manifest kind "chat". Splits are cut between
conversations: val (then test) are the last fractions of the conversations, in order. Conversation data is
small next to pretraining corpora, so it is read into memory and written in one go (not resumable); the
output is still a pure function of the input and the options.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gptforge import __version__
from gptforge.chat_template import add_chat_template, render_conversation, validate_messages
from gptforge.config import save_json
from gptforge.data import shards
from gptforge.errors import UserError, one_line
from gptforge.tokenizer import Tokenizer, check_tokenizer_args, train_tokenizer

CHAT_FORMATS = ("auto", "messages", "sharegpt", "alpaca")
SHOW_BAD = 5  # bad rows shown by name; all are counted
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".json", ".parquet")

Row = tuple[str, Any]  # (where, the decoded row or a Bad reason)


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


def _decode_line(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return Bad("not UTF-8 text")
    except ValueError as e:
        return Bad(f"invalid JSON ({getattr(e, 'msg', e)})")


def _json_rows(path: Path, display: str) -> Iterator[Row]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{display}: cannot read it ({e.strerror or one_line(e)})") from None
    except (EOFError, zlib.error) as e:
        raise UserError(f"{display}: corrupt or truncated gzip data ({one_line(e)})") from None
    if data.lstrip()[:1] == b"[":  # a JSON array (Alpaca's layout)
        rows = _decode_line(data)
        if isinstance(rows, Bad) or not isinstance(rows, list):
            raise UserError(f"{display}: not a JSON array of rows ({rows if isinstance(rows, Bad) else 'an object'})")
        for i, row in enumerate(rows, 1):
            yield f"{display}[{i}]", row
        return
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            yield f"{display}:{lineno}", _decode_line(raw)


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


def chat_inputs(source: str) -> list[tuple[str, Iterator[Row]]]:
    """(display name, its rows) of each input of SOURCE, in order (a folder: sorted by relative path)."""
    if source.startswith("hf:"):
        return [(source, _hf_rows(source))]
    path = Path(source).expanduser()

    def rows_of(p: Path, display: str) -> Iterator[Row]:
        return _parquet_rows(p, display) if p.name.lower().endswith(".parquet") else _json_rows(p, display)

    if path.is_file():
        return [(source, rows_of(path, source))]
    if path.is_dir():
        found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(SUFFIXES)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise UserError(f"{source}: no .jsonl, .json or .parquet files of conversations in this folder")
        return [(os.path.join(source, rel), rows_of(path / rel, os.path.join(source, rel))) for rel in found]
    raise UserError(f"{source}: no such file or folder (conversations come from .jsonl, .json, .parquet files, "
                    "folders of them, or hf:NAME)")


def read_conversations(source: str, fmt: str) -> tuple[list[list[dict[str, str]]], int, list[str]]:
    """(conversations, bad rows, the first SHOW_BAD of them described); a file without a usable row fails."""
    if fmt not in CHAT_FORMATS:
        raise UserError(f"unknown chat format {fmt!r}; choose one of: {', '.join(CHAT_FORMATS)}")
    convs: list[list[dict[str, str]]] = []
    n_bad, shown = 0, []
    for display, rows in chat_inputs(source):
        good, first_problem, n_rows = 0, None, 0
        for where, row in rows:
            n_rows += 1
            messages, problem = to_messages(row, fmt)
            if messages is None:
                n_bad += 1
                first_problem = first_problem or f"{where}: {problem}"
                if len(shown) < SHOW_BAD:
                    shown.append(f"{where}: {problem}")
                continue
            good += 1
            convs.append(messages)
        if not good:
            why = f"; the first: {first_problem}" if first_problem else ""
            raise UserError(f"{display}: no usable conversation in its {n_rows} rows (format {fmt}){why}")
    return convs, n_bad, shown


# ----------------------------------------------------------------------------------------------
# The verb


def _chat_tokenizer(kind: str, convs: list[list[dict[str, str]]], vocab_size: Optional[int]) -> Tokenizer:
    texts = (m["content"] for conv in convs for m in conv)
    return add_chat_template(train_tokenizer(kind, list(texts) if kind != "gpt2" else [], vocab_size))


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
    from gptforge.data.shards import MANIFEST_FORMAT, check_splits, token_dtype

    source = os.fspath(source)
    check_tokenizer_args(tokenizer, vocab_size)
    val_fraction, test_fraction = check_splits(val_fraction, test_fraction, None, None)
    shown_out = os.fspath(out)
    out = Path(os.path.abspath(Path(out).expanduser()))
    shards.check_out(out, shown_out, overwrite)
    convs, n_bad, bad_rows = read_conversations(source, fmt)
    if n_bad:
        print(f"gptforge: {n_bad} of {n_bad + len(convs)} rows are not usable conversations and were skipped; "
              f"the first {len(bad_rows)}:", file=sys.stderr)
        for line in bad_rows:
            print(f"  {line}", file=sys.stderr)
    tok = _chat_tokenizer(tokenizer, convs, vocab_size)
    dtype = token_dtype(tok.vocab_size)
    counts = _split_counts(len(convs), val_fraction, test_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = shards.new_hidden_dir(out, "tmp")
    try:
        splits, start, total = {}, 0, 0
        for name, count in counts.items():
            if not count:
                continue
            splits[name] = _write_split(tmp, name, tok, convs[start:start + count], dtype)
            start += count
            total += splits[name]["tokens"]
        tok.save(tmp)
        manifest = {
            "format": MANIFEST_FORMAT, "kind": "chat", "gptforge_version": __version__, "source": source,
            "chat_format": fmt, "conversations": len(convs), "documents": len(convs),
            "bad_rows": {"count": n_bad, "first": bad_rows},
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                          "fingerprint": tok.fingerprint(), "file": "tokenizer.json",
                          "chat": tok.chat.to_dict()},
            "dtype": dtype.name, "tokens": total, "val_fraction": val_fraction, "test_fraction": test_fraction,
            "splits": {name: splits[name] for name in ("train", "val", "test") if name in splits},
        }
        save_json(manifest, tmp / shards.MANIFEST_FILE)
        shards.check_out(out, shown_out, overwrite)  # it may have changed while we worked
        shards.install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_split(tmp: Path, name: str, tok: Tokenizer, convs: list[list[dict[str, str]]],
                 dtype: np.dtype) -> dict[str, Any]:
    ids: list[int] = []
    mask: list[int] = []
    for conv in convs:
        i, m = render_conversation(tok, conv)
        ids += i
        mask += m
    np.asarray(ids, dtype=dtype).tofile(tmp / f"{name}.bin")
    np.asarray(mask, dtype=np.uint8).tofile(tmp / f"{name}.mask.bin")
    return {"file": f"{name}.bin", "mask": f"{name}.mask.bin", "tokens": len(ids), "conversations": len(convs),
            "learned_tokens": int(sum(mask))}

"""Reading conversations: a SOURCE of conversation rows -> the chat template's messages, row by row.

Owns which files hold conversations and the three formats a row may have:

    messages   {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   (OpenAI / HF chat)
    sharegpt   {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
    alpaca     {"instruction": ..., "input": optional, "output": ...}   (user: instruction, a blank line, input)

SOURCE is a .jsonl / .jsonl.gz file (one row a line), a .json / .json.gz file (a JSON array of rows, or JSON
lines), a .parquet file (one row a row), a folder of those, or hf:NAME[:CONFIG][@SPLIT]; the rows come from
the same readers as the text path's (gptforge.data.sources.local_inputs with this module's table of
readers, gptforge.data.hf_dataset with every column), streamed, so memory holds a row, not the data (only
a .json array is parsed whole, after checking it fits in memory). `auto` picks the format of each row by
its keys. A row that is not a usable conversation (bad JSON, nested too deeply, a line past
chunks.MAX_LINE_BYTES, not UTF-8, wrong roles, empty content, not ending with the assistant:
gptforge.chat_template.validate_messages) is counted and skipped, the first few kept to show; an input
with no usable row is an error. JSON's lone surrogates ("\\ud800") are read as U+FFFD
(text_files.json_value). `gptforge prepare --chat` (gptforge.data.chat_prepare) and `gptforge eval --task
chat` read conversations here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from gptforge.chat_template import validate_messages
from gptforge.data.chunks import Bad, FileInput, RowInput, Tally, one_line
from gptforge.data.hf_dataset import HF_PREFIX, open_hf
from gptforge.data.parquet_files import ParquetFile
from gptforge.data.sources import Readers, local_inputs
from gptforge.data.text_files import JsonFile, JsonlFile
from gptforge.errors import UserError

CHAT_FORMATS = ("auto", "messages", "sharegpt", "alpaca")
SHOW_BAD = 5  # bad rows shown by name; all are counted
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
CONVERSATION_READERS = Readers(
    by_suffix=(
        ((".parquet",), ParquetFile),
        ((".jsonl", ".jsonl.gz"), JsonlFile),
        ((".json", ".json.gz"), JsonFile),
    ),
    default=JsonFile,
    none_in_folder="no .jsonl, .json or .parquet files of conversations in this folder",
)

Messages = list[dict[str, str]]


def check_format(fmt: str) -> None:
    if fmt not in CHAT_FORMATS:
        raise UserError(f"unknown chat format {fmt!r}; choose one of: {', '.join(CHAT_FORMATS)}")


def to_messages(row: Any, fmt: str) -> tuple[Optional[Messages], Optional[str]]:
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
# Sources of conversations


def conversation_files(source: str) -> Optional[list[FileInput]]:
    """The files of a local SOURCE (a folder: sorted by relative path), listed, not opened, so an output can be
    checked apart from them first; None for hf:. Anything else fails."""
    if source.startswith(HF_PREFIX):
        return None
    files = local_inputs(source, CONVERSATION_READERS)
    if files is None:
        raise UserError(f"{source}: no such file or folder (conversations come from .jsonl, .json, .parquet "
                        "files, folders of them, or hf:NAME)")
    return files


def open_conversations(source: str, files: Optional[list[FileInput]]) -> list[RowInput]:
    """The inputs of SOURCE: its `conversation_files`, or the hf: dataset, opened (every column)."""
    if files is None:
        return [open_hf(source, None)]
    return cast("list[RowInput]", files)  # CONVERSATION_READERS's readers all read rows


@dataclass
class BadRows:
    """Rows that are not usable conversations: how many, and the first SHOW_BAD described."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, described: str) -> None:
        self.count += 1
        if len(self.first) < SHOW_BAD:
            self.first.append(described)


def conversations(inputs: list[RowInput], fmt: str, bad: Optional[BadRows] = None,
                  tally: Tally = lambda n: None) -> Iterator[Messages]:
    """The usable conversations of `inputs` in order, row by row; the other rows are counted in `bad`, the
    source bytes read told to `tally`. An input without a usable row fails."""
    for inp in inputs:
        good, first_problem, n_rows = 0, None, 0
        try:
            for where, row in inp.rows(tally):
                n_rows += 1
                messages, problem = to_messages(row, fmt)
                if messages is None:
                    first_problem = first_problem or f"{where}: {problem}"
                    if bad is not None:
                        bad.add(f"{where}: {problem}")
                    continue
                good += 1
                yield messages
        except OSError as e:  # the disk or the network failed while reading: said in one line
            raise UserError(f"{inp.display}: cannot read it ({e.strerror or one_line(e)})") from None
        if not good:
            why = f"; the first: {first_problem}" if first_problem else ""
            raise UserError(f"{inp.display}: no usable conversation in its {n_rows} rows (format {fmt}){why}")


def read_conversations(source: str, fmt: str) -> tuple[list[Messages], int, list[str]]:
    """(conversations, bad rows, the first SHOW_BAD of them described), all in memory; an input without a
    usable row fails."""
    check_format(fmt)
    bad = BadRows()
    convs = list(conversations(open_conversations(source, conversation_files(source)), fmt, bad))
    return convs, bad.count, bad.first

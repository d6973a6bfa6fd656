"""Corpus sources: SOURCE -> its inputs, and the text path's ordered stream of documents, each read as
non-empty chunks of text.

Owns what a SOURCE may be and which reader reads each kind of input (one module per kind, all built on
gptforge.data.chunks; gptforge.data.conversations lists a conversation SOURCE's inputs with the same
`local_inputs` and its own table of `Readers`):

    a text file (.txt, .md, .txt.gz, any other name)   gptforge.data.text_files.TextFile
    a JSON-lines file (.jsonl, .jsonl.gz, .json.gz)    gptforge.data.text_files.JsonlFile
    a parquet file (.parquet)                          gptforge.data.parquet_files.ParquetFile
    a folder                                           every file above under it, sorted by relative path
    hf:NAME[:CONFIG][@SPLIT]                           gptforge.data.hf_dataset (streamed, split "train")
    shakespeare, pydoc                                 gptforge.data.builtin_sources

and walking a corpus's inputs from any (input, chunk) position with `read`, which is how an interrupted
`prepare` skips what it already encoded without tokenizing it again; `read_bar` is the progress over
the source bytes read, for both paths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.data.builtin_sources import BUILTINS, open_builtin
from gptforge.data.chunks import FileInput, Input, Tally
from gptforge.data.hf_dataset import HF_PREFIX, open_hf
from gptforge.data.parquet_files import ParquetFile
from gptforge.data.text_files import JsonlFile, TextFile
from gptforge.errors import UserError
from gptforge.files import check_apart, path_problem
from gptforge.progress import Progress


@dataclass(frozen=True)
class Readers:
    """Which reader reads a local file: the first suffix that matches picks it; a file named otherwise is read
    by `default` when given by name, and skipped inside a folder (`none_in_folder` when nothing is left)."""

    by_suffix: tuple[tuple[tuple[str, ...], type[FileInput]], ...]
    default: type[FileInput]
    none_in_folder: str

    def reader_for(self, name: str) -> type[FileInput] | None:
        lower = name.lower()
        return next((reader for suffixes, reader in self.by_suffix if lower.endswith(suffixes)), None)


TEXT_READERS = Readers(
    by_suffix=(
        ((".parquet",), ParquetFile),
        ((".jsonl", ".jsonl.gz", ".json.gz"), JsonlFile),
        ((".txt", ".md", ".txt.gz"), TextFile),
    ),
    default=TextFile,
    none_in_folder="no .txt, .md, .jsonl or .parquet files in this folder (hidden files are skipped)",
)


@dataclass
class Corpus:
    source: str
    inputs: list[Input]
    text_field: str

    @property
    def total_bytes(self) -> int | None:
        return total_bytes(self.inputs)


def total_bytes(inputs: Iterable[Input]) -> int | None:
    """The inputs' size in all, or None when one's is unknown (a streamed dataset)."""
    sizes = [i.size for i in inputs]
    return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def read(corpus: Corpus, tally: Tally, start: tuple[int, int] = (0, 0),
         on_input_done: Callable[[int, dict[str, Any]], None] | None = None
         ) -> Iterator[tuple[str, bool, int, int]]:
    """(text, starts_document, input_index, chunks_read_of_that_input) for every non-empty chunk.

    From `start` = (input, chunk): earlier inputs are not opened, and the first `chunk` chunks of
    `input` are read (so its sha256 is complete) but not yielded. `on_input_done(index, record)` gets
    the manifest record of each input read to its end."""
    first, skip = start
    for index in range(first, len(corpus.inputs)):
        gen = corpus.inputs[index].chunks(corpus.text_field, tally)
        n = 0
        while True:
            try:
                text, doc_start = next(gen)
            except StopIteration as stop:
                if on_input_done is not None:
                    on_input_done(index, stop.value)
                break
            n += 1
            if index == first and n <= skip:
                continue
            yield text, doc_start, index, n


def read_bar(total: int | None, desc: str, progress: bool, initial: int = 0, unit: str = "B") -> Progress:
    """The progress over the source bytes read, or another `unit` (conversations), on stderr: a bar on a
    terminal, periodic lines off one (gptforge.progress); shown only with `progress`."""
    return Progress(total, desc, unit=unit, unit_scale=True, enabled=progress, initial=initial, leave=True)


def _file_input(path: Path, name: str, display: str, readers: Readers) -> FileInput:
    return (readers.reader_for(path.name) or readers.default).of(path, name, display)


def _folder_inputs(root: Path, source: str, readers: Readers) -> list[FileInput]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and readers.reader_for(name) is not None:
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise UserError(f"{source}: {readers.none_in_folder}")
    found.sort()
    return [_file_input(path, rel, os.path.join(source, rel), readers) for rel, path in found]


def local_path(source: str) -> Path | None:
    """SOURCE as an existing local file or folder, or None when nothing is there by that name (it may be a
    built-in or hf: source). A name that is there but cannot be read as one is refused in one line
    (gptforge.files.path_problem: a symbolic link loop or one to nothing, a device, pipe or socket), and so is
    an empty SOURCE (it would mean the current folder)."""
    if not source:
        raise UserError("SOURCE is empty ''; name a file, a folder, hf:NAME or a built-in corpus "
                        f"({', '.join(BUILTINS)})")
    path = Path(source).expanduser()
    if not os.path.lexists(path):
        return None
    if path_problem(path, "folder") is None or (problem := path_problem(path, "file")) is None:
        return path
    raise UserError(f"{source} {problem}")


def local_inputs(source: str, readers: Readers = TEXT_READERS) -> list[FileInput] | None:
    """The inputs of SOURCE when it is a local file or folder, listed but not opened, each read by the reader
    `readers` picks; None for hf: and the built-ins (an existing path wins over a built-in name; "hf:" always
    means a dataset)."""
    path = None if source.startswith(HF_PREFIX) else local_path(source)
    if path is None:
        return None
    if path.is_dir():
        return _folder_inputs(path, source, readers)
    return [_file_input(path, path.name, source, readers)]


def check_outputs(source: str, files: Iterable[Path], outputs: Iterable[Path]) -> None:
    """Refuse an output that is, contains or lies inside local SOURCE or one of its input `files`, before
    anything is read or written (gptforge.files.check_apart: one line naming both)."""
    paths = [Path(source).expanduser(), *files]
    for out in outputs:
        check_apart(out, paths)


def open_source(source: str, text_field: str, local: list[FileInput] | None = None) -> Corpus:
    """SOURCE -> Corpus, every input checked as far as it can be without reading it. `local`: the caller's
    `local_inputs(source)`, when it has listed them already."""
    inputs: list[Input] | None = local if local is not None else local_inputs(source)
    if inputs is None and source.startswith(HF_PREFIX):
        inputs = [open_hf(source, text_field)]
    elif inputs is None and source in BUILTINS:
        inputs = [open_builtin(source)]
    elif inputs is None:
        raise UserError(f"{source}: no such file or folder, and not a built-in source ({', '.join(BUILTINS)}) "
                        "or a Hugging Face dataset (hf:NAME)")
    for inp in inputs:
        inp.check(text_field)
    return Corpus(source, inputs, text_field)

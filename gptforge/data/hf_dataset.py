"""SOURCE hf:NAME[:CONFIG][@SPLIT]: a Hugging Face dataset, streamed through `datasets` (optional: [hf]).

Owns naming a dataset and its split, opening it as a stream (from the Hub or a local folder) with the
failures of that (offline, no such dataset, config or split, no text column) turned into one-line user
errors, what the manifest records of it (name, config, split, revision, fingerprint), what a resume
checks has not changed (its data files), and its rows as records: the text path reads only the text
column, gptforge.data.conversations every column. It builds on gptforge.data.chunks like every other
reader; gptforge.data.sources sends hf: sources here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from gptforge.data.chunks import RowInput, Rows, Tally, one_line
from gptforge.errors import UserError

HF_PREFIX = "hf:"
HF_BATCH_ROWS = 1024


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """hf:NAME[:CONFIG][@SPLIT] -> (NAME, CONFIG or None, SPLIT, default "train"). NAME may be a local path."""
    rest, config, split = source[len(HF_PREFIX):], None, "train"
    if "@" in rest and "/" not in rest.rsplit("@", 1)[1]:
        rest, split = rest.rsplit("@", 1)
    if ":" in rest and "/" not in rest.rsplit(":", 1)[1]:
        rest, config = rest.rsplit(":", 1)
    if not rest or not split or config == "":
        raise UserError(f"{source}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    return rest, config, split


def _hf_error(source: str, e: Exception) -> UserError:
    if isinstance(e, ConnectionError) or "offline" in type(e).__name__.lower():
        offline = "offline" in str(e).lower() or any(
            os.environ.get(v, "") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        hint = ("it is not in the local Hugging Face cache and offline mode is on" if offline else
                "check the name and your network, or set HF_DATASETS_OFFLINE=1 to use the local cache")
        return UserError(f"{source}: cannot reach the dataset on the Hugging Face Hub ({one_line(e)}); {hint}, "
                         "or pass a local file or folder as SOURCE")
    if isinstance(e, FileNotFoundError):
        return UserError(f"{source}: no such dataset ({one_line(e)}); check hf:NAME[:CONFIG][@SPLIT] "
                         "or pass a local file or folder as SOURCE")
    if isinstance(e, ValueError):  # an unknown config or split: datasets lists the ones there are
        return UserError(f"{source}: {one_line(e)}")
    return UserError(f"{source}: cannot open this dataset ({type(e).__name__}: {one_line(e)})")


def _hf_meta(builder: Any, name: str, split: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"dataset": name, "config": builder.config.name, "split": split}
    files = [str(f) for files in (builder.config.data_files or {}).values() for f in files]
    revision = next((m.group(1) for f in files if (m := re.search(r"@([0-9a-f]{40})/", f))), None)
    if revision:  # Hub data files are addressed by commit: the exact revision streamed
        meta["revision"] = revision
    meta["fingerprint"] = builder.hash
    return meta


def _hf_stamp(builder: Any) -> list[Any]:
    """The data files (and, for local ones, their sizes and times): resuming needs the same data."""
    stamp: list[Any] = []
    for files in (builder.config.data_files or {}).values():
        for f in files:
            f = str(f)
            try:
                st = os.stat(f)
                stamp.append([f, st.st_size, st.st_mtime_ns])
            except OSError:
                stamp.append([f])
    return stamp


@dataclass
class HFDataset(RowInput):
    """A streamed split of a Hugging Face dataset: one record per row."""

    name: str
    display: str
    dataset: Any  # a datasets.IterableDataset
    meta: dict[str, Any] = field(default_factory=dict)  # what the manifest records besides bytes
    files: list[Any] = field(default_factory=list)  # its data files (`_hf_stamp`)
    size: int | None = None  # unknown before it is streamed

    def stamp(self) -> list[Any]:
        return [self.name, self.size, {**self.meta, "files": self.files}]

    def rows(self, tally: Tally, columns: list[str] | None = None) -> Rows:
        """Its rows (only `columns`, when given); the bytes of their text are the progress and the manifest's."""
        n_bytes, n = 0, 0
        for batch in self.dataset.iter(batch_size=HF_BATCH_ROWS):
            if missing := [c for c in columns or () if c not in batch]:
                raise UserError(f"{self.display}: no column {missing[0]!r} (columns: {', '.join(batch)}); "
                                "pick the column with --text-field")
            names = list(columns or batch)
            for values in zip(*(batch[c] for c in names)):
                size = sum(len(v.encode("utf-8", "surrogatepass")) for v in values if isinstance(v, str))
                n_bytes, n = n_bytes + size, n + 1
                tally(size)
                yield f"{self.display} row {n}", dict(zip(names, values))
        return {"name": self.name, **self.meta, "bytes": n_bytes}

    def text_of(self, where: str, row: Any, text_field: str) -> str:
        text = row[text_field]
        if text and not isinstance(text, str):
            raise UserError(f"{self.display}: column {text_field!r} holds {type(text).__name__}, not text")
        return text or ""  # null and "" are empty documents, skipped


def _select_text(source: str, dataset: Any, text_field: str) -> Any:
    """The dataset with only its text column, after checking it has one (when its features are known)."""
    features = dataset.features
    if features is None:
        return dataset
    if text_field not in features:
        raise UserError(f"{source}: no column {text_field!r} (columns: {', '.join(features)}); "
                        "pick the column with --text-field")
    if getattr(features[text_field], "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{source}: column {text_field!r} holds {features[text_field]}, not text; "
                        "pick the text column with --text-field")
    return dataset.select_columns([text_field])


def open_hf(source: str, text_field: str | None) -> HFDataset:
    """The dataset's split, streamed: with only its `text_field` column (checked when its features are known),
    or every column when None (rows of conversations)."""
    name, config, split = parse_hf(source)
    try:
        # Here, not at the top: datasets is optional (the [hf] extra) and slow to import.
        import datasets
    except ImportError:
        raise UserError(f"{source}: reading Hugging Face datasets needs the datasets package: "
                        "pip install 'gptforge[hf]'") from None
    try:
        # What datasets.load_dataset(name, config, split=split, streaming=True) does, keeping the
        # builder so the manifest can say which revision was read.
        builder = datasets.load_dataset_builder(name, config)
        dataset = builder.as_streaming_dataset(split=split)
    except Exception as e:  # every failure here is about the name, the network or the cache
        raise _hf_error(source, e) from None
    if text_field is not None:
        dataset = _select_text(source, dataset, text_field)
    return HFDataset(name=source, display=source, dataset=dataset,
                     meta=_hf_meta(builder, name, split), files=_hf_stamp(builder))

"""Reader of parquet files (.parquet): one record per row, read in record batches.

Owns the optional pyarrow import, checking the text column from the footer alone when
the source is opened (a wrong --text-field fails at once, not hours in), reading only the columns a caller
needs, and the user errors of unreadable files.
"""

from __future__ import annotations

from typing import Any

from gptforge.data.chunks import FileInput, RowInput, Rows, Tally, one_line, sha256_file
from gptforge.errors import UserError

PARQUET_BATCH_ROWS = 1024


def _pyarrow() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or a one-line error saying how to install them."""
    try:
        # Here, not at the top: pyarrow is optional (the [hf] extra), and only parquet sources need it.
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow: pip install pyarrow (or 'gptforge[hf]')") from None
    return pa, pq


class ParquetFile(FileInput, RowInput):
    def check(self, text_field: str) -> None:
        pf = self._open([text_field])
        try:
            kind = pf.schema_arrow.field(text_field).type
            pa, _ = _pyarrow()
            is_text = [pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None)]
            if not any(f is not None and f(kind) for f in is_text):
                raise UserError(f"{self.display}: column {text_field!r} holds {kind}, not text; "
                                "pick the text column with --text-field")
        finally:
            pf.close()

    def _open(self, columns: list[str] | None) -> Any:
        """The opened file, after checking it has the `columns` (footer only)."""
        pa, pq = _pyarrow()
        try:
            pf = pq.ParquetFile(self.path)
        except OSError as e:
            raise self.cannot_read(e) from None
        except (pa.ArrowException, ValueError) as e:
            raise UserError(f"{self.display}: not a readable parquet file ({one_line(e)})") from None
        names = pf.schema_arrow.names
        if missing := [c for c in columns or () if c not in names]:
            pf.close()
            raise UserError(f"{self.display}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                            "pick the column with --text-field")
        return pf

    def text_of(self, where: str, row: Any, text_field: str) -> str:
        return row[text_field] or ""  # null and "" are empty documents, skipped like empty files (`check`: text)

    def rows(self, tally: Tally, columns: list[str] | None = None) -> Rows:
        pa, _ = _pyarrow()
        pf = self._open(columns)
        n_rows, told, done = pf.metadata.num_rows, 0, 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, use_threads=False):
                for row in batch.to_pylist():
                    done += 1
                    yield f"{self.display} row {done}", row
                share = (self.size or 0) * done // max(n_rows, 1)  # progress in file bytes, by rows read
                tally(share - told)
                told = share
        except pa.ArrowException as e:
            raise UserError(f"{self.display}: cannot read this parquet file ({one_line(e)})") from None
        finally:
            pf.close()
        tally((self.size or 0) - told)
        return {"name": self.name, "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}


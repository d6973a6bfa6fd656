"""Reader of parquet files (.parquet): one document per row of the text column, read in record batches.

Owns the optional pyarrow import, checking the text column from the footer alone when the source is
opened (a wrong --text-field fails at once, not hours in), and the user errors of unreadable files.
"""

from __future__ import annotations

from typing import Any

from gptforge.data.chunks import Chunks, FileInput, Tally, document_chunks, one_line, sha256_file
from gptforge.errors import UserError

PARQUET_BATCH_ROWS = 1024


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet files needs pyarrow: pip install pyarrow (or 'gptforge[hf]')") from None
    return pq


class ParquetFile(FileInput):
    def check(self, text_field: str) -> None:
        self._open(text_field).close()

    def _open(self, text_field: str) -> Any:
        """The opened file, after checking it has a string column `text_field` (footer only)."""
        pq = _pyarrow()
        import pyarrow as pa

        try:
            pf = pq.ParquetFile(self.path)
        except OSError as e:
            raise self.cannot_read(e) from None
        except (pa.ArrowException, ValueError) as e:
            raise UserError(f"{self.display}: not a readable parquet file ({one_line(e)})") from None
        schema = pf.schema_arrow
        if text_field not in schema.names:
            pf.close()
            raise UserError(f"{self.display}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                            "pick the column with --text-field")
        kind = schema.field(text_field).type
        is_text = [pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None)]
        if not any(f is not None and f(kind) for f in is_text):
            pf.close()
            raise UserError(f"{self.display}: column {text_field!r} holds {kind}, not text; "
                            "pick the text column with --text-field")
        return pf

    def chunks(self, text_field: str, tally: Tally) -> Chunks:
        import pyarrow as pa

        pf = self._open(text_field)
        rows, told, done = pf.metadata.num_rows, 0, 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field], use_threads=False):
                for text in batch.column(0).to_pylist():
                    if text:  # null and "" are empty documents, skipped like empty files
                        yield from document_chunks(text)
                done += batch.num_rows
                share = (self.size or 0) * done // max(rows, 1)  # progress in file bytes, by rows read
                tally(share - told)
                told = share
        except pa.ArrowException as e:
            raise UserError(f"{self.display}: cannot read this parquet file ({one_line(e)})") from None
        finally:
            pf.close()
        tally((self.size or 0) - told)
        return {"name": self.name, "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}

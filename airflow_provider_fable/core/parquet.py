"""Parquet output of the load path: accepted rows (and rejects) as files for a data lake.

For users who land results in a lake rather than (or as well as) a SQL table. The file is
streamed: every chunk ``load_batch`` hands over becomes one row group, so memory stays one chunk
whatever the size of the result file, exactly as for the SQL sinks.

The destination is a local path, an fsspec URL (``s3://bucket/key.parquet``, ``gs://...``,
``file:///...``) or any path object with ``fs`` and ``path`` attributes (universal-pathlib's
``UPath``, Airflow's ``ObjectStoragePath``): writing straight to object storage means no task
needs another task's local disk. A file is all-or-nothing: when the load fails, the partial file
is removed (a reader must never see a file without its footer), and a rerun writes it again
from the start, so a retried task leaves the same file as a clean run.

Columns match the SQL table of ``core.sinks.ResultSink``: the id column, one column per output
field (string, int64, float64, bool; decimals as exact text, nested values as JSON text),
``_batch_id``, ``_model``, ``_input_tokens``, ``_output_tokens``, ``_loaded_at`` (UTC). The
rejects file has the rejects table's columns. Values Parquet cannot hold (integers beyond 64
bits) become rejects with reason ``unstorable``, like a value the database refuses.

``pyarrow`` is an optional dependency: ``pip install 'airflow-provider-fable[parquet]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from airflow_provider_fable.core.sinks import (
    ID_TYPES,
    META_COLUMNS,
    REJECT_COLUMNS,
    ResultSink,
    _check_ident,
    output_columns,
)
from airflow_provider_fable.core.validation import Accepted, Rejected
from airflow_provider_fable.core.writer_process import json_text, row_builder


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "Parquet output needs pyarrow: pip install 'airflow-provider-fable[parquet]'"
        ) from exc
    return pa, pq


def _fs_and_path(target: Any) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a local path, an fsspec URL or a UPath/ObjectStoragePath."""
    fs, path = getattr(target, "fs", None), getattr(target, "path", None)
    if fs is not None and isinstance(path, str):
        return fs, path
    import fsspec

    found: tuple[Any, str] = fsspec.core.url_to_fs(
        os.fspath(target) if isinstance(target, os.PathLike) else str(target)
    )
    return found


class _ParquetFile:
    """One Parquet file being streamed: opened lazily, a row group per ``write``."""

    def __init__(self, target: Any, schema: Any) -> None:
        self.fs, self.path = _fs_and_path(target)
        self.schema = schema
        self.handle: Any = None
        self.writer: Any = None

    def write(self, table: Any) -> None:
        _, pq = _pyarrow()
        if self.writer is None:
            parent = self.fs._parent(self.path)
            if parent:
                try:
                    self.fs.makedirs(parent, exist_ok=True)
                except OSError:  # object stores have no directories to make
                    pass
            self.handle = self.fs.open(self.path, "wb")
            self.writer = pq.ParquetWriter(self.handle, self.schema, compression="zstd")
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def close(self) -> None:
        """Finish the file; with no rows written, still write a valid empty file."""
        if self.writer is None:
            self.write(self.schema.empty_table())
        self.writer.close()
        self.handle.close()

    def abort(self) -> None:
        """Drop the partial file (best effort): no reader may see a file without its footer."""
        for step in (
            lambda: self.writer is not None and self.writer.close(),
            lambda: self.handle is not None and self.handle.close(),
            lambda: self.fs.exists(self.path) and self.fs.rm(self.path),
        ):
            try:
                step()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001, S110 - cleanup after an error already raised
                pass


class ParquetSink:
    """Writes accepted rows to one Parquet file and rejects to another (optional), chunk by chunk.

    Same ``write_chunk`` contract as ``ResultSink``, so ``load_batch`` drives either (or both,
    through ``TeeSink``). Call ``close()`` after the last batch (or use it as a context manager,
    which also removes the partial files when the load fails).
    """

    def __init__(
        self,
        path: Any,
        *,
        id_column: str,
        output_model: type[BaseModel],
        rejects_path: Any = None,
        id_type: str = "text",
    ) -> None:
        pa, _ = _pyarrow()
        if id_type not in ID_TYPES:
            raise ValueError(f"id_type must be one of {ID_TYPES}, not {id_type!r}")
        self.kinds = output_columns(output_model)
        self.id_column = _check_ident(id_column, "id column")
        if self.id_column in self.kinds:
            raise ValueError(f"output model field {id_column!r} clashes with the id column")
        self.id_type = id_type
        arrow_types = {
            "string": pa.string(),
            "integer": pa.int64(),
            "number": pa.float64(),
            "decimal": pa.string(),  # exact text, as the serializer gives it: no precision guess
            "boolean": pa.bool_(),
            "json": pa.string(),
        }
        when = pa.timestamp("us", tz="UTC")
        self.schema = pa.schema(
            [
                (self.id_column, pa.int64() if id_type == "integer" else pa.string()),
                *((name, arrow_types[kind]) for name, kind in self.kinds.items()),
                ("_batch_id", pa.string()),
                ("_model", pa.string()),
                ("_input_tokens", pa.int64()),
                ("_output_tokens", pa.int64()),
                ("_loaded_at", when),
            ]
        )
        assert [f.name for f in self.schema][-len(META_COLUMNS) :] == list(META_COLUMNS)
        types_ = [pa.string()] * 5 + [pa.bool_(), when]
        self.rejects_schema = pa.schema(list(zip(REJECT_COLUMNS, types_, strict=True)))
        self._build_row = row_builder(self.kinds)
        self.accepted_file = _ParquetFile(path, self.schema)
        self.rejects_file = None if rejects_path is None else _ParquetFile(rejects_path, self.rejects_schema)

    # ------------------------------------------------------------------ chunks
    def _table(self, rows: list[tuple[Any, ...]], schema: Any) -> tuple[Any, list[tuple[int, str]]]:
        """An Arrow table of ``rows``; rows with a value the column type cannot hold are left
        out and returned as (index, message)."""
        pa, _ = _pyarrow()
        refused: dict[int, str] = {}
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in schema]
        arrays = []
        for field, values in zip(schema, columns, strict=True):
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowException, OverflowError, TypeError, ValueError):
                for i, value in enumerate(values):
                    try:
                        pa.array([value], type=field.type)
                    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
                        refused.setdefault(i, f"{field.name}: {type(exc).__name__}: {exc}"[:500])
                arrays.append(None)
        if refused:
            keep = [row for i, row in enumerate(rows) if i not in refused]
            table, _ = self._table(keep, schema)
            return table, sorted(refused.items())
        return pa.Table.from_arrays(arrays, schema=schema), []

    def write_chunk(
        self,
        accepted: Sequence[Accepted],
        rejected: Sequence[Rejected],
        *,
        batch_id: str,
        model: str | None,
    ) -> list[Rejected]:
        """Append one row group of accepted rows (and one of rejects); returns the unstorable."""
        if not accepted and not rejected:
            return []
        now = datetime.now(timezone.utc)
        build = self._build_row
        by_id: dict[str, tuple[tuple[Any, ...], Accepted]] = {}  # one row per record: last wins
        refused: list[tuple[Accepted, str]] = []
        for item in accepted:
            key: Any = item.record_id
            if self.id_type == "integer":
                try:
                    key = int(key)
                except ValueError:
                    refused.append((item, f"record id {key!r} is not an integer"))
                    continue
            usage = item.usage
            row = build(item.data, key, batch_id, model, usage.input_tokens, usage.output_tokens, now)
            by_id[item.record_id] = (row, item)
        kept = [item for _, item in by_id.values()]
        table, failed = self._table([row for row, _ in by_id.values()], self.schema)
        refused += [(kept[i], message) for i, message in failed]
        if table.num_rows:
            self.accepted_file.write(table)
        unstorable = [
            Rejected(
                item.record_id,
                "unstorable",
                f"Parquet cannot hold the row: {message}",
                json_text(item.data),
                item.usage,
            )
            for item, message in refused
        ]
        self.write_rejects([*rejected, *unstorable], batch_id=batch_id, now=now)
        return unstorable

    def write_rejects(self, items: Sequence[Rejected], *, batch_id: str, now: datetime | None = None) -> None:
        if self.rejects_file is None or not items:
            return
        rows = ResultSink._reject_rows(items, batch_id, now or datetime.now(timezone.utc))
        table, _ = self._table(rows, self.rejects_schema)
        self.rejects_file.write(table)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        self.accepted_file.close()
        if self.rejects_file is not None:
            self.rejects_file.close()

    def abort(self) -> None:
        self.accepted_file.abort()
        if self.rejects_file is not None:
            self.rejects_file.abort()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TeeSink:
    """The SQL table first, then the same chunk's outcome to Parquet.

    The database has the last word on what is stored: rows it refuses (``unstorable``) go to
    the Parquet rejects, not the Parquet rows, so both destinations hold the same accepted set.
    """

    def __init__(self, sql: ResultSink, lake: ParquetSink) -> None:
        self.sql, self.lake = sql, lake
        self.engine = sql.engine  # load_batch picks its writer thread from the database kind

    def write_chunk(
        self,
        accepted: Sequence[Accepted],
        rejected: Sequence[Rejected],
        *,
        batch_id: str,
        model: str | None,
    ) -> list[Rejected]:
        unstorable = self.sql.write_chunk(accepted, rejected, batch_id=batch_id, model=model)
        if unstorable:
            bad = {r.record_id for r in unstorable}
            accepted = [a for a in accepted if a.record_id not in bad]
        # Parquet refusing a row the database stored is practically impossible (both are 64-bit);
        # if it happens, the row is a Parquet reject only and is still reported as stored.
        self.lake.write_chunk(accepted, [*rejected, *unstorable], batch_id=batch_id, model=model)
        return unstorable

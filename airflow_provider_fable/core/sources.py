"""Record sources: in-memory lists, DataFrames, SQL queries and CSV/JSONL files.

Every source yields plain dicts one at a time so a million-row backlog never has to sit in
memory as Python objects all at once (SQL uses a server-side cursor where the driver has one).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa


def iter_dataframe(df: Any, chunk_size: int = 10_000) -> Iterator[dict[str, Any]]:
    """Rows of a pandas DataFrame as dicts, converting NaN/NaT to None chunk by chunk."""
    for start in range(0, len(df), chunk_size):
        chunk = df.iloc[start : start + chunk_size]
        chunk = chunk.astype(object).where(chunk.notna(), None)
        yield from chunk.to_dict(orient="records")


def iter_sql(
    engine: sa.engine.Engine,
    sql: str,
    parameters: Mapping[str, Any] | None = None,
    chunk_size: int = 10_000,
) -> Iterator[dict[str, Any]]:
    """Rows of a query as dicts, streamed in chunks."""
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(
            sa.text(sql), dict(parameters or {})
        )
        for row in result.mappings():
            yield dict(row)


def iter_file(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a .csv or .jsonl/.ndjson file.

    CSV is read as ``utf-8-sig``: spreadsheet exports start with a byte-order mark, which plain
    ``utf-8`` glues onto the first column name (``"\ufeffid"``), so the id field "disappears".
    A JSONL line must hold one JSON object; anything else is named by file and line rather than
    failing later with a bare TypeError in ``dict(record)``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as fh:
            try:
                yield from csv.DictReader(fh)
            except UnicodeDecodeError as exc:
                # Decoding runs ahead of the reader in blocks, so no honest line number exists here.
                raise ValueError(f"{path}: not UTF-8 ({exc.reason}); re-export it as UTF-8") from None
    elif suffix in (".jsonl", ".ndjson"):
        with path.open("rb") as fh:
            for n, raw in enumerate(fh, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM is not part of the first record
                    raw = raw[3:]
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(
                        f"{path}:{n}: not UTF-8 (byte {exc.start} of the line: {exc.reason})"
                    ) from None
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object ({exc})") from None
                if not isinstance(value, dict):
                    raise ValueError(
                        f"{path}:{n}: not a JSON object (found a JSON {_json_kind(value)}); "
                        'each line must be one record like {"id": ..., ...}'
                    )
                yield value
    else:
        raise ValueError(f"unsupported records file {path}: use .csv, .jsonl or .ndjson")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def iter_records(records: Any) -> Iterator[dict[str, Any]]:
    """Normalise the accepted inputs (list of mappings, DataFrame, path, or a callable returning
    one of those) to dicts. A callable runs at execute time, so a DAG file can name a loader
    (e.g. one that reads Parquet with pandas) without building a DataFrame while it is parsed.
    """
    if callable(records) and not hasattr(records, "iloc"):
        records = records()
    if records is None:
        return iter(())
    if hasattr(records, "iloc") and hasattr(records, "to_dict"):
        return iter_dataframe(records)
    if isinstance(records, (str, Path)):
        return iter_file(records)
    if isinstance(records, Iterable):
        return (dict(r) for r in records)
    raise TypeError(f"records must be a list of dicts, a DataFrame or a file path, not {type(records)!r}")

"""Stable names for the tables a backlog reads and writes: Asset URIs and OpenLineage datasets.

Why: downstream DAGs schedule on the enriched table, and lineage tools join datasets by name, so
the same table must get the same name from every task that touches it, built from the connection
(host, port, database) rather than typed by hand. The rules follow what Airflow's providers
register: ``postgres://host:port/database/schema/table`` (the postgres provider's ``asset-uris``
scheme, OpenLineage namespace ``postgres://host:port`` and name ``database.schema.table``). SQLite
has no registered scheme; a SQLite table is ``sqlite://localhost/<absolute path of the file>/<table>``
(OpenLineage: namespace ``sqlite://localhost/<path>``, name ``<table>``), valid for Airflow as a plain URI.

Pure Python: takes the connection's fields, never looks a connection up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from airflow_provider_fable.core.errors import FableError

#: Column kinds of ``core.sinks.output_columns`` -> the SQL type names lineage reports.
_KIND_TYPES = {
    "string": "text",
    "integer": "bigint",
    "number": "double precision",
    "decimal": "numeric",
    "boolean": "boolean",
    "json": "text",
}


@dataclass(frozen=True)
class TableName:
    """One table, named the way Assets and OpenLineage name it."""

    uri: str
    namespace: str
    name: str


def table_name(
    conn_type: str | None,
    *,
    host: str | None,
    port: int | None = None,
    database: str | None = None,
    table: str,
) -> TableName:
    """The stable name of ``table`` on a connection (``schema.table`` for PostgreSQL works too)."""
    kind = (conn_type or "").lower()
    if kind in ("postgres", "postgresql"):
        if not host or not database:
            raise FableError(f"a postgres connection needs a host and a database to name table {table!r}")
        schema, _, name = table.rpartition(".")
        schema = schema or "public"
        netloc = f"{host}:{int(port or 5432)}"
        return TableName(
            uri=f"postgres://{netloc}/{database}/{schema}/{name}",
            namespace=f"postgres://{netloc}",
            name=f"{database}.{schema}.{name}",
        )
    if kind == "sqlite":
        path = host or database
        if not path:
            raise FableError(
                f"a sqlite connection needs the database file in its host to name table {table!r}"
            )
        path = os.path.abspath(path)
        # ``localhost`` as the authority: Airflow's normalisation drops an empty one (``sqlite:/path``),
        # and a SQLite file is only ever reachable on the machine holding it.
        return TableName(
            uri=f"sqlite://localhost{path}/{table}", namespace=f"sqlite://localhost{path}", name=table
        )
    raise FableError(
        f"no stable table name for connection type {conn_type!r} (postgres and sqlite are supported)"
    )


def table_name_from_connection(conn: Any, table: str) -> TableName:
    """The same from an Airflow ``Connection``-like object (``conn_type``, ``host``, ``port``, ``schema``)."""
    return table_name(
        getattr(conn, "conn_type", None),
        host=getattr(conn, "host", None),
        port=getattr(conn, "port", None),
        database=getattr(conn, "schema", None),
        table=table,
    )


def destination_schema(output_model: Any, *, id_column: str, id_type: str = "text") -> list[tuple[str, str]]:
    """(column, type) of the destination table the load creates from ``output_model``."""
    from airflow_provider_fable.core.sinks import output_columns

    cols = [(id_column, "bigint" if id_type == "integer" else "text")]
    cols += [(name, _KIND_TYPES.get(kind, "text")) for name, kind in output_columns(output_model).items()]
    cols += [
        ("_batch_id", "text"),
        ("_model", "text"),
        ("_input_tokens", "bigint"),
        ("_output_tokens", "bigint"),
        ("_loaded_at", "timestamp with time zone"),
    ]
    return cols


#: The rejects table's columns (``core.sinks.ResultSink.rejects``).
REJECTS_SCHEMA: list[tuple[str, str]] = [
    ("record_id", "text"),
    ("batch_id", "text"),
    ("reason", "text"),
    ("detail", "text"),
    ("raw_answer", "text"),
    ("retryable", "boolean"),
    ("rejected_at", "timestamp with time zone"),
]

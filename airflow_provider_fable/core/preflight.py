"""Pre-flight: everything the load task will need from the destination, checked before paying.

Without it a missing destination connection, a non-SQL connection, a table name with a dot or a
model the sink cannot store is discovered by the load task, after the batches were paid for and
up to 24 hours of waiting. These checks need no API call and no write: they only read the
model's schema and, when given an engine, connect once and look at an existing table.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from airflow_provider_fable.core.errors import FableError

# The same reading of the model the sink uses (a root ``$ref`` of a self-referencing model is
# followed), so the pre-flight judges exactly the columns the load task will derive.
from airflow_provider_fable.core.sinks import META_COLUMNS as RESERVED_COLUMNS
from airflow_provider_fable.core.sinks import model_properties

#: The sink's rule for table/column names (plain, unquoted identifiers up to 63 bytes: PostgreSQL).
SQL_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: Dialects the sink can upsert into.
SUPPORTED_DIALECTS = ("sqlite", "postgresql")


class PreflightError(FableError):
    """The destination cannot take this job's answers; nothing has been submitted yet."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "pre-flight check failed before any batch was created (nothing was paid for):\n- "
            + "\n- ".join(problems)
        )


def _ident_problem(name: Any, what: str) -> str | None:
    if not isinstance(name, str) or not SQL_IDENT.fullmatch(name):
        return f"{what} {name!r} is not a plain SQL identifier (letters, digits, '_'; at most 63)"
    return None


def storage_problems(output_model: type[BaseModel], id_column: str) -> list[str]:
    """Why the sink could not store this model's answers (empty list: it can)."""
    try:
        properties, _ = model_properties(output_model)
    except Exception as exc:  # noqa: BLE001 - any schema failure is reported, not raised raw
        return [
            f"output model {getattr(output_model, '__name__', output_model)!r} has no usable JSON schema: {exc}"
        ]
    name = getattr(output_model, "__name__", str(output_model))
    if not properties:
        return [f"output model {name} has no fields: there would be nothing to store but the id"]
    problems = []
    for field in properties:
        problem = _ident_problem(field, f"output model {name} field")
        if problem:
            problems.append(problem + "; give it a plain alias")
        elif field == id_column:
            problems.append(f"output model {name} field {field!r} clashes with the id column {id_column!r}")
        elif field in RESERVED_COLUMNS:
            problems.append(f"output model {name} field {field!r} clashes with a metadata column")
    return problems


def check_destination(
    *,
    table: str,
    id_column: str,
    output_model: type[BaseModel],
    rejects_table: str | None = None,
    engine: sa.engine.Engine | None = None,
    schema: str | None = None,
) -> None:
    """Raise :class:`PreflightError` listing every problem the load task would hit.

    With ``engine``: its dialect must be one the sink upserts into, it must accept a connection,
    and a table that already exists must have the id column and every output field's column.
    """
    problems = [
        p
        for p in (
            _ident_problem(table, "table"),
            _ident_problem(id_column, "id column"),
            _ident_problem(rejects_table or f"{table}_rejects", "rejects table"),
        )
        if p
    ]
    problems += storage_problems(output_model, id_column)
    if engine is not None:
        problems += _engine_problems(engine, table, id_column, output_model, schema)
    if problems:
        raise PreflightError(problems)


def _engine_problems(
    engine: sa.engine.Engine, table: str, id_column: str, output_model: type[BaseModel], schema: str | None
) -> list[str]:
    dialect = engine.dialect.name
    if dialect not in SUPPORTED_DIALECTS:
        return [f"destination is {dialect!r}; loading supports {' and '.join(SUPPORTED_DIALECTS)}"]
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(table, schema=schema):
                return []
            existing = {c["name"] for c in inspector.get_columns(table, schema=schema)}
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return [f"cannot connect to the destination database ({type(exc).__name__}: {detail})"]
    try:
        wanted = [id_column, *model_properties(output_model)[0]]
    except Exception:  # noqa: BLE001 - already reported by storage_problems
        return []
    missing = [c for c in wanted if c not in existing]
    if missing:
        return [
            f"table {table!r} exists without column(s) {', '.join(missing)} that this output model "
            "needs; migrate it or load into a new table"
        ]
    return []

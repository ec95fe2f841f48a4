"""Idempotent writers for accepted rows and rejects (SQLAlchemy Core; SQLite and PostgreSQL).

Accepted answers are upserted on the record id, so loading the same results twice (a task retry,
a re-run of the DAG) leaves exactly one row per record. Rejects are keyed on (record id, batch
id): the history of why a record failed survives reruns, and writing the same batch twice is a
no-op. Tables are created from the output model when missing so a first run needs no DDL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from airflow_provider_fable.core.validation import Accepted, Rejected

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
META_COLUMNS = ("_batch_id", "_model", "_input_tokens", "_output_tokens", "_loaded_at")


def _check_ident(name: str, what: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"{what} {name!r} is not a plain SQL identifier (letters, digits, '_')")
    return name


def resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` and unwrap ``Optional`` (anyOf [X, null]) to the property's real schema."""
    if "$ref" in prop:
        return resolve(defs.get(prop["$ref"].rsplit("/", 1)[-1], {}), defs)
    for key in ("anyOf", "oneOf"):
        options = [p for p in prop.get(key, ()) if p.get("type") != "null"]
        if len(options) == 1:
            return resolve(options[0], defs)
    return prop


def _json_type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """Collapse a JSON-schema property to one scalar kind: string/integer/number/boolean/json."""
    prop = resolve(prop, defs)
    for key in ("anyOf", "oneOf"):
        if key in prop:
            kinds = {_json_type(p, defs) for p in prop[key] if p.get("type") != "null"}
            return kinds.pop() if len(kinds) == 1 else "json"
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else "json"
    if kind is None and "enum" in prop:
        kind = "string"
    return kind if kind in ("string", "integer", "number", "boolean") else "json"


def _text(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL; a model answer can. Drop it rather than fail the load."""
    return value.replace("\x00", "") if isinstance(value, str) and "\x00" in value else value


_SQL_TYPES = {
    "string": sa.Text,
    "integer": sa.BigInteger,
    "number": sa.Float,
    "boolean": sa.Boolean,
    "json": sa.Text,
}


def output_columns(output_model: type[BaseModel]) -> dict[str, str]:
    """Column name -> scalar kind for every field of the output model."""
    schema = output_model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    return {
        _check_ident(name, "output field"): _json_type(prop, defs)
        for name, prop in schema.get("properties", {}).items()
    }


class ResultSink:
    """Writes accepted rows to ``table`` and rejects to ``rejects_table`` on one engine."""

    def __init__(
        self,
        engine: sa.engine.Engine,
        *,
        table: str,
        id_column: str,
        output_model: type[BaseModel],
        rejects_table: str | None = None,
        schema: str | None = None,
    ) -> None:
        self.engine = engine
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(
                f"upserts are implemented for sqlite and postgresql, not {engine.dialect.name!r}"
            )
        self.kinds = output_columns(output_model)
        self.id_column = _check_ident(id_column, "id column")
        if self.id_column in self.kinds:
            raise ValueError(f"output model field {id_column!r} clashes with the id column")
        meta = sa.MetaData(schema=schema)
        self.table = sa.Table(
            _check_ident(table, "table"),
            meta,
            sa.Column(self.id_column, sa.Text, primary_key=True),
            *(sa.Column(name, _SQL_TYPES[kind]()) for name, kind in self.kinds.items()),
            sa.Column("_batch_id", sa.Text),
            sa.Column("_model", sa.Text),
            sa.Column("_input_tokens", sa.BigInteger),
            sa.Column("_output_tokens", sa.BigInteger),
            sa.Column("_loaded_at", sa.Text),
        )
        self.rejects = sa.Table(
            _check_ident(rejects_table or f"{table}_rejects", "rejects table"),
            meta,
            sa.Column("record_id", sa.Text, primary_key=True),
            sa.Column("batch_id", sa.Text, primary_key=True),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("detail", sa.Text),
            sa.Column("raw_answer", sa.Text),
            sa.Column("retryable", sa.Boolean),
            sa.Column("rejected_at", sa.Text),
        )
        self.metadata = meta

    def ensure_tables(self) -> None:
        self.metadata.create_all(self.engine, checkfirst=True)

    def _insert(self, table: sa.Table) -> Any:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def _upsert(self, table: sa.Table, keys: Sequence[str], rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        stmt = self._insert(table)
        updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)
        return len(rows)

    def _cell(self, name: str, value: Any) -> Any:
        if value is not None and self.kinds[name] == "json":
            value = json.dumps(value, ensure_ascii=False, sort_keys=True)
        return _text(value)

    def write_accepted(self, items: Iterable[Accepted], *, batch_id: str, model: str | None) -> int:
        now = datetime.now(timezone.utc).isoformat()
        rows = [
            {
                self.id_column: item.record_id,
                **{name: self._cell(name, item.data.get(name)) for name in self.kinds},
                "_batch_id": batch_id,
                "_model": model,
                "_input_tokens": item.usage.input_tokens,
                "_output_tokens": item.usage.output_tokens,
                "_loaded_at": now,
            }
            for item in items
        ]
        return self._upsert(self.table, [self.id_column], rows)

    def write_rejected(self, items: Iterable[Rejected], *, batch_id: str) -> int:
        now = datetime.now(timezone.utc).isoformat()
        rows = [
            {
                "record_id": item.record_id,
                "batch_id": batch_id,
                "reason": item.reason,
                "detail": _text(item.detail[:2000]),
                "raw_answer": None if item.raw is None else _text(item.raw[:4000]),
                "retryable": item.retryable,
                "rejected_at": now,
            }
            for item in items
        ]
        return self._upsert(self.rejects, ["record_id", "batch_id"], rows)

"""Idempotent bulk writers for accepted rows and rejects (SQLite and PostgreSQL).

Accepted answers are upserted on the record id, so loading the same results twice (a task retry,
a re-run of the DAG) leaves exactly one row per record. Rejects are keyed on (record id, batch
id): the history of why a record failed survives reruns, and writing the same batch twice is a
no-op. Tables are created from the output model when missing so a first run needs no DDL, with a
``<table>_outcomes`` view giving each record's latest outcome (accepted, or its latest reject).

Speed: a chunk (accepted rows + rejects) is one transaction on one DB-API connection. SQLite gets
one prepared upsert run with ``executemany`` over plain tuples; PostgreSQL gets ``COPY`` into a
temporary staging table and one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` from it (psycopg2
or psycopg 3). Other drivers fall back to SQLAlchemy's executemany.

A value the database refuses (an integer beyond 64 bits, text it cannot encode, a constraint of
a hand-made table) must not block the load: the failing chunk is rolled back and bisected under
savepoints until the offending rows are isolated; each becomes a reject with reason
``unstorable`` and the database's message, and every other row of the chunk is written.
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import io
import logging
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

from airflow_provider_fable.core.results import Usage
from airflow_provider_fable.core.validation import Accepted, Rejected
from airflow_provider_fable.core.writer_process import (
    BuildJob,
    SQLiteStore,
    StoreJob,
    built_rows,
    json_text,
    raw_from_row,
    row_builder,
    rows_builder,
    safe_text,
    strip_nul,
    write_isolating,
)

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
META_COLUMNS = ("_batch_id", "_model", "_input_tokens", "_output_tokens", "_loaded_at")
REJECT_COLUMNS = ("record_id", "batch_id", "reason", "detail", "raw_answer", "retryable", "rejected_at")
ID_TYPES = ("text", "integer")
_COPY_MODES = ("psycopg2", "psycopg")  # drivers whose chunks go through COPY
_NO_USAGE = Usage()


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


def model_properties(output_model: type[BaseModel]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(properties, $defs) of the model's JSON schema (by alias), following a top-level ``$ref``.

    A self-referencing model (``children: list["Node"]``) gets a schema that is only
    ``{"$ref": "#/$defs/Node", "$defs": {...}}``: reading ``properties`` at the top would find
    no fields and load nothing but ids.
    """
    schema = output_model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    if "properties" not in schema and "$ref" in schema:
        schema = resolve(schema, defs)
    return schema.get("properties", {}), defs


def _json_type(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """Collapse a JSON-schema property to one scalar kind: string/integer/number/boolean/json."""
    prop = resolve(prop, defs)
    for key in ("anyOf", "oneOf"):
        if key in prop:
            kinds = {_json_type(p, defs) for p in prop[key] if p.get("type") != "null"}
            return kinds.pop() if len(kinds) == 1 else "json"
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]  # type: ignore[assignment]  # a list here
        kind = kinds[0] if len(kinds) == 1 else "json"  # type: ignore[index]
    if kind is None and "enum" in prop:
        kind = "string"
    return kind if kind in ("string", "integer", "number", "boolean") else "json"


def _is_decimal(annotation: Any) -> bool:
    """``Decimal`` or ``Decimal | None`` (``condecimal`` keeps its constraints outside the type)."""
    if annotation is decimal.Decimal:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and args[0] is decimal.Decimal
    return False


_SQL_TYPES = {
    "string": sa.Text,
    "integer": sa.BigInteger,
    "number": sa.Float,
    "decimal": sa.Numeric,
    "boolean": sa.Boolean,
    "json": sa.Text,
}


def output_columns(output_model: type[BaseModel]) -> dict[str, str]:
    """Column name -> kind for every field of the output model.

    Kinds: string, integer, number, decimal (stored as NUMERIC, exact), boolean, json (nested or
    mixed values, stored as JSON text).
    """
    properties, defs = model_properties(output_model)
    decimals = {
        (info.alias or name)
        for name, info in output_model.model_fields.items()
        if _is_decimal(info.annotation)
    }
    return {
        _check_ident(name, "output field"): "decimal" if name in decimals else _json_type(prop, defs)
        for name, prop in properties.items()
    }


def _quote(name: str) -> str:
    return f'"{name}"'


#: COPY text format escapes: backslash, and the delimiter (tab) and line ends inside a value.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(value: Any) -> str:
    """One value of a COPY text-format line (NULL is ``\\N``; text is escaped, never quoted)."""
    if value is None:
        return "\\N"
    if value.__class__ is bool:
        return "t" if value else "f"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(int(value))
    text = value if isinstance(value, str) else str(value)
    return text.translate(_COPY_ESCAPES)


#: The generated code's text cell: written as it is when printable and backslash-free (only
#: backslash, tab, newline and carriage return are special in COPY text format), else ``slow``.
_FAST_TEXT = r"(v if (v := {get}).__class__ is str and v.isprintable() and '\\' not in v else {slow}(v))"


@functools.lru_cache(maxsize=64)
def _copy_line_builder(width: int) -> Callable[[tuple[Any, ...]], str]:
    """A generated ``row -> COPY text line`` for rows of ``width`` values.

    Why not the csv module: at ~2.7 µs per row it was the costliest step of the PostgreSQL
    load's client side (and it holds the GIL the validating thread needs); this is ~0.8 µs. Text
    values take the fast path (no backslash and nothing unprintable: written as they are, since
    only backslash, tab, newline and carriage return are special in text format); everything
    else goes through ``_copy_value``.
    """
    parts = [_FAST_TEXT.format(get=f"r[{i}]", slow="_cell") for i in range(width)]
    source = f"lambda r: '\\t'.join(({', '.join(parts)},))"
    return eval(source, {"_cell": _copy_cell})  # type: ignore[no-any-return]  # noqa: S307 - no data in the code


def _copy_cell(value: Any) -> str:
    """One value as ``_copy_line_builder`` writes it (text on its fast path, else ``_copy_value``)."""
    if value.__class__ is str:
        return value if value.isprintable() and "\\" not in value else value.translate(_COPY_ESCAPES)
    return _copy_value(value)


def _text_cell(value: Any) -> str:
    """A value of a ``string`` column off the fast path: NUL dropped (as ``row_builder`` does)."""
    return _copy_cell(strip_nul(value)) if value.__class__ is str else _copy_value(value)


def copy_line_from_data(kinds: dict[str, str]) -> Callable[..., str]:
    """A generated ``(data, id, tokens in, tokens out, shared, loaded at) -> COPY line``.

    The same line as ``row_builder`` followed by ``_copy_line_builder``, without the row tuple
    in between, and with what every row of a chunk shares (batch id and model: ``shared``; the
    load time) rendered once per chunk by the caller with ``_copy_cell``: about a third of the
    cost of the two steps. It runs on the loading thread, where the PostgreSQL load spends its
    Python time; ``tests/test_load_path.py`` checks it against the two steps on awkward values.
    """
    parts = [_FAST_TEXT.format(get="rid", slow="_cell")]
    for name, kind in kinds.items():
        get = f"d.get({name!r})"
        if kind == "string":
            parts.append(_FAST_TEXT.format(get=get, slow="_text"))
        elif kind == "json":
            parts.append(rf"('\\N' if (v := {get}) is None else _cell(_json(v)))")
        elif kind == "boolean":
            parts.append(f"(('t' if v else 'f') if (v := {get}).__class__ is bool else _cell(v))")
        elif kind == "integer":
            parts.append(f"(str(v) if (v := {get}).__class__ is int else _cell(v))")
        else:
            parts.append(f"_cell({get})")
    for name in ("tin", "tout"):
        parts.append(f"(str({name}) if {name}.__class__ is int else _cell({name}))")
    parts.insert(len(kinds) + 1, "shared")
    source = f"lambda d, rid, tin, tout, shared, now: '\\t'.join(({', '.join(parts)}, now))"
    namespace = {"_cell": _copy_cell, "_text": _text_cell, "_json": json_text}
    return eval(source, namespace)  # type: ignore[no-any-return]  # noqa: S307 - built from checked identifiers


def _copy_text(rows: Sequence[tuple[Any, ...]]) -> str:
    """Rows as ``COPY ... FROM STDIN`` text format (tab-separated, ``\\N`` for NULL)."""
    if not rows:
        return ""
    return "\n".join(map(_copy_line_builder(len(rows[0])), rows)) + "\n"


class _Unstorable(Exception):
    """A row refused before it reaches the database (e.g. a text id for an integer id column)."""


class ResultSink:
    """Writes accepted rows to ``table`` and rejects to ``rejects_table`` on one engine.

    :param id_type: ``"text"`` or ``"integer"`` for the id column of a new table; ``None``
        follows the column of an existing table and creates ``text`` otherwise. An integer id
        column lets incremental queries compare it with an integer source id on PostgreSQL.
    """

    def __init__(
        self,
        engine: sa.engine.Engine,
        *,
        table: str,
        id_column: str,
        output_model: type[BaseModel],
        rejects_table: str | None = None,
        schema: str | None = None,
        id_type: str | None = None,
    ) -> None:
        self.engine = engine
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(
                f"upserts are implemented for sqlite and postgresql, not {engine.dialect.name!r}"
            )
        if id_type is not None and id_type not in ID_TYPES:
            raise ValueError(f"id_type must be one of {ID_TYPES} or None, not {id_type!r}")
        self.kinds = output_columns(output_model)
        self.id_column = _check_ident(id_column, "id column")
        if self.id_column in self.kinds:
            raise ValueError(f"output model field {id_column!r} clashes with the id column")
        _check_ident(table, "table")
        self.schema = schema
        self.id_type = id_type or self._existing_id_type(table) or "text"
        meta = sa.MetaData(schema=schema)
        self.table = sa.Table(
            table,
            meta,
            sa.Column(
                self.id_column, sa.BigInteger if self.id_type == "integer" else sa.Text, primary_key=True
            ),
            *(sa.Column(name, _SQL_TYPES[kind]()) for name, kind in self.kinds.items()),
            sa.Column("_batch_id", sa.Text),
            sa.Column("_model", sa.Text),
            sa.Column("_input_tokens", sa.BigInteger),
            sa.Column("_output_tokens", sa.BigInteger),
            sa.Column("_loaded_at", sa.DateTime(timezone=True)),
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
            sa.Column("rejected_at", sa.DateTime(timezone=True)),
        )
        view = f"{table}_outcomes"
        self.outcomes_view: str | None = view if _IDENT.match(view) else None
        self.metadata = meta
        self._columns = [c.name for c in self.table.columns]
        self._build_row = row_builder(self.kinds)
        self._build_rows = rows_builder(self.kinds)
        self._copy_line: Callable[..., str] | None = None
        driver = engine.dialect.driver
        if engine.dialect.name == "sqlite" and driver == "pysqlite":
            self._mode = "sqlite"
        elif engine.dialect.name == "postgresql" and driver in ("psycopg2", "psycopg"):
            self._mode = driver
        else:
            self._mode = "sqlalchemy"
        dbapi = engine.dialect.dbapi
        #: Errors that mean "this data" (not "this connection"): worth isolating row by row.
        self._data_errors: tuple[type[BaseException], ...] = (
            ValueError,  # includes UnicodeEncodeError
            OverflowError,
            TypeError,
            _Unstorable,
            sa.exc.DataError,
            sa.exc.IntegrityError,
            *(getattr(dbapi, n) for n in ("DataError", "IntegrityError") if dbapi and hasattr(dbapi, n)),
        )

    # ------------------------------------------------------------------ DDL
    def _existing_id_type(self, table: str) -> str | None:
        inspector = sa.inspect(self.engine)
        if not inspector.has_table(table, schema=self.schema):
            return None
        for col in inspector.get_columns(table, schema=self.schema):
            if col["name"] == self.id_column:
                return "integer" if isinstance(col["type"], sa.Integer) else "text"
        return None

    def ensure_tables(self) -> None:
        """Create the tables (and the outcomes view) when missing; existing ones are kept."""
        self.metadata.create_all(self.engine, checkfirst=True)
        if self.outcomes_view is None:
            return
        if self.outcomes_view in sa.inspect(self.engine).get_view_names(schema=self.schema):
            return
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(self._outcomes_view_sql())
        except sa.exc.DBAPIError as exc:  # e.g. a table made by an older version (text timestamps)
            log.warning("could not create view %s: %s", self.outcomes_view, exc.orig)

    def _name(self, name: str) -> str:
        return f"{_quote(self.schema)}.{_quote(name)}" if self.schema else _quote(name)

    def _outcomes_view_sql(self) -> str:
        """Each record's latest outcome: its accepted row, unless a later reject exists."""
        t, r, rid = self._name(self.table.name), self._name(self.rejects.name), _quote(self.id_column)
        return f"""CREATE VIEW {self._name(self.outcomes_view or "")} AS
WITH ranked AS (
    SELECT record_id, batch_id, reason, detail, retryable, rejected_at,
           ROW_NUMBER() OVER (PARTITION BY record_id ORDER BY rejected_at DESC, batch_id DESC) AS rn
    FROM {r}
), latest AS (SELECT * FROM ranked WHERE rn = 1)
SELECT CAST(t.{rid} AS TEXT) AS record_id, 'accepted' AS outcome, t._batch_id AS batch_id,
       CAST(NULL AS TEXT) AS reason, CAST(NULL AS TEXT) AS detail, FALSE AS retryable,
       t._loaded_at AS outcome_at
FROM {t} AS t LEFT JOIN latest AS l ON l.record_id = CAST(t.{rid} AS TEXT)
WHERE l.record_id IS NULL OR l.rejected_at <= t._loaded_at
UNION ALL
SELECT l.record_id, 'rejected', l.batch_id, l.reason, l.detail, l.retryable, l.rejected_at
FROM latest AS l LEFT JOIN {t} AS t ON CAST(t.{rid} AS TEXT) = l.record_id
WHERE t.{rid} IS NULL OR l.rejected_at > t._loaded_at"""

    # ------------------------------------------------------------------ rows
    def _now(self) -> Any:
        now = datetime.now(timezone.utc)
        if self._mode == "sqlite":  # SQLAlchemy's SQLite DateTime storage format
            return now.strftime("%Y-%m-%d %H:%M:%S.%f")
        if self._mode == "sqlalchemy":
            return now
        return now.isoformat()

    def _record_id(self, record_id: str) -> Any:
        if self.id_type == "integer":
            try:
                value = int(record_id)
            except ValueError:
                raise _Unstorable(
                    f"record id {record_id!r} is not an integer, but column {self.id_column!r} is"
                ) from None
            if not -(2**63) <= value < 2**63:
                raise _Unstorable(f"record id {record_id!r} is out of range for a 64-bit integer column")
            return value
        return record_id

    def _accepted_rows(
        self, items: Iterable[Accepted], batch_id: str, model: str | None, now: Any
    ) -> tuple[list[tuple[Any, ...]], list[Accepted], list[tuple[Accepted, str]]]:
        """(rows, their items, refused items with why); one row per record id (last wins)."""
        build = self._build_row
        integer_ids = self.id_type == "integer"
        if not integer_ids:
            items = items if isinstance(items, list) else list(items)
            if len({item.record_id for item in items}) == len(items):
                # Text ids, each once (the usual chunk): rows straight from the items, one pass.
                return (
                    [
                        build(i.data, i.record_id, batch_id, model, i.usage.input_tokens, i.usage.output_tokens, now)
                        for i in items
                    ],
                    items,
                    [],
                )  # fmt: skip
        by_id: dict[str, tuple[tuple[Any, ...], Accepted]] = {}
        refused: list[tuple[Accepted, str]] = []
        for item in items:
            key: Any = item.record_id
            if integer_ids:
                try:
                    key = self._record_id(key)
                except _Unstorable as exc:
                    refused.append((item, str(exc)))
                    continue
            usage = item.usage
            row = build(item.data, key, batch_id, model, usage.input_tokens, usage.output_tokens, now)
            by_id[item.record_id] = (row, item)
        rows = [row for row, _ in by_id.values()]
        kept = [item for _, item in by_id.values()]
        return rows, kept, refused

    @staticmethod
    def _reject_rows(items: Iterable[Rejected], batch_id: str, now: Any) -> list[tuple[Any, ...]]:
        by_key = {
            item.record_id: (
                item.record_id,
                batch_id,
                item.reason,
                safe_text(item.detail, 2000),
                safe_text(item.raw, 4000),
                item.retryable,
                now,
            )
            for item in items
        }
        return list(by_key.values())

    # ------------------------------------------------------------------ writes
    def write_chunk(
        self,
        accepted: Sequence[Accepted],
        rejected: Sequence[Rejected],
        *,
        batch_id: str,
        model: str | None,
    ) -> list[Rejected]:
        """Write one chunk of accepted rows and rejects in one transaction.

        Returns the accepted items that could not be stored: they were written as rejects with
        reason ``unstorable`` (and are not in the table).
        """
        if not accepted and not rejected:
            return []
        job, kept, refused = self.prepare_chunk(
            accepted, rejected, batch_id=batch_id, model=model, deferred=self._mode in _COPY_MODES
        )
        return self.unstorable_items(kept, refused, self.store(job))

    def prepare_chunk(
        self,
        accepted: Sequence[Accepted],
        rejected: Sequence[Rejected],
        *,
        batch_id: str,
        model: str | None,
        deferred: bool = False,
    ) -> tuple[StoreJob | BuildJob, list[Accepted], list[Rejected]]:
        """The chunk as plain tuples (``StoreJob``), for ``store`` here or in a writer process.

        Returns the job, the accepted items its rows came from (same order) and the items
        refused before reaching the database (as ``unstorable`` rejects, already in the job).
        With ``deferred``, a chunk of text record ids, each once, becomes a ``BuildJob`` instead:
        the same rows, built where the job is stored (``SQLiteStore.built`` in the SQLite writer
        process, ``store`` here); on PostgreSQL it carries the rows as COPY text, rendered now.
        """
        now = self._now()
        if deferred and self.id_type != "integer":
            items = accepted if isinstance(accepted, list) else list(accepted)
            ids = [item.record_id for item in items]
            if len(set(ids)) == len(ids):
                usages = [item.usage for item in items]
                datas = [item.data for item in items]
                tokens_in = [u.input_tokens for u in usages]
                tokens_out = [u.output_tokens for u in usages]
                text = None
                if self._mode in _COPY_MODES and items:
                    text = self._render_copy(datas, ids, tokens_in, tokens_out, batch_id, model, now)
                job: StoreJob | BuildJob = BuildJob(
                    datas,
                    ids,
                    tokens_in,
                    tokens_out,
                    self._reject_rows(rejected, batch_id, now),
                    batch_id,
                    model,
                    now,
                    text,
                )
                return job, items, []
        rows, kept, refused = self._accepted_rows(accepted, batch_id, model, now)
        early = [_unstorable(item, message) for item, message in refused]
        job = StoreJob(
            rows,
            [item.record_id for item in kept],
            self._reject_rows([*rejected, *early], batch_id, now),
            batch_id,
            now,
        )
        return job, kept, early

    def _render_copy(
        self,
        datas: list[dict[str, Any]],
        ids: list[str],
        tokens_in: list[int],
        tokens_out: list[int],
        batch_id: str,
        model: str | None,
        now: Any,
    ) -> str:
        """Accepted rows as COPY text straight from the answers' data (``copy_line_from_data``)."""
        if self._copy_line is None:
            self._copy_line = copy_line_from_data(self.kinds)
        line = self._copy_line
        shared, at = f"{_copy_cell(batch_id)}\t{_copy_cell(model)}", _copy_cell(now)
        lines = [
            line(d, rid, tin, tout, shared, at)
            for d, rid, tin, tout in zip(datas, ids, tokens_in, tokens_out, strict=True)
        ]
        lines.append("")  # the final newline
        return "\n".join(lines)

    @staticmethod
    def unstorable_items(
        kept: list[Accepted], early: list[Rejected], failed: list[tuple[int, str]]
    ) -> list[Rejected]:
        """The ``unstorable`` rejects of a stored chunk, from ``store``'s (index, message) list."""
        return early + [_unstorable(kept[i], message) for i, message in failed]

    def store(self, job: StoreJob | BuildJob) -> list[tuple[int, str]]:
        """Write a prepared chunk in one transaction; returns (row index, message) refused.

        Needs only plain data and this sink's SQL, so it runs the same on a writer thread (and,
        for SQLite, in a writer process). A refused row's reject is written in the same
        transaction, its raw answer rebuilt from the row (the row holds every field of the
        answer). A ``BuildJob``'s rows are built here, except that its COPY text, when it has
        one, is tried first: only a chunk the database refuses needs the rows (to bisect).
        """
        with self._transaction() as tx:
            text = job.copy_text if isinstance(job, BuildJob) else None
            if text is not None and self._copy_whole(tx, text):
                failed: list[tuple[int, str]] = []
            else:
                if isinstance(job, BuildJob):
                    job = built_rows(self._build_rows, job)
                failed = self._write_isolating(tx, job.rows, whole_refused=text is not None)
            reject_rows = job.reject_rows
            if failed:
                more = [
                    _unstorable_row(
                        job.ids[i], job.batch_id, message, self._raw_from_row(job.rows[i]), job.now  # type: ignore[union-attr]
                    )
                    for i, message in failed
                ]
                reject_rows = list({r[0]: r for r in [*reject_rows, *more]}.values())
            if reject_rows:
                tx.upsert(self.rejects, ("record_id", "batch_id"), list(REJECT_COLUMNS), reject_rows)
        return failed

    def _raw_from_row(self, row: tuple[Any, ...]) -> str:
        """The answer's JSON (as ``json_text`` of the accepted data) from its table row."""
        return raw_from_row(list(self.kinds.items()), row)

    def sqlite_store(self) -> SQLiteStore | None:
        """This sink's ``store`` for the writer process, or None when it needs more than sqlite3.

        Only for a SQLite database file named by a plain URL (no query options the engine would
        apply) through Python's own sqlite3.
        """
        url = self.engine.url
        database = url.database or ""
        if (
            self._mode != "sqlite"
            or url.query
            or database in ("", ":memory:")
            or database.startswith("file:")
        ):
            return None
        return SQLiteStore(
            database,
            _upsert_sql(self._name(self.table.name), (self.id_column,), self._columns, "?"),
            _upsert_sql(self._name(self.rejects.name), ("record_id", "batch_id"), list(REJECT_COLUMNS), "?"),
            list(self.kinds.items()),
        )

    # ------------------------------------------------------------------ writer processes
    def __getstate__(self) -> dict[str, Any]:
        """For a writer process: everything but the engine (re-created from its URL there)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("engine", "_build_row", "_build_rows", "_copy_line")}
        state["_url"] = self.engine.url.render_as_string(hide_password=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        url = state.pop("_url")
        self.__dict__.update(state)
        self.engine = sa.create_engine(url)
        self._build_row = row_builder(self.kinds)
        self._build_rows = rows_builder(self.kinds)
        self._copy_line = None

    def write_accepted(self, items: Iterable[Accepted], *, batch_id: str, model: str | None) -> int:
        """Upsert accepted rows; returns how many were stored (the rest became ``unstorable``)."""
        items = list(items)
        return len(items) - len(self.write_chunk(items, [], batch_id=batch_id, model=model))

    def write_rejected(self, items: Iterable[Rejected], *, batch_id: str) -> int:
        items = list(items)
        self.write_chunk([], items, batch_id=batch_id, model=None)
        return len(items)

    def _copy_whole(self, tx: _Transaction, text: str) -> bool:
        """A chunk's COPY text upserted under a savepoint; False when the database refused it."""
        try:
            with tx.savepoint():
                tx.upsert_text(self.table, (self.id_column,), self._columns, text)
        except self._data_errors:
            return False
        return True

    def _write_isolating(
        self, tx: _Transaction, rows: list[tuple[Any, ...]], *, whole_refused: bool = False
    ) -> list[tuple[int, str]]:
        """Upsert rows; on a data error, bisect under savepoints. Returns (index, message) refused."""
        key = (self.id_column,)
        return write_isolating(
            rows,
            lambda part: tx.upsert(self.table, key, self._columns, part),
            tx.savepoint,
            self._data_errors,
            whole_refused=whole_refused,
        )

    def _transaction(self) -> _Transaction:
        if self._mode == "sqlalchemy":
            return _SATransaction(self)
        return _DBAPITransaction(self)


def _unstorable(item: Accepted, message: str) -> Rejected:
    return Rejected(
        item.record_id,
        "unstorable",
        f"the database refused the row: {message}",
        json_text(item.data),
        item.usage,
    )


def _unstorable_row(record_id: str, batch_id: str, message: str, raw: str, now: Any) -> tuple[Any, ...]:
    return ResultSink._reject_rows(
        [Rejected(record_id, "unstorable", f"the database refused the row: {message}", raw, _NO_USAGE)],
        batch_id,
        now,
    )[0]


def _on_conflict(keys: Sequence[str], columns: Sequence[str]) -> str:
    updates = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in columns if c not in keys)
    return f"ON CONFLICT ({', '.join(_quote(k) for k in keys)}) DO UPDATE SET {updates}"


def _upsert_sql(name: str, keys: Sequence[str], columns: Sequence[str], mark: str) -> str:
    """The prepared upsert of one row (``mark`` is the driver's placeholder)."""
    cols = ", ".join(_quote(c) for c in columns)
    marks = ", ".join(mark for _ in columns)
    return f"INSERT INTO {name} ({cols}) VALUES ({marks}) {_on_conflict(keys, columns)}"


class _Transaction:
    """One chunk's transaction with savepoints and a bulk upsert, per driver family."""

    def __init__(self, sink: ResultSink) -> None:
        self.sink = sink
        self._sp = 0

    def __enter__(self) -> _Transaction:
        raise NotImplementedError

    def __exit__(self, *exc: Any) -> None:
        raise NotImplementedError

    def savepoint(self) -> Any:
        raise NotImplementedError

    def upsert(
        self, table: sa.Table, keys: Sequence[str], columns: list[str], rows: list[tuple[Any, ...]]
    ) -> None:
        raise NotImplementedError

    def upsert_text(self, table: sa.Table, keys: Sequence[str], columns: list[str], data: str) -> None:
        raise NotImplementedError  # COPY text: PostgreSQL through a DB-API driver only


class _DBAPISavepoint:
    def __init__(self, cursor: Any, name: str) -> None:
        self.cursor, self.name = cursor, name

    def __enter__(self) -> None:
        self.cursor.execute(f"SAVEPOINT {self.name}")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.cursor.execute(f"RELEASE SAVEPOINT {self.name}")
        else:
            self.cursor.execute(f"ROLLBACK TO SAVEPOINT {self.name}")
            self.cursor.execute(f"RELEASE SAVEPOINT {self.name}")


class _DBAPITransaction(_Transaction):
    """Raw DB-API connection from the engine's pool: sqlite3, psycopg2 or psycopg 3."""

    _sql_cache: dict[tuple[str, str], str]
    conn: Any  # the driver's connection (sqlite3, psycopg2, psycopg 3)

    def __enter__(self) -> _DBAPITransaction:
        self.raw = self.sink.engine.raw_connection()
        self.conn = self.raw.driver_connection
        self.cursor = self.conn.cursor()
        if self.sink._mode == "sqlite" and not self.conn.in_transaction:
            # Explicit BEGIN: a first SAVEPOINT outside a transaction would otherwise commit on
            # RELEASE, and the chunk must be one transaction.
            self.cursor.execute("BEGIN")
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.cursor.close()
            self.raw.close()

    def savepoint(self) -> _DBAPISavepoint:
        self._sp += 1
        return _DBAPISavepoint(self.cursor, f"fable_sp_{self._sp}")

    def upsert(
        self, table: sa.Table, keys: Sequence[str], columns: list[str], rows: list[tuple[Any, ...]]
    ) -> None:
        if self.sink._mode == "sqlite":
            name = self.sink._name(table.name)
            self.cursor.executemany(_upsert_sql(name, keys, columns, "?"), rows)
            return
        self.upsert_text(table, keys, columns, _copy_text(rows))

    def upsert_text(self, table: sa.Table, keys: Sequence[str], columns: list[str], data: str) -> None:
        """PostgreSQL: ``data`` (COPY text of rows in ``columns`` order) upserted into ``table``."""
        name = self.sink._name(table.name)
        cols = ", ".join(_quote(c) for c in columns)
        conflict = _on_conflict(keys, columns)
        # COPY into a session-private staging table shaped like the target, then one set-based
        # upsert. The staging table empties itself at commit; within the transaction it is
        # truncated after each use (a rolled-back savepoint restores it empty as well).
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        stage = _quote(f"fable_stage_{table.name[:40]}_{digest}")
        self.cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        copy_sql = f"COPY {stage} ({cols}) FROM STDIN"  # text format: tab-separated, \N is NULL
        if self.sink._mode == "psycopg2":
            self.cursor.copy_expert(copy_sql, io.StringIO(data), size=len(data) + 1)
        else:
            with self.cursor.copy(copy_sql) as copy:
                copy.write(data)
        self.cursor.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM {stage} {conflict}")
        self.cursor.execute(f"TRUNCATE {stage}")


class _SATransaction(_Transaction):
    """Any other driver: SQLAlchemy's dialect upsert with executemany and nested transactions."""

    def __enter__(self) -> _SATransaction:
        self.conn = self.sink.engine.connect()
        self.tx = self.conn.begin()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            if exc_type is None:
                self.tx.commit()
            else:
                self.tx.rollback()
        finally:
            self.conn.close()

    def savepoint(self) -> Any:
        return self.conn.begin_nested()

    def upsert(
        self, table: sa.Table, keys: Sequence[str], columns: list[str], rows: list[tuple[Any, ...]]
    ) -> None:
        if self.sink.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]  # same call, other dialect
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys), set_={c: stmt.excluded[c] for c in columns if c not in keys}
        )
        self.conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in rows])

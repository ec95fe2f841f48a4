"""Pre-flight: everything the load task will need from the destination, checked before paying.

Without it a missing destination connection, a non-SQL connection, a table name with a dot or a
model the sink cannot store is discovered by the load task, after the batches were paid for and
up to 24 hours of waiting. These checks need no API call and no write: they only read the
model's schema and, when given an engine, connect once and reflect each existing destination
table once (answers, rejects; the QA table's name only) to compare it with what the load will
write: the id column's uniqueness (the upsert's ON CONFLICT target), the metadata columns, the
rejects table's shape, views, the column limit, column types against the fields' values, and NOT
NULL columns nothing fills. An existing table that passes here is one the load can write; a
table the load created itself always passes (docs/reliability.md, "Pre-flight: the real
destination").
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel

# The same reading of the model the sink uses (a root ``$ref`` of a self-referencing model is
# followed), so the pre-flight judges exactly the columns the load task will derive.
from airflow_provider_fable.core.sinks import META_COLUMNS as RESERVED_COLUMNS
from airflow_provider_fable.core.sinks import REJECT_COLUMNS, model_properties, output_columns, resolve
from airflow_provider_fable.exceptions import PreflightError as PreflightError

#: The sink's rule for table/column names (plain, unquoted identifiers up to 63 bytes: PostgreSQL).
SQL_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: Dialects the sink can upsert into.
SUPPORTED_DIALECTS = ("sqlite", "postgresql")
#: Columns of the QA review table (``core.qa``) besides the id and the answer columns.
QA_COLUMNS = ("qa_rank", "source_excerpt", "_sampled_at")


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
        elif field in QA_COLUMNS:
            problems.append(
                f"output model {name} field {field!r} clashes with a column of the QA table "
                f"({', '.join(QA_COLUMNS)}); give it another alias"
            )
    return problems


def id_column_problems(id_column: str) -> list[str]:
    """The id column shares the answers table with the metadata columns and the QA table's own."""
    if id_column in RESERVED_COLUMNS:
        return [
            f"id column {id_column!r} is named like a metadata column the load writes on every row "
            f"({', '.join(RESERVED_COLUMNS)}); name the id column otherwise"
        ]
    if id_column in QA_COLUMNS:
        return [
            f"id column {id_column!r} is named like a column of the QA table "
            f"({', '.join(QA_COLUMNS)}); name the id column otherwise"
        ]
    return []


def check_destination(
    *,
    table: str,
    id_column: str,
    output_model: type[BaseModel],
    rejects_table: str | None = None,
    engine: sa.engine.Engine | None = None,
    schema: str | None = None,
    qa_table: str | None = None,
) -> None:
    """Raise :class:`PreflightError` listing every problem the load task would hit.

    With ``engine``: its dialect must be one the sink upserts into, it must accept a connection,
    and the tables that already exist must be tables the load can write (see the module's
    docstring); ``qa_table`` defaults to ``<table>_qa`` as the load's does.
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
    names_ok = not problems
    if names_ok:
        problems += id_column_problems(id_column)
    problems += storage_problems(output_model, id_column)
    if engine is not None:
        dialect = engine.dialect.name
        if dialect not in SUPPORTED_DIALECTS:
            problems.append(
                f"destination is {dialect!r}; loading supports {' and '.join(SUPPORTED_DIALECTS)}"
            )
        else:
            problems += _destination_problems(
                engine,
                names_ok=names_ok,
                table=table,
                id_column=id_column,
                output_model=output_model,
                rejects_table=rejects_table or f"{table}_rejects",
                qa_table=qa_table or f"{table}_qa",
                schema=schema,
            )
    if problems:
        raise PreflightError(problems)


# ---------------------------------------------------------------------------- the real tables
#: PostgreSQL refuses a table of more than 1,600 columns; SQLite's default build 2,000.
MAX_COLUMNS = {"postgresql": 1600, "sqlite": 2000}
#: Rejects columns the load may leave NULL (the others it always fills).
_REJECT_NULLABLE = ("detail", "raw_answer", "retryable")
#: Shortest bounded text a rejects column may have: the load writes up to 2,000 characters of
#: detail and 4,000 of raw answer (``writer_process.safe_text``); ids of unknown length need text.
_REJECT_MIN_LENGTH = {"reason": 32, "detail": 2000, "raw_answer": 4000}
#: Bounded text for a metadata column must hold a batch id / model name / ISO timestamp.
_META_MIN_LENGTH = 64
#: The widest string a string field with this JSON-schema ``format`` renders to.
_FORMAT_LENGTH = {"date": 10, "time": 18, "date-time": 32, "uuid": 36}


class _Field:
    """What the load writes into one column of the answers table, read from the model's schema."""

    def __init__(self, name: str, kind: str, prop: dict[str, Any], defs: dict[str, Any], info: Any) -> None:
        self.name: str = name
        self.kind: str = kind
        real = resolve(prop, defs)
        options = [*prop.get("anyOf", ()), *prop.get("oneOf", ())]
        declared = prop.get("type")
        types_: list[Any] = declared if isinstance(declared, list) else []
        self.nullable = (
            any(o.get("type") == "null" for o in options)
            or "null" in types_
            or ("default" in prop and prop["default"] is None)
        )
        self.format: str | None = real.get("format")
        self.enum: list[Any] | None = real.get("enum")
        self.max_length: int | None = real.get("maxLength")
        if self.enum and all(isinstance(v, str) for v in self.enum):
            self.max_length = max(len(v) for v in self.enum)
        elif self.max_length is None and self.format in _FORMAT_LENGTH:
            self.max_length = _FORMAT_LENGTH[self.format]
        low = [real[k] for k in ("minimum", "exclusiveMinimum") if isinstance(real.get(k), (int, float))]
        high = [real[k] for k in ("maximum", "exclusiveMaximum") if isinstance(real.get(k), (int, float))]
        if self.enum and all(isinstance(v, int) for v in self.enum):
            low, high = [min(self.enum)], [max(self.enum)]
        self.low: float | None = min(low) if low else None
        self.high: float | None = max(high) if high else None
        self.max_digits: int | None = None
        self.decimal_places: int | None = None
        for meta in getattr(info, "metadata", ()) or ():
            self.max_digits = getattr(meta, "max_digits", None) or self.max_digits
            places = getattr(meta, "decimal_places", None)
            self.decimal_places = places if places is not None else self.decimal_places


def _model_fields(output_model: type[BaseModel]) -> list[_Field]:
    properties, defs = model_properties(output_model)
    kinds = output_columns(output_model)
    infos = {(info.alias or name): info for name, info in output_model.model_fields.items()}
    return [_Field(name, kinds[name], prop, defs, infos.get(name)) for name, prop in properties.items()]


def _type_name(col_type: Any) -> str:
    try:
        return str(col_type)
    except Exception:  # noqa: BLE001 - some reflected types cannot render without a dialect
        return type(col_type).__name__


def _int_bits(col_type: Any, dialect: str) -> int:
    if dialect == "sqlite" or isinstance(col_type, sa.BigInteger):
        return 64
    return 16 if isinstance(col_type, sa.SmallInteger) else 32


def _fits_int(field: _Field, bits: int) -> bool:
    bound = 2 ** (bits - 1)
    return field.low is not None and field.high is not None and -bound <= field.low and field.high < bound


def _is_text(col_type: Any) -> bool:
    return isinstance(col_type, sa.String) and not isinstance(col_type, sa.Enum)


def _field_type_problem(field: _Field, col_type: Any, dialect: str) -> str | None:
    """Why a column of ``col_type`` cannot hold this field's values (None: it can).

    The compatibility matrix of docs/reliability.md ("Pre-flight: the real destination").
    """
    kind = field.kind
    if isinstance(col_type, sa.types.NullType):
        # SQLite: a column declared without a type stores every value as given. Elsewhere: a
        # type SQLAlchemy does not know (an extension's), which nothing here can vouch for.
        return None if dialect == "sqlite" else "a type the pre-flight does not know"
    if kind in ("string", "json"):
        if isinstance(col_type, sa.Enum) and kind == "string":
            labels = set(col_type.enums or ())
            if field.enum and set(field.enum) <= labels:
                return None
            return f"enum type with labels {sorted(labels)}, which does not cover the field's values"
        if kind == "json" and isinstance(col_type, sa.JSON):
            return None
        if kind == "string" and field.format in ("date-time", "date", "time", "uuid"):
            wanted = {"date-time": sa.DateTime, "date": sa.Date, "time": sa.Time, "uuid": sa.Uuid}
            if isinstance(col_type, wanted[field.format]):
                return None
        if _is_text(col_type):
            length = getattr(col_type, "length", None)
            if length is None:
                return None
            if kind == "string" and field.max_length is not None and field.max_length <= length:
                return None
            return (
                f"holds at most {length} characters, but the field's values are not bounded that "
                "tightly (give the field max_length <= the column's length, or widen the column)"
            )
        return "not a text type; the load writes this field as text"
    if kind == "boolean":
        if isinstance(col_type, sa.Boolean):
            return None
        if dialect == "sqlite" and isinstance(col_type, sa.Integer):
            return None  # SQLite stores booleans as 0/1 integers anyway
        return "not a BOOLEAN column"
    if isinstance(col_type, sa.Float):  # before Numeric: Float is a Numeric
        if kind == "number" and not (dialect == "postgresql" and isinstance(col_type, sa.REAL)):
            return None
        return {
            "number": "a 4-byte REAL, which rounds the field's floats to 6 digits (use DOUBLE PRECISION)",
            "integer": "a floating-point type, which loses integers beyond 2**53",
            "decimal": "a floating-point type, which loses the Decimal's exactness",
        }[kind]
    if kind == "integer" and isinstance(col_type, sa.Integer) and not isinstance(col_type, sa.Boolean):
        bits = _int_bits(col_type, dialect)
        if bits == 64 or _fits_int(field, bits):
            return None
        return (
            f"a {bits}-bit integer, but the field's values are not bounded to it "
            "(give the field ge/le bounds that fit, or use BIGINT)"
        )
    if isinstance(col_type, sa.Numeric) and kind in ("integer", "number", "decimal"):
        precision, scale = col_type.precision, col_type.scale or 0
        if precision is None:
            return None
        if kind == "integer" and field.low is not None and field.high is not None:
            if max(abs(field.low), abs(field.high)) < 10 ** (precision - scale):
                return None
        if kind == "decimal" and field.max_digits is not None and field.decimal_places is not None:
            if field.decimal_places <= scale and field.max_digits - field.decimal_places <= precision - scale:
                return None
        return (
            f"NUMERIC({precision}, {scale}), which the field's values are not declared to fit "
            "(bound the field: ge/le, or max_digits/decimal_places; or use an unbounded NUMERIC)"
        )
    return f"cannot hold the field's {kind} values"


def _meta_type_problem(name: str, col_type: Any, dialect: str) -> str | None:
    if isinstance(col_type, sa.types.NullType) and dialect == "sqlite":
        return None
    if name in ("_input_tokens", "_output_tokens"):
        ok = isinstance(col_type, sa.Integer) or (
            isinstance(col_type, sa.Numeric)
            and not isinstance(col_type, sa.Float)
            and col_type.scale in (None, 0)
        )
        return None if ok else "must be an integer type (token counts)"
    if name in ("_loaded_at", "rejected_at") and isinstance(col_type, sa.DateTime):
        return None
    if _is_text(col_type):
        length = getattr(col_type, "length", None)
        wanted = _REJECT_MIN_LENGTH.get(name, _META_MIN_LENGTH)
        return (
            None
            if length is None or length >= wanted
            else f"holds at most {length} characters, needs {wanted}"
        )
    if name == "retryable":
        ok = isinstance(col_type, sa.Boolean) or (dialect == "sqlite" and isinstance(col_type, sa.Integer))
        return None if ok else "must be BOOLEAN"
    return "must be a text type" + (" or a timestamp" if name in ("_loaded_at", "rejected_at") else "")


def _is_unique_on(
    keys: set[str], pk: dict[str, Any], uniques: list[dict[str, Any]], indexes: list[dict[str, Any]]
) -> bool:
    """Whether an ``ON CONFLICT (keys)`` has an arbiter: a PK, unique constraint or full unique index."""
    if set(pk.get("constrained_columns") or ()) == keys:
        return True
    if any(set(u.get("column_names") or ()) == keys for u in uniques):
        return True
    return any(
        ix.get("unique")
        and set(ix.get("column_names") or ()) == keys
        and not any(
            k.endswith("_where") and v is not None for k, v in (ix.get("dialect_options") or {}).items()
        )
        for ix in indexes
    )


def _reflect(inspector: Any, name: str, schema: str | None) -> dict[str, Any]:
    """One table's columns and keys (each existing table is reflected once)."""
    return {
        "columns": inspector.get_columns(name, schema=schema),
        "pk": inspector.get_pk_constraint(name, schema=schema) or {},
        "uniques": inspector.get_unique_constraints(name, schema=schema),
        "indexes": inspector.get_indexes(name, schema=schema),
    }


def _extra_not_null(where: str, table: dict[str, Any], written: set[str], dialect: str) -> list[str]:
    """Columns the load does not write that would refuse every row: NOT NULL, nothing fills them."""
    pk = list(table["pk"].get("constrained_columns") or ())
    problems = []
    for col in table["columns"]:
        name = col["name"]
        if name in written or col.get("nullable", True) or col.get("computed"):
            continue
        if col.get("identity") and dialect == "postgresql":
            problems.append(
                f"{where} column {name!r} is GENERATED AS IDENTITY and NOT NULL: the load's staging "
                "table (CREATE TEMP TABLE ... LIKE) does not carry identities, so every row would be "
                "refused; use a serial/DEFAULT nextval() column, or make it nullable"
            )
            continue
        if col.get("default") is not None:
            continue
        if dialect == "sqlite" and pk == [name] and isinstance(col["type"], sa.Integer):
            continue  # SQLite's INTEGER PRIMARY KEY is the rowid: filled by the database
        problems.append(
            f"{where} column {name!r} is NOT NULL without a default and the load does not write it, "
            "so every row would be refused; give it a default, make it nullable or drop it"
        )
    return problems


def _answers_problems(
    where: str, table: dict[str, Any], id_column: str, fields: list[_Field], dialect: str
) -> list[str]:
    columns = {c["name"]: c for c in table["columns"]}
    if id_column not in columns:
        return [f"{where} has no id column {id_column!r}; migrate it or load into a new table"]
    problems = []
    missing = [f.name for f in fields if f.name not in columns]
    if missing:
        problems.append(
            f"{where} exists without column(s) {', '.join(missing)} that this output model needs; "
            "migrate it or load into a new table"
        )
    missing_meta = [m for m in RESERVED_COLUMNS if m not in columns]
    if missing_meta:
        problems.append(
            f"{where} has no metadata column(s) {', '.join(missing_meta)}, which the load writes on "
            "every row; add them (see docs/operators.md, `table`) or load into a new table"
        )
    if not _is_unique_on({id_column}, table["pk"], table["uniques"], table["indexes"]):
        problems.append(
            f"{where} column {id_column!r} has no primary key or unique index on it alone: the load's "
            f"upsert (ON CONFLICT ({id_column})) needs one; add UNIQUE ({id_column}) or load into a new table"
        )
    id_type = columns[id_column]["type"]
    if not (
        _is_text(id_type)
        or (isinstance(id_type, sa.Integer) and not isinstance(id_type, sa.Boolean))
        or isinstance(id_type, sa.Uuid)
        or (dialect == "sqlite" and isinstance(id_type, sa.types.NullType))
    ):
        problems.append(
            f"{where} id column {id_column!r} is {_type_name(id_type)}: record ids need text or an integer"
        )
    for field in fields:
        col = columns.get(field.name)
        if col is None:
            continue
        why = _field_type_problem(field, col["type"], dialect)
        if why:
            problems.append(
                f"{where} column {field.name!r} ({_type_name(col['type'])}) cannot hold the output "
                f"model's {field.kind} field: {why}"
            )
        elif field.nullable and not col.get("nullable", True):
            problems.append(
                f"{where} column {field.name!r} is NOT NULL but the output model's field may be None; "
                "make the column nullable or the field required and not Optional"
            )
    for name in RESERVED_COLUMNS:
        if name in columns:
            why = _meta_type_problem(name, columns[name]["type"], dialect)
            if why:
                problems.append(
                    f"{where} metadata column {name!r} ({_type_name(columns[name]['type'])}) {why}"
                )
    written = {id_column, *(f.name for f in fields), *RESERVED_COLUMNS}
    return problems + _extra_not_null(where, table, written, dialect)


def _rejects_problems(where: str, table: dict[str, Any], dialect: str) -> list[str]:
    columns = {c["name"]: c for c in table["columns"]}
    missing = [c for c in REJECT_COLUMNS if c not in columns]
    problems = []
    if missing:
        problems.append(
            f"{where} is not a rejects table of this provider's shape: no column(s) {', '.join(missing)} "
            f"(it needs {', '.join(REJECT_COLUMNS)}); drop or rename it, or pass another rejects_table"
        )
    if not _is_unique_on({"record_id", "batch_id"}, table["pk"], table["uniques"], table["indexes"]):
        problems.append(
            f"{where} has no primary key or unique index on exactly (record_id, batch_id): the load's "
            "upsert of rejects (ON CONFLICT (record_id, batch_id)) needs one"
        )
    for name in REJECT_COLUMNS:
        col = columns.get(name)
        if col is None:
            continue
        col_type = col["type"]
        if name in ("record_id", "batch_id") and not (
            _is_text(col_type) or (dialect == "sqlite" and isinstance(col_type, sa.types.NullType))
        ):
            why: str | None = "must be a text type (record ids are written as text)"
        else:
            why = _meta_type_problem(name, col_type, dialect)
        if why:
            problems.append(f"{where} column {name!r} ({_type_name(col_type)}) {why}")
        elif name in _REJECT_NULLABLE and not col.get("nullable", True):
            problems.append(
                f"{where} column {name!r} is NOT NULL but the load leaves it NULL for some rejects"
            )
    return problems + _extra_not_null(where, table, set(REJECT_COLUMNS), dialect)


def _destination_problems(
    engine: sa.engine.Engine,
    *,
    table: str,
    id_column: str,
    output_model: type[BaseModel],
    rejects_table: str,
    qa_table: str,
    schema: str | None,
    names_ok: bool = True,
) -> list[str]:
    """The real tables (when they exist) against what the load will write into them.

    With bad names (``names_ok`` False, already reported) or a model the sink cannot read, only
    the connection is tried: the tables' comparison would only repeat those problems.
    """
    dialect = engine.dialect.name
    fields: list[_Field] | None = None
    if names_ok:
        try:
            fields = _model_fields(output_model)
        except Exception:  # noqa: BLE001 - already reported by storage_problems
            fields = None
    problems = []
    width = 1 + len(fields or ()) + len(RESERVED_COLUMNS)
    limit = MAX_COLUMNS.get(dialect)
    if fields is not None and limit is not None and width > limit:
        problems.append(
            f"table {table!r} would have {width} columns (id, {len(fields)} fields, "
            f"{len(RESERVED_COLUMNS)} metadata) but {dialect} allows at most {limit}; split the output model"
        )
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            views = set(inspector.get_view_names(schema=schema))
            if dialect == "postgresql":
                views |= set(inspector.get_materialized_view_names(schema=schema))
            tables = set(inspector.get_table_names(schema=schema))
            if fields is None:
                return problems
            for name, what in ((table, "table"), (rejects_table, "rejects table"), (qa_table, "QA table")):
                if name in views:
                    problems.append(
                        f"{what} {name!r} is a view, not a table: the load "
                        + (
                            "replaces the QA table on every load"
                            if what == "QA table"
                            else "upserts rows into it"
                        )
                        + "; name a table, or drop the view"
                    )
            if table in tables:
                where = f"table {table!r}"
                problems += _answers_problems(
                    where, _reflect(inspector, table, schema), id_column, fields, dialect
                )
            if rejects_table in tables:
                where = f"rejects table {rejects_table!r}"
                problems += _rejects_problems(where, _reflect(inspector, rejects_table, schema), dialect)
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return [f"cannot connect to the destination database ({type(exc).__name__}: {detail})"]
    return problems

"""Pre-flight against the real destination tables (issue #18 item 5), on SQLite and PostgreSQL.

Each case is a destination the load cannot write: before this check the submit passed, the user
paid, and then every load failed or every row became ``unstorable``. Each must now be refused
before anything is paid for, with an error naming the table, the column and the rule; and a
table the load created itself must pass its own pre-flight again (round trip).
"""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from pydantic import BaseModel, Field, create_model

from airflow_provider_fable.core.preflight import PreflightError, check_destination
from airflow_provider_fable.core.qa import write_qa_sample
from airflow_provider_fable.core.results import Usage
from airflow_provider_fable.core.sinks import ResultSink
from airflow_provider_fable.core.validation import Accepted, Rejected
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.testing.plugin import point_connection_at


class Answer(BaseModel):
    """Every kind the sink stores: text, bounded text, integer, float, decimal, bool, json, date."""

    label: str
    code: str = Field(max_length=10)
    score: int
    weight: float
    price: Decimal = Field(max_digits=8, decimal_places=2)
    ok: bool
    tags: list[str]
    seen: datetime
    note: str | None = None


ANSWER = {
    "label": "a",
    "code": "c1",
    "score": 3,
    "weight": 0.5,
    "price": "12.50",
    "ok": True,
    "tags": ["x"],
    "seen": "2026-01-02T03:04:05Z",
    "note": None,
}

META = "_batch_id TEXT, _model TEXT, _input_tokens BIGINT, _output_tokens BIGINT, _loaded_at TIMESTAMP"
FIELDS = (
    "label TEXT, code VARCHAR(10), score BIGINT, weight DOUBLE PRECISION, price NUMERIC(12, 2), ok BOOLEAN, "
    "tags TEXT, seen TIMESTAMP, note TEXT"
)
GOOD = f"CREATE TABLE answers (id TEXT PRIMARY KEY, {FIELDS}, {META})"


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'dest.db'}")
        yield engine
        engine.dispose()
    else:
        yield request.getfixturevalue("pg_engine")


def run(engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def problems(engine, model=Answer, **kwargs) -> str:
    """The pre-flight's error text (the test fails when it passes)."""
    spec = dict(table="answers", id_column="id", output_model=model, engine=engine)
    spec.update(kwargs)
    with pytest.raises(PreflightError) as info:
        check_destination(**spec)
    return str(info.value)


def passes(engine, model=Answer, **kwargs) -> None:
    spec = dict(table="answers", id_column="id", output_model=model, engine=engine)
    spec.update(kwargs)
    check_destination(**spec)


# ----------------------------------------------------------------------------- what passes
def test_round_trip_a_table_the_load_created_passes_its_own_preflight(engine):
    passes(engine)  # nothing there yet
    sink = ResultSink(engine, table="answers", id_column="id", output_model=Answer)
    sink.ensure_tables()
    usage = Usage(input_tokens=10, output_tokens=5)
    sink.write_chunk(
        [Accepted("r1", dict(ANSWER), usage)],
        [Rejected("r2", "schema", "bad", "{}", usage)],
        batch_id="b1",
        model="claude-fable-5",
    )
    write_qa_sample(engine, table=sink.table, id_column="id", batch_ids=["b1"], size=5)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM answers").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT count(*) FROM answers_qa").scalar_one() == 1
    passes(engine)
    # An integer id column made by the load passes too.
    ResultSink(
        engine, table="int_answers", id_column="id", output_model=Answer, id_type="integer"
    ).ensure_tables()
    passes(engine, table="int_answers")


def test_a_compatible_hand_made_table_passes(engine):
    # Unique index instead of a primary key, bounded text wide enough for the field's max_length,
    # extra nullable and defaulted NOT NULL columns, a rejects table with its own extra column.
    run(
        engine,
        f"CREATE TABLE answers (id VARCHAR(40) NOT NULL, {FIELDS}, {META}, "
        "comment TEXT, status TEXT NOT NULL DEFAULT 'new')",
        "CREATE UNIQUE INDEX answers_id ON answers (id)",
        "CREATE TABLE answers_rejects (record_id TEXT, batch_id TEXT, reason TEXT NOT NULL, detail TEXT, "
        "raw_answer TEXT, retryable BOOLEAN, rejected_at TIMESTAMP, seen_by TEXT, "
        "PRIMARY KEY (record_id, batch_id))",
    )
    passes(engine)
    sink = ResultSink(engine, table="answers", id_column="id", output_model=Answer)
    sink.ensure_tables()
    assert not sink.write_chunk([Accepted("r1", dict(ANSWER), Usage())], [], batch_id="b", model="m")


# ----------------------------------------------------------------------------- what is refused
def test_id_column_that_is_not_unique_is_refused(engine):
    run(engine, f"CREATE TABLE answers (id TEXT, {FIELDS}, {META})")
    text = problems(engine)
    assert "table 'answers' column 'id' has no primary key or unique index on it alone" in text
    assert "ON CONFLICT (id)" in text
    # A unique index on (id, something else) is no ON CONFLICT (id) arbiter either.
    run(engine, "CREATE UNIQUE INDEX answers_pair ON answers (id, label)")
    assert "column 'id' has no primary key or unique index" in problems(engine)


def test_table_without_the_metadata_columns_is_refused(engine):
    run(engine, f"CREATE TABLE answers (id TEXT PRIMARY KEY, {FIELDS}, _batch_id TEXT)")
    text = problems(engine)
    assert (
        "table 'answers' has no metadata column(s) _model, _input_tokens, _output_tokens, _loaded_at" in text
    )


@pytest.mark.parametrize("id_column", ["_batch_id", "_loaded_at", "qa_rank"])
def test_id_column_named_like_a_metadata_column_is_refused(engine, id_column):
    text = problems(engine, id_column=id_column)
    assert f"id column {id_column!r} is named like a" in text
    assert "name the id column otherwise" in text


def test_output_field_named_like_a_qa_column_is_refused():
    # The load's QA table holds the id, qa_rank, source_excerpt, every answer column, _batch_id
    # and _sampled_at: a field called source_excerpt would make its CREATE fail after paying.
    clash = create_model("Clash", source_excerpt=(str, ...), label=(str, ...))
    with pytest.raises(PreflightError, match="field 'source_excerpt' clashes with a column of the QA table"):
        check_destination(table="answers", id_column="id", output_model=clash)


def test_rejects_table_of_another_shape_is_refused(engine):
    run(engine, "CREATE TABLE answers_rejects (record_id TEXT PRIMARY KEY, message TEXT)")
    text = problems(engine)
    assert "rejects table 'answers_rejects' is not a rejects table of this provider's shape" in text
    assert "batch_id, reason, detail, raw_answer, retryable, rejected_at" in text
    assert "no primary key or unique index on exactly (record_id, batch_id)" in text
    # Same columns, but a NOT NULL detail and an integer record id.
    run(
        engine,
        "DROP TABLE answers_rejects",
        "CREATE TABLE my_rejects (record_id BIGINT, batch_id TEXT, reason TEXT NOT NULL, detail TEXT NOT NULL, "
        "raw_answer TEXT, retryable BOOLEAN, rejected_at TIMESTAMP, PRIMARY KEY (record_id, batch_id))",
    )
    text = problems(engine, rejects_table="my_rejects")
    assert "rejects table 'my_rejects' column 'record_id' (BIGINT) must be a text type" in text
    assert "rejects table 'my_rejects' column 'detail' is NOT NULL" in text


@pytest.mark.parametrize("which", ["answers", "answers_rejects", "answers_qa"])
def test_a_view_instead_of_a_table_is_refused(engine, which):
    # The answers table itself, or a view where the load keeps its rejects / replaces its QA sample.
    run(engine, GOOD.replace("answers", "base"), f"CREATE VIEW {which} AS SELECT * FROM base")
    if which != "answers":
        run(engine, GOOD)
    what = {"answers": "table", "answers_rejects": "rejects table", "answers_qa": "QA table"}[which]
    assert f"{what} {which!r} is a view, not a table" in problems(engine)


def test_more_columns_than_the_database_allows_is_refused(engine):
    limit = 1600 if engine.dialect.name == "postgresql" else 2000
    wide = create_model("Wide", **{f"f{i}": (int, ...) for i in range(limit - 5)})  # + id + 5 meta
    text = problems(engine, model=wide)
    assert f"table 'answers' would have {limit + 1} columns" in text
    assert f"allows at most {limit}" in text
    # One column fewer fits, and the load can indeed create it.
    fits = create_model("Fits", **{f"f{i}": (int, ...) for i in range(limit - 6)})
    passes(engine, model=fits)
    ResultSink(engine, table="answers", id_column="id", output_model=fits).ensure_tables()
    with pytest.raises(sa.exc.DBAPIError):  # the limit is the database's own
        ResultSink(engine, table="too_wide", id_column="id", output_model=wide).ensure_tables()


TYPE_CASES = {
    # case: (column replaced, its new declaration, what the error names)
    "str_into_integer": (
        "label TEXT",
        "label INTEGER",
        "column 'label' (INTEGER) cannot hold the output model's string field",
    ),
    "int_into_text": (
        "score BIGINT",
        "score TEXT",
        "column 'score' (TEXT) cannot hold the output model's integer field",
    ),
    "float_into_integer": (
        "weight DOUBLE PRECISION",
        "weight INTEGER",
        "column 'weight' (INTEGER) cannot hold the output model's number field",
    ),
    "json_into_integer": (
        "tags TEXT",
        "tags INTEGER",
        "column 'tags' (INTEGER) cannot hold the output model's json field",
    ),
    "decimal_into_float": ("price NUMERIC(12, 2)", "price DOUBLE PRECISION", "loses the Decimal's exactness"),
    "decimal_too_narrow": ("price NUMERIC(12, 2)", "price NUMERIC(5, 1)", "column 'price' (NUMERIC(5, 1))"),
    "nullable_field_not_null": (
        "note TEXT",
        "note TEXT NOT NULL",
        "column 'note' is NOT NULL but the output model's field may be None",
    ),
    "tokens_as_text": (
        "_input_tokens BIGINT",
        "_input_tokens TEXT",
        "metadata column '_input_tokens' (TEXT) must be an integer type",
    ),
}
PG_TYPE_CASES = {
    "varchar_too_short": ("code VARCHAR(10)", "code VARCHAR(5)", "column 'code' (VARCHAR(5)) cannot hold"),
    "unbounded_str_into_varchar": (
        "label TEXT",
        "label VARCHAR(200)",
        "column 'label' (VARCHAR(200)) cannot hold",
    ),
    "bool_into_integer": (
        "ok BOOLEAN",
        "ok INTEGER",
        "column 'ok' (INTEGER) cannot hold the output model's boolean field",
    ),
    "int_into_int32": (
        "score BIGINT",
        "score INTEGER",
        "a 32-bit integer, but the field's values are not bounded",
    ),
    "float_into_real": ("weight DOUBLE PRECISION", "weight REAL", "a 4-byte REAL"),
}


@pytest.mark.parametrize("case", [*TYPE_CASES, *PG_TYPE_CASES])
def test_column_types_that_cannot_hold_the_values_are_refused(engine, case):
    if case in PG_TYPE_CASES and engine.dialect.name != "postgresql":
        pytest.skip("SQLite does not enforce lengths, and stores booleans and any integer in INTEGER")
    old, new, expected = {**TYPE_CASES, **PG_TYPE_CASES}[case]
    assert old in GOOD
    run(engine, GOOD.replace(old, new))
    text = problems(engine)
    assert expected in text and "table 'answers'" in text, text


def test_pg_type_matrix_accepts_what_holds_the_values(pg_engine):
    class Narrow(BaseModel):
        level: int = Field(ge=0, le=100)
        flag: bool
        kind: str = Field(max_length=5)
        doc: dict[str, int]

    run(
        pg_engine,
        f"CREATE TABLE answers (id BIGINT PRIMARY KEY, level SMALLINT, flag BOOLEAN, kind VARCHAR(5), doc JSONB, {META})",
    )
    passes(pg_engine, model=Narrow)
    sink = ResultSink(pg_engine, table="answers", id_column="id", output_model=Narrow)
    row = {"level": 100, "flag": False, "kind": "abcde", "doc": {"a": 1}}
    assert not sink.write_chunk([Accepted("7", row, Usage())], [], batch_id="b", model="m")


def test_sqlite_stores_booleans_in_integer_columns(sqlite_engine):
    run(sqlite_engine, GOOD.replace("ok BOOLEAN", "ok INTEGER"))
    passes(sqlite_engine)


def test_extra_not_null_column_the_load_does_not_fill_is_refused(engine):
    run(engine, GOOD.replace("note TEXT", "note TEXT, owner TEXT NOT NULL"))
    text = problems(engine)
    assert (
        "table 'answers' column 'owner' is NOT NULL without a default and the load does not write it" in text
    )
    run(
        engine,
        "CREATE TABLE answers_rejects (record_id TEXT, batch_id TEXT, reason TEXT, detail TEXT, raw_answer TEXT, "
        "retryable BOOLEAN, rejected_at TIMESTAMP, reviewer TEXT NOT NULL, PRIMARY KEY (record_id, batch_id))",
    )
    assert "rejects table 'answers_rejects' column 'reviewer' is NOT NULL without a default" in problems(
        engine
    )


def test_pg_identity_column_is_refused(pg_engine):
    # Every row would fail: the load's COPY staging table (LIKE ... INCLUDING DEFAULTS) keeps the
    # NOT NULL but not the identity. A serial column (a nextval default) is fine.
    run(pg_engine, GOOD.replace("note TEXT", "note TEXT, seq INT GENERATED ALWAYS AS IDENTITY, n SERIAL"))
    text = problems(pg_engine)
    assert "column 'seq' is GENERATED AS IDENTITY" in text and "'n'" not in text
    sink = ResultSink(pg_engine, table="answers", id_column="id", output_model=Answer)
    sink.ensure_tables()
    refused = sink.write_chunk([Accepted("r1", dict(ANSWER), Usage())], [], batch_id="b", model="m")
    assert [r.reason for r in refused] == ["unstorable"]  # what the pre-flight spares the user


def test_every_problem_is_listed_at_once(engine):
    run(
        engine,
        f"CREATE TABLE answers (id TEXT, label INTEGER, {FIELDS.replace('label TEXT, ', '')}, owner TEXT NOT NULL)",
    )
    text = problems(engine)
    for part in (
        "has no primary key",
        "has no metadata column(s)",
        "column 'label' (INTEGER)",
        "column 'owner'",
    ):
        assert part in text


# ----------------------------------------------------------------------------- through the operator
def test_submit_refuses_a_view_destination_before_the_first_create(
    fable_emulator_factory, fable_airflow, tmp_path
):
    server = fable_emulator_factory()
    point_connection_at(server)
    db = tmp_path / "dest.db"
    fable_airflow.set_connection("pf_dest", conn_type="sqlite", host=str(db))
    engine = sa.create_engine(f"sqlite:///{db}")
    run(engine, "CREATE TABLE base (id TEXT)", "CREATE VIEW answers AS SELECT * FROM base")
    op = FableBatchSubmitOperator(
        task_id="submit",
        prompt_template="Answer for {id}",
        output_model=Answer,
        records=[{"id": "a"}, {"id": "b"}],
        destination_conn_id="pf_dest",
        destination_table="answers",
    )
    with pytest.raises(PreflightError, match="table 'answers' is a view, not a table") as refused:
        op.execute({})
    # A destination the load cannot write stays so on a retry: the task fails without retries.
    from airflow_provider_fable._compat import AirflowFailException

    assert isinstance(refused.value, AirflowFailException)
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        assert json.load(resp)["calls"]["create"] == 0
    engine.dispose()

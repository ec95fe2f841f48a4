"""The idempotent sinks against real SQLite and real PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.results import Usage
from airflow_provider_fable.core.sinks import ResultSink, output_columns
from airflow_provider_fable.core.validation import Accepted, Rejected
from tests.conftest import Paint


def _exercise(engine) -> None:
    sink = ResultSink(engine, table="paint", id_column="job_id", output_model=Paint)
    sink.ensure_tables()
    sink.ensure_tables()  # idempotent
    rows = [
        Accepted(f"j{i}", {"color": "red", "glossy": False, "coats": 1, "note": f"n{i}"}, Usage(10, 2))
        for i in range(5)
    ]
    assert sink.write_accepted(rows, batch_id="b1", model="m") == 5
    # A rerun of the same batch plus an updated answer for j0: still one row per record.
    rows[0] = Accepted("j0", {"color": "blue", "glossy": True, "coats": 2, "note": "again"}, Usage(10, 2))
    sink.write_accepted(rows, batch_id="b2", model="m")
    # A NUL in an answer would make PostgreSQL refuse the whole chunk; it is dropped instead.
    sink.write_accepted(
        [Accepted("j4", {"color": "red", "glossy": False, "coats": 1, "note": "a\x00b"}, Usage())],
        batch_id="b3",
        model="m",
    )
    rej = [Rejected("j9", "schema", "color: bad", '{"color":"pink\x00"}', Usage())]
    sink.write_rejected(rej, batch_id="b1")
    sink.write_rejected(rej, batch_id="b1")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM paint")).scalar_one() == 5
        color, glossy, batch = conn.execute(
            sa.text("SELECT color, glossy, _batch_id FROM paint WHERE job_id = 'j0'")
        ).one()
        assert (color, bool(glossy), batch) == ("blue", True, "b2")
        assert conn.execute(sa.text("SELECT count(*) FROM paint_rejects")).scalar_one() == 1
        assert conn.execute(sa.text("SELECT reason FROM paint_rejects")).scalar_one() == "schema"
        assert conn.execute(sa.text("SELECT note FROM paint WHERE job_id = 'j4'")).scalar_one() == "ab"


def test_sqlite_upsert_is_idempotent(sqlite_engine):
    _exercise(sqlite_engine)


def test_postgres_upsert_is_idempotent(pg_engine):
    _exercise(pg_engine)


def test_output_columns_follow_the_model():
    assert output_columns(Paint) == {
        "color": "string",
        "glossy": "boolean",
        "coats": "integer",
        "note": "string",
    }


def test_unsafe_table_names_are_refused(sqlite_engine):
    with pytest.raises(ValueError, match="identifier"):
        ResultSink(sqlite_engine, table="paint; drop table x", id_column="id", output_model=Paint)

"""Parquet output (issue #8 item 5) on real files, read back with pyarrow.

Through ``load_batch`` alone (Parquet instead of a table), next to SQLite (both must hold the
same accepted rows), to an fsspec URL (fsspec's in-memory filesystem: a real filesystem
implementation, no local disk) and through the operator against the emulator.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from airflow_provider_fable.core.loading import LoadStats, load_batch
from airflow_provider_fable.core.parquet import ParquetSink, TeeSink
from airflow_provider_fable.core.results import ResultLineError, parse_result_line
from airflow_provider_fable.core.sinks import ResultSink
from tests.conftest import Paint
from tests.test_load_path import line, paint


class Counted(BaseModel):
    label: str
    count: int
    tags: list[str] = []


def _lines() -> list[bytes]:
    out = [line(f"r{i}", {"label": f"l{i}", "count": i, "tags": ["a", f"t{i}"]}) for i in range(25)]
    out[3] = line("r3", "not json")
    out[8] = line("r8", None, kind="expired")
    out[13] = line("r13", {"label": "big", "count": 2**70})  # beyond int64: unstorable
    return out


def _load(sink, lines, model=Counted, **kw) -> tuple[LoadStats, list]:
    stats, seen = LoadStats(), []
    load_batch(
        (parse_result_line(x) for x in lines), batch_id="b1", output_model=model, sink=sink,
        stats=stats, chunk_size=10, on_outcomes=seen.extend, **kw,
    )  # fmt: skip
    return stats, seen


def test_parquet_instead_of_a_table_holds_the_accepted_rows_in_row_groups(tmp_path):
    path, rejects = tmp_path / "out" / "rows.parquet", tmp_path / "out" / "rejects.parquet"
    started = datetime.now(timezone.utc)
    with ParquetSink(path, id_column="rid", output_model=Counted, rejects_path=rejects) as sink:
        stats, seen = _load(sink, _lines())
    assert (stats.accepted, stats.rejected) == (22, 3)
    assert stats.reasons == {"invalid_json": 1, "expired": 1, "unstorable": 1}
    assert {o.record_id for o in seen if o.status == "rejected"} == {"r3", "r8", "r13"}

    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3  # one per chunk of 10 results: streamed, not one big write
    table = pq.read_table(path)
    assert table.schema.names == [
        "rid", "label", "count", "tags", "_batch_id", "_model", "_input_tokens", "_output_tokens",
        "_loaded_at",
    ]  # fmt: skip
    assert str(table.schema.field("count").type) == "int64"
    got = {r["rid"]: r for r in table.to_pylist()}
    expected = {f"r{i}" for i in range(25)} - {"r3", "r8", "r13"}
    assert set(got) == expected
    for rid, row in got.items():
        i = int(rid[1:])
        assert (row["label"], row["count"], json.loads(row["tags"])) == (f"l{i}", i, ["a", f"t{i}"])
        assert (row["_batch_id"], row["_model"], row["_input_tokens"]) == ("b1", "claude-haiku-4-5", 10)
        assert row["_loaded_at"] >= started

    bad = {r["record_id"]: r for r in pq.read_table(rejects).to_pylist()}
    assert {k: v["reason"] for k, v in bad.items()} == {
        "r3": "invalid_json", "r8": "expired", "r13": "unstorable",
    }  # fmt: skip
    assert str(2**70) in bad["r13"]["raw_answer"] and "Parquet cannot hold" in bad["r13"]["detail"]
    assert bad["r3"]["retryable"] is True and bad["r13"]["retryable"] is False


def test_parquet_next_to_sqlite_holds_the_same_rows(sqlite_engine, tmp_path):
    sql = ResultSink(sqlite_engine, table="t", id_column="rid", output_model=Paint)
    sql.ensure_tables()
    lines = [line(f"p{i}", paint(i, coats=1 + i % 5)) for i in range(30)]
    lines[5] = line("p5", {"color": "pink"})
    path = tmp_path / "paint.parquet"
    lake = ParquetSink(path, id_column="rid", output_model=Paint)
    with lake:
        stats, _ = _load(TeeSink(sql, lake), lines, Paint)
    assert (stats.accepted, stats.rejected) == (29, 1)
    with sqlite_engine.connect() as conn:
        in_sql = {tuple(r) for r in conn.execute(sa.text("SELECT rid, color, glossy, coats, note FROM t"))}
    cols = ["rid", "color", "glossy", "coats", "note"]
    in_lake = {tuple(r[c] for c in cols) for r in pq.read_table(path).to_pylist()}
    assert len(in_sql) == 29 and in_lake == {(a, b, bool(c), d, e) for a, b, c, d, e in in_sql}


def test_parquet_to_an_fsspec_url_and_integer_ids():
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://lake/run1/counted.parquet"
    lines = [line(str(100 + i), {"label": "x", "count": i}) for i in range(12)] + [
        line("A-1", {"label": "x", "count": 1})
    ]
    with ParquetSink(url, id_column="rid", output_model=Counted, id_type="integer") as sink:
        stats, _ = _load(sink, lines)
    assert (stats.accepted, stats.reasons["unstorable"]) == (12, 1)
    with fs.open("/lake/run1/counted.parquet", "rb") as fh:
        table = pq.read_table(fh)
    assert str(table.schema.field("rid").type) == "int64"
    assert sorted(table.column("rid").to_pylist()) == list(range(100, 112))
    fs.rm("/lake", recursive=True)


def test_a_failed_load_leaves_no_partial_file(tmp_path):
    path = tmp_path / "rows.parquet"

    def stream():
        for i in range(25):
            yield parse_result_line(line(f"r{i}", {"label": "x", "count": i}))
        yield parse_result_line(b'{"custom_id": "torn", "resu')

    with pytest.raises(ResultLineError):
        with ParquetSink(path, id_column="rid", output_model=Counted) as sink:
            load_batch(
                stream(), batch_id="b", output_model=Counted, sink=sink, stats=LoadStats(), chunk_size=10
            )
    assert not path.exists()


def test_an_empty_load_still_writes_a_readable_file(tmp_path):
    path = tmp_path / "empty.parquet"
    with ParquetSink(path, id_column="rid", output_model=Counted) as sink:
        _load(sink, [])
    table = pq.read_table(path)
    assert table.num_rows == 0 and "count" in table.schema.names


def test_operator_writes_parquet_instead_of_or_next_to_the_table(
    fable_emulator_factory, tmp_path, monkeypatch
):
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_fable.operators.load import FableValidateLoadOperator
    from airflow_provider_fable.testing.plugin import point_connection_at
    from tests.test_operators import submit_op

    server = fable_emulator_factory(faults={"errored_rate": 0.3, "seed": 3})
    point_connection_at(server)
    manifest = submit_op().execute({})
    lake = ObjectStoragePath(f"file://{tmp_path}/lake/paint.parquet")
    only = FableValidateLoadOperator(
        task_id="load", batch_ids=manifest, output_model=Paint, id_column="paint_id",
        parquet_path=lake, parquet_rejects_path=str(tmp_path / "lake" / "rejects.parquet"),
    )  # fmt: skip
    summary = only.execute({})
    assert summary["table"] is None and summary["accepted"] + summary["rejected"] == 7
    assert summary["rejected"] > 0  # errored_rate: some rejects to write
    rows = pq.read_table(tmp_path / "lake" / "paint.parquet").to_pylist()
    rejects = pq.read_table(tmp_path / "lake" / "rejects.parquet").to_pylist()
    assert len(rows) == summary["accepted"] and len(rejects) == summary["rejected"]
    assert {r["reason"] for r in rejects} == set(summary["reject_reasons"])

    db = tmp_path / "dest.db"
    monkeypatch.setenv("AIRFLOW_CONN_DEST_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    both = FableValidateLoadOperator(
        task_id="load2", batch_ids=manifest, output_model=Paint, id_column="paint_id",
        destination_conn_id="dest_db", table="paint", parquet_path=str(tmp_path / "both.parquet"),
    )  # fmt: skip
    assert both.execute({})["accepted"] == summary["accepted"]
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        in_sql = {tuple(r) for r in conn.execute(sa.text("SELECT paint_id, color, coats, note FROM paint"))}
    engine.dispose()
    cols = ["paint_id", "color", "coats", "note"]
    in_lake = {tuple(r[c] for c in cols) for r in pq.read_table(tmp_path / "both.parquet").to_pylist()}
    assert in_lake == in_sql and len(in_sql) == summary["accepted"]


def test_operator_needs_a_destination():
    from airflow_provider_fable.operators.load import FableValidateLoadOperator

    with pytest.raises(ValueError, match="parquet_path"):
        FableValidateLoadOperator(task_id="x", batch_ids=["b"], output_model=Paint)

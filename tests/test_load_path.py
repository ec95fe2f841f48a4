"""The bulk load path (core.loading + core.sinks) on real SQLite and real PostgreSQL.

Covers the sink items of issue #6: unstorable rows become rejects while the rest loads (2), the
id column follows the source id type so the quickstart's incremental query works (5), Decimal
fields are numeric (6), real timestamps and a latest-outcome view (11); plus the RecordOutcome
callback the ledger relies on, COPY escaping, and self-referencing output models.
"""

from __future__ import annotations

import json
import math
import sys
from decimal import Decimal

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from airflow_provider_fable.core.loading import LoadStats, RecordOutcome, load_batch
from airflow_provider_fable.core.results import parse_result_line
from airflow_provider_fable.core.sinks import ResultSink, output_columns
from tests.conftest import Color, Paint


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request):
    return request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")


def line(custom_id: str, answer: object, *, kind: str = "succeeded") -> bytes:
    if kind != "succeeded":
        return json.dumps({"custom_id": custom_id, "result": {"type": kind}}).encode()
    text = answer if isinstance(answer, str) else json.dumps(answer)
    message = {
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    return json.dumps({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}).encode()


def paint(i: int, **extra: object) -> dict:
    return {"color": "red", "glossy": False, "coats": 1, "note": f"n{i}", **extra}


def load(engine, lines, model=Paint, *, batch_id="b1", chunk_size=1000, **sink_kw):
    sink = ResultSink(engine, table="t", id_column="rid", output_model=model, **sink_kw)
    sink.ensure_tables()
    stats, seen = LoadStats(), []
    load_batch(
        (parse_result_line(x) for x in lines),
        batch_id=batch_id,
        output_model=model,
        sink=sink,
        stats=stats,
        chunk_size=chunk_size,
        on_outcomes=seen.extend,
    )
    return stats, seen


def rows(engine, sql: str) -> list:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).all()


class Counted(BaseModel):
    label: str
    count: int


def test_unstorable_value_is_a_reject_and_the_rest_loads(engine):
    """#6 item 2: an int beyond 64 bits used to fail the chunk (and every rerun) forever."""
    answers = [{"label": f"l{i}", "count": i} for i in range(40)]
    answers[7]["count"] = 2**70
    answers[31]["count"] = -(2**80)
    lines = [line(f"r{i}", a) for i, a in enumerate(answers)]
    for attempt in range(2):  # a rerun loads the same way: no blocked load, no duplicates
        stats, seen = load(engine, lines, Counted, chunk_size=16)
        assert (stats.accepted, stats.rejected) == (38, 2), attempt
        assert stats.reasons == {"unstorable": 2}
        assert rows(engine, "SELECT count(*) FROM t")[0][0] == 38
        rejects = rows(engine, "SELECT record_id, reason, detail, raw_answer, retryable FROM t_rejects")
        assert sorted(r.record_id for r in rejects) == ["r31", "r7"]
        for r in rejects:
            assert r.reason == "unstorable" and r.retryable is not None and not r.retryable
            assert "refused" in r.detail and ("int" in r.detail.lower() or "range" in r.detail.lower())
            assert str(2**70) in r.raw_answer or str(-(2**80)) in r.raw_answer
        bad = [o for o in seen if o.status == "rejected"]
        assert sorted(o.record_id for o in bad) == ["r31", "r7"]
        assert all(o.reason == "unstorable" and not o.retryable for o in bad)
        assert len([o for o in seen if o.status == "accepted"]) == 38


def test_outcomes_are_reported_after_commit_in_the_agreed_shape(engine):
    lines = [line("a1", paint(1)), line("a2", "not json"), line("a3", None, kind="expired")]
    stats, seen = load(engine, lines)
    assert all(isinstance(o, RecordOutcome) for o in seen)
    by_id = {o.record_id: o for o in seen}
    assert by_id["a1"] == RecordOutcome("a1", "a1", "accepted", None, False, "b1")
    assert by_id["a2"] == RecordOutcome("a2", "a2", "rejected", "invalid_json", True, "b1")
    assert by_id["a3"] == RecordOutcome("a3", "a3", "rejected", "expired", True, "b1")


def test_copy_and_executemany_keep_awkward_text_exact(engine):
    note = 'tab\there\nnew line \\N back\\slash "quoted" é 🎨\r'
    load(engine, [line("x", paint(1, note=note[:80]))])
    assert rows(engine, "SELECT note FROM t")[0][0] == note[:80]


@pytest.mark.parametrize("id_kind", ["integer", "text"])
def test_incremental_query_of_the_quickstart_works_with_integer_and_text_ids(engine, id_kind):
    """#6 item 5: with integer source ids the id column was text and PostgreSQL refused
    ``s.review_id = r.review_id`` (text = integer) on the second run."""
    col = "BIGINT" if id_kind == "integer" else "TEXT"
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE reviews (review_id {col} PRIMARY KEY, text TEXT)"))
        for i in range(1, 6):
            conn.execute(
                sa.text("INSERT INTO reviews VALUES (:i, 'great')"), {"i": i if col == "BIGINT" else str(i)}
            )
    sink = ResultSink(
        engine, table="review_sentiment", id_column="review_id", output_model=Paint, id_type=id_kind
    )
    sink.ensure_tables()
    load_batch(
        (parse_result_line(line(str(i), paint(i))) for i in (1, 2)),
        batch_id="b1", output_model=Paint, sink=sink, stats=LoadStats(),
    )  # fmt: skip
    query = """SELECT r.review_id, r.text FROM reviews r
               WHERE NOT EXISTS (SELECT 1 FROM review_sentiment s WHERE s.review_id = r.review_id)
               ORDER BY r.review_id"""
    left = [r.review_id for r in rows(engine, query)]
    assert [str(x) for x in left] == ["3", "4", "5"]
    # A later run follows the existing table's id type without being told.
    again = ResultSink(engine, table="review_sentiment", id_column="review_id", output_model=Paint)
    assert again.id_type == id_kind


def test_text_id_into_an_integer_id_column_is_unstorable(engine):
    stats, _ = load(engine, [line("12", paint(1)), line("A-7", paint(2))], id_type="integer")
    assert (stats.accepted, stats.reasons["unstorable"]) == (1, 1)
    assert rows(engine, "SELECT rid FROM t")[0][0] == 12
    assert "not an integer" in rows(engine, "SELECT detail FROM t_rejects")[0][0]


class Invoice(BaseModel):
    amount: Decimal
    tax: Decimal | None = None


def test_decimal_fields_are_stored_as_numbers(engine):
    """#6 item 6: Decimal answers used to land as JSON strings ('"12.50"')."""
    assert output_columns(Invoice) == {"amount": "decimal", "tax": "decimal"}
    load(engine, [line("i1", {"amount": "12.50", "tax": 2.5}), line("i2", {"amount": 3})], Invoice)
    got = dict(rows(engine, "SELECT rid, amount FROM t"))
    assert {k: Decimal(str(v)) for k, v in got.items()} == {"i1": Decimal("12.5"), "i2": Decimal("3")}
    total = rows(engine, "SELECT sum(amount) + 0 FROM t")[0][0]
    assert Decimal(str(total)) == Decimal("15.5")  # arithmetic works: a number, not text
    if engine.dialect.name == "postgresql":
        assert rows(engine, "SELECT pg_typeof(amount)::text FROM t LIMIT 1")[0][0] == "numeric"
    else:
        assert {r[0] for r in rows(engine, "SELECT typeof(amount) FROM t")} <= {"real", "integer"}


def test_timestamps_are_real_and_the_outcomes_view_gives_the_latest_state(engine):
    """#6 item 11: _loaded_at / rejected_at were text; the rejects table had no current view."""
    load(engine, [line("a", "oops"), line("b", paint(2)), line("c", "oops")], batch_id="b1")
    load(engine, [line("a", paint(1)), line("b", "oops"), line("c", {"color": "pink"})], batch_id="b2")
    inspector = sa.inspect(engine)
    types = {c["name"]: c["type"] for c in inspector.get_columns("t")}
    assert isinstance(types["_loaded_at"], sa.DateTime)
    assert isinstance(
        {c["name"]: c["type"] for c in inspector.get_columns("t_rejects")}["rejected_at"], sa.DateTime
    )
    if engine.dialect.name == "postgresql":
        assert (
            rows(engine, "SELECT pg_typeof(_loaded_at)::text FROM t LIMIT 1")[0][0]
            == "timestamp with time zone"
        )
        assert rows(engine, "SELECT count(*) FROM t WHERE _loaded_at > now() - interval '1 hour'")[0][0] == 2
    latest = {r.record_id: r for r in rows(engine, "SELECT * FROM t_outcomes")}
    assert {k: (v.outcome, v.batch_id, v.reason) for k, v in latest.items()} == {
        "a": ("accepted", "b2", None),  # rejected in b1, accepted in b2
        "b": ("rejected", "b2", "invalid_json"),  # accepted in b1, its b2 answer was bad
        "c": ("rejected", "b2", "schema"),  # rejected twice: the latest reason
    }
    assert rows(engine, "SELECT count(*) FROM t_rejects")[0][0] == 4  # the history stays


class Node(BaseModel):
    name: str
    children: list[Node] = []


def test_self_referencing_model_keeps_its_columns(engine):
    """#6 item 1 (sink side): the top-level schema is a $ref; its fields are still columns."""
    assert output_columns(Node) == {"name": "string", "children": "json"}
    load(engine, [line("n", {"name": "root", "children": [{"name": "leaf"}]})], Node)
    name, children = rows(engine, "SELECT name, children FROM t")[0]
    assert name == "root" and json.loads(children) == [{"name": "leaf", "children": []}]


def test_should_write_skips_answers_of_superseded_batches(sqlite_engine):
    sink = ResultSink(sqlite_engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    stats = LoadStats()
    load_batch(
        (parse_result_line(line(f"r{i}", paint(i))) for i in range(4)),
        batch_id="old", output_model=Paint, sink=sink, stats=stats,
        should_write=lambda record_id, batch_id: record_id != "r2",
    )  # fmt: skip
    assert (stats.accepted, stats.skipped_stale) == (3, 1)
    assert [r[0] for r in rows(sqlite_engine, "SELECT rid FROM t ORDER BY rid")] == ["r0", "r1", "r3"]


def _torn_after(n: int):
    """``n`` good results, then a line cut off mid-way (a broken download)."""
    for i in range(n):
        yield parse_result_line(line(f"r{i}", paint(i)))
    yield parse_result_line(b'{"custom_id": "torn", "resu')


@pytest.mark.parametrize("pipeline", [True, False])
def test_a_broken_stream_keeps_and_reports_what_was_committed(sqlite_engine, pipeline):
    from airflow_provider_fable.core.results import ResultLineError

    sink = ResultSink(sqlite_engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    seen: list[RecordOutcome] = []
    with pytest.raises(ResultLineError):
        load_batch(
            _torn_after(25), batch_id="b", output_model=Paint, sink=sink, stats=LoadStats(),
            chunk_size=10, on_outcomes=seen.extend, pipeline=pipeline,
        )  # fmt: skip
    assert rows(sqlite_engine, "SELECT count(*) FROM t")[0][0] == 20  # two whole chunks
    assert len(seen) == 20


def test_a_failed_load_does_not_wait_for_a_writer_thread_blocked_on_a_lock(pg_engine, monkeypatch):
    """An error on the loading thread (execution_timeout's SIGALRM, a SIGTERM) while the PostgreSQL
    writer thread waits on a table lock used to wait for that lock (forever, when never released):
    the task overran its execution_timeout. The chunks handed over are waited for a bounded time
    (the queued one is not dropped: the daemon thread may still write it later, unreported),
    then the error surfaces."""
    import signal
    import threading
    import time

    import airflow_provider_fable.core.loading as loading

    monkeypatch.setattr(loading, "_FAILED_LOAD_WAIT", 0.5)

    class TimedOut(BaseException):
        pass

    def timed_out(*_):
        raise TimedOut

    sink = ResultSink(pg_engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    locker = pg_engine.connect()
    locker.begin()
    locker.execute(sa.text("LOCK TABLE t IN ACCESS EXCLUSIVE MODE"))
    release = threading.Timer(15, locker.close)  # without the fix: the load ends only then
    release.start()
    previous = signal.signal(signal.SIGALRM, timed_out)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        start = time.monotonic()
        with pytest.raises(TimedOut):
            load_batch(
                (parse_result_line(line(f"r{i}", paint(i))) for i in range(100)),
                batch_id="b", output_model=Paint, sink=sink, stats=LoadStats(),
                chunk_size=10, pipeline=True,
            )  # fmt: skip
        assert time.monotonic() - start < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.cancel()
        locker.close()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_an_error_of_the_writer_process_names_the_process_and_the_database_file(tmp_path):
    """The error comes back pickled, its traceback lost: the task log showed a bare "database is
    locked" raised in ``committed``, not where it happened nor which file."""
    import sqlite3

    path = tmp_path / "dest.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    with engine.begin() as conn:  # an error at run time, not a refused row: json() of bad text
        conn.execute(
            sa.text("CREATE TRIGGER boom BEFORE INSERT ON t WHEN NEW.rid = 'r30' BEGIN SELECT json('{'); END")
        )
    with pytest.raises(sqlite3.OperationalError) as info:
        load_batch(
            (parse_result_line(line(f"r{i}", paint(i))) for i in range(40)),
            batch_id="b", output_model=Paint, sink=sink, stats=LoadStats(), chunk_size=8, pipeline="process",
        )  # fmt: skip
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "writer process" in notes and str(path) in notes
    engine.dispose()


def test_a_writer_process_stores_the_same_rows_and_reports_unstorable(sqlite_engine):
    """pipeline="process" (SQLite): chunks go to a second process; same rows, same outcomes."""
    answers = [{"label": f"l{i}", "count": i} for i in range(45)]
    answers[7]["count"] = 2**70  # refused by the database in the writer process
    lines = [line(f"r{i}", a) for i, a in enumerate(answers)] + [line("x", "not json")]
    sink = ResultSink(sqlite_engine, table="t", id_column="rid", output_model=Counted)
    sink.ensure_tables()
    stats, seen = LoadStats(), []
    load_batch(
        (parse_result_line(x) for x in lines), batch_id="b1", output_model=Counted, sink=sink,
        stats=stats, chunk_size=10, on_outcomes=seen.extend, pipeline="process",
    )  # fmt: skip
    assert (stats.accepted, stats.rejected) == (44, 2)
    assert stats.reasons == {"unstorable": 1, "invalid_json": 1}
    assert len(seen) == 46 and len({o.record_id for o in seen}) == 46
    assert {o.record_id: o.reason for o in seen if o.status == "rejected"} == {
        "r7": "unstorable",
        "x": "invalid_json",
    }
    assert rows(sqlite_engine, "SELECT count(*) FROM t")[0][0] == 44
    bad = dict(rows(sqlite_engine, "SELECT record_id, raw_answer FROM t_rejects WHERE reason = 'unstorable'"))
    assert json.loads(bad["r7"]) == {"label": "l7", "count": 2**70}


def test_a_sqlite_file_load_of_several_chunks_matches_the_inline_path(tmp_path):
    """The default for a SQLite file (a writer process on a multi-core machine) stores the same
    rows, rejects and outcomes as the single-threaded path, duplicates and all."""
    answers = [paint(i) for i in range(33)]
    lines = [line(f"r{i}", a) for i, a in enumerate(answers)]
    lines += [line("r3", paint(99)), line("bad", "not json"), line("gone", None, kind="expired")]
    inline, default = _inline_and(
        None, _files(tmp_path), lines, Paint, 7,
        "SELECT rid, color, glossy, coats, note, _batch_id FROM {t}", "SELECT record_id, reason FROM {t}_rejects",
    )  # fmt: skip
    assert default == inline
    table, rejects, outcomes, summary = default
    # One verdict per record per batch (issue #18 item 8; it was "last answer wins", with both
    # lines counted): the first of two accepted answers stands, the repeat is counted apart.
    assert len(table) == 33 and dict((r[0], r[4]) for r in table)["r3"] == "n3"
    assert rejects == [("bad", "invalid_json"), ("gone", "expired")]
    assert len(outcomes) == 35 and (summary["accepted"], summary["rejected"]) == (33, 2)
    assert summary["duplicate_results"] == 1
    assert summary["reject_reasons"] == {"invalid_json": 1, "expired": 1}


def _inline_and(pipeline, engine_for, lines, model, chunk_size, *queries):
    """The same lines loaded inline and with ``pipeline`` (``engine_for(path)`` gives each its
    database; the table is ``t_<path>``, ``{t}`` in the queries): per path, the rows of each query
    (ordered by their first column), the outcomes (sorted: pieces report per piece, the inline
    path per chunk, accepted before rejected in each) and the summary."""
    got = {}
    for p in (False, pipeline):
        engine, table = engine_for(p), f"t_{p}".lower()
        sink = ResultSink(engine, table=table, id_column="rid", output_model=model)
        sink.ensure_tables()
        stats, seen = LoadStats(), []
        load_batch(
            (parse_result_line(x) for x in lines), batch_id="b", output_model=model, sink=sink,
            stats=stats, chunk_size=chunk_size, on_outcomes=seen.extend, pipeline=p,
        )  # fmt: skip
        found = (rows(engine, f"{q.format(t=table)} ORDER BY 1") for q in queries)
        got[p] = (*found, sorted(seen), stats.summary())
    return got[False], got[pipeline]


def _files(tmp_path):
    """``engine_for`` of ``_inline_and``: a SQLite file per path."""
    engines = []

    def engine_for(p):
        engines.append(sa.create_engine(f"sqlite:///{tmp_path / f'{p}.db'}"))
        return engines[-1]

    return engine_for


class Mixed(BaseModel):
    label: str | None
    empty: str
    score: float
    flag: bool
    amount: Decimal
    tags: list[str]


def test_copy_text_format_keeps_nulls_empty_text_numbers_and_nested_backslashes(engine):
    """PostgreSQL's COPY runs in text format (tab-separated, ``\\N`` for NULL): NULL and empty
    text stay apart, and backslashes inside JSON columns survive (also on SQLite's path)."""
    answers = [
        {
            "label": None,
            "empty": "",
            "score": -1.5e300,
            "flag": True,
            "amount": "12.30",
            "tags": ["a\\b", "\\N"],
        },
        {"label": "\\N", "empty": "x\ty", "score": 0.1, "flag": False, "amount": "0.001", "tags": []},
    ]
    load(engine, [line(f"m{i}", a) for i, a in enumerate(answers)], model=Mixed)
    got = rows(engine, "SELECT rid, label, empty, score, flag, amount, tags FROM t ORDER BY rid")
    assert [(r[0], r[1], r[2], r[3], bool(r[4]), Decimal(str(r[5])), json.loads(r[6])) for r in got] == [
        ("m0", None, "", -1.5e300, True, Decimal("12.30"), ["a\\b", "\\N"]),
        ("m1", "\\N", "x\ty", 0.1, False, Decimal("0.001"), []),
    ]


def test_copy_lines_from_answers_equal_rows_then_copy_lines():
    """PostgreSQL chunks are rendered straight from the answers (``copy_line_from_data``); the
    text must be what building the row and then its COPY line gives, value for value."""
    import datetime as dt

    from airflow_provider_fable.core.sinks import _copy_cell, _copy_line_builder, copy_line_from_data
    from airflow_provider_fable.core.writer_process import row_builder

    kinds = {"s": "string", "j": "json", "b": "boolean", "i": "integer", "n": "number", "d": "decimal"}
    texts = [
        "",
        "plain",
        "tab\there",
        "nl\nx\r",
        "back\\slash",
        "\\N",
        "nul\x00in",
        "\x00",
        "é🎨",
        "\x7f\u2028",
    ]
    others = [
        None,
        True,
        False,
        0,
        -(2**63),
        2**70,
        1.5,
        -0.0,
        float("nan"),
        float("inf"),
        Decimal("1.10"),
        [1, "a\tb"],
        {"k": None},
    ]
    values = texts + others
    composed = row_builder(kinds)
    seen = set()
    for batch, model, now in [
        ("b1", "claude-x", "2026-11-24T05:00:00+00:00"),
        ("b\t2", None, dt.datetime(2026, 1, 2)),
    ]:
        shared, at = f"{_copy_cell(batch)}\t{_copy_cell(model)}", _copy_cell(now)
        fused = copy_line_from_data(kinds)
        for k in range(len(values)):
            data = {name: values[(k + j) % len(values)] for j, name in enumerate(kinds)}
            for rid, tin, tout in [(f"id{k}", k, 2 * k), (texts[k % len(texts)] or "e", 0, None)]:
                got = _outcome(fused, data, rid, tin, tout, shared, at)
                row = _outcome(composed, data, rid, batch, model, tin, tout, now)
                want = row if row[0] == "error" else _outcome(_copy_line_builder(len(row[1])), row[1])
                assert got == want, (data, rid)
                seen.add(got[0])
    assert seen == {"ok", "error"}  # a Decimal inside a JSON column fails both ways, alike


def test_a_chunk_of_rows_built_at_once_equals_rows_built_one_by_one():
    """``rows_builder`` (one comprehension per chunk, in the writer process) gives what
    ``row_builder`` gives row by row, awkward values included."""
    from airflow_provider_fable.core.writer_process import row_builder, rows_builder

    kinds = {"s": "string", "j": "json", "b": "boolean", "n": "number"}
    values = [
        "",
        "nul\x00in",
        "\x00",
        "é",
        None,
        True,
        0,
        2**70,
        1.5,
        float("inf"),
        [1, "a\x00"],
        {"k": None},
    ]
    datas = [
        {name: values[(k + j) % len(values)] for j, name in enumerate(kinds)} for k in range(len(values))
    ]
    datas.append({"s": "only s"})  # missing keys read as None
    ids = [f"id{k}" for k in range(len(datas))]
    tins, touts = list(range(len(datas))), [None] * len(datas)
    one = row_builder(kinds)
    want = [
        one(d, rid, "b", "m", tin, tout, "now")
        for d, rid, tin, tout in zip(datas, ids, tins, touts, strict=True)
    ]
    assert rows_builder(kinds)(datas, ids, tins, touts, "b", "m", "now") == want
    assert (want[1][1], want[2][1], want[-1][1:3]) == ("nulin", "", ("only s", None))


def _outcome(render, *args):
    try:
        return ("ok", render(*args))
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return ("error", type(exc).__name__)


def _parsed(raw: str | bytes) -> tuple:
    """What a parser makes of a line: the result, or the error's type and message."""
    from airflow_provider_fable.core.results import _parse_general

    out = []
    for parse in (parse_result_line, _parse_general):
        try:
            out.append(("ok", parse(raw)))
        except Exception as exc:  # noqa: BLE001 - compared, not swallowed
            out.append(("error", type(exc).__name__, str(exc)))
    return tuple(out)


def _message_line(message: str) -> str:
    return '{"custom_id":"r1","result":{"type":"succeeded","message":' + message + "}}"


@pytest.mark.parametrize(
    "raw",
    [
        _message_line('{"content":[{"type":"text","text":"{}"}],"stop_reason":"end_turn","model":"m",'
                      '"usage":{"input_tokens":3,"output_tokens":2,"service_tier":"batch"}}'),
        _message_line('{"content":[{"type":"text","text":"a"},{"type":"text","text":null},{"type":"text","text":"b"}]}'),
        _message_line('{"content":[{"type":"text","text":"x"},{"type":"tool_use","input":{"k":[1,2]}}]}'),
        _message_line('{"content":[{"type":"tool_use","input":{"k":1}}],"content":[{"type":"text","text":"last"}]}'),
        _message_line('{"content":[{"type":"text"}]}'),
        _message_line('{"content":[]}'),
        _message_line("{}"),
        _message_line("null"),
        _message_line('"text"'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":null}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":true}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":5.0}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":null,"output_tokens":"7"}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":99999999999999999999999}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":-9223372036854775809}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"cache_creation_input_tokens":5,'
                      '"cache_creation":{"ephemeral_1h_input_tokens":3}}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"cache_creation_input_tokens":5,"cache_creation":null}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"cache_creation_input_tokens":0,'
                      '"cache_creation":{"ephemeral_1h_input_tokens":3}}}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"stop_reason":7,"model":["m"]}'),
        _message_line('{"content":[{"type":"text","text":"lone \\ud800 surrogate"}]}'),
        _message_line('{"content":[{"type":"text","text":"pair \\ud83d\\ude00"}]}'),
        _message_line('{"content":[{"type":"text","text":"x"}],"usage":{"input_tokens":NaN}}'),
        '{"custom\\u005fid":"r1","result":{"type":"succeeded","message":{"content":[{"type":"text","text":"x"}]}}}',
        '{"custom_id":7,"result":{"type":"succeeded","message":{"content":[{"type":"text","text":"x"}]}}}',
        '{"custom_id":"r1","result":{"type":"succeeded","message":{}},"custom_id":"r2"}',
        '{"custom_id":"r1","result":{"type":"errored","error":{"type":"error","error":{"type":"overloaded_error","message":"o"}}}}',
        '{"custom_id":"r1","result":{"type":"expired"}}',
        '{"custom_id":"r1","result":{"type":"brand_new"}}',
        '{"custom_id":"r1"}',
        "[1]",
        _message_line('{"content":[{"type":"text","text":"x"}]}') + " trailing",
        (_message_line('{"content":[{"type":"text","text":"x"}]}') + "\n").encode(),
        b'{"custom_id":"r1","result":{"type":"succeeded","message":{"content":[{"type":"text","text":"\xff"}]}}}',
    ],
)  # fmt: skip
def test_the_fast_line_decoder_gives_what_the_general_parser_gives(raw):
    """The typed msgspec decoder handles the usual line; whatever it gives (or raises) for any line
    is what the general orjson/json parser gives: same results, same errors."""
    fast, general = _parsed(raw)
    assert fast == general


@pytest.mark.parametrize("n", [1, 3, 8, 16, 18, 20, 21, 23])
def test_a_writer_process_streaming_pieces_ends_every_way_like_the_inline_path(tmp_path, n):
    """The writer process gets each chunk in pieces (a quarter chunk, committed with the chunk's
    last piece; a load smaller than a piece is written inline): a stream ending on a chunk, on a
    piece inside a chunk or inside a piece stores and reports what the inline path does."""
    lines = [line(f"r{i}", paint(i)) if i % 7 else line(f"r{i}", "not json") for i in range(n)]
    inline, process = _inline_and(
        "process",
        _files(tmp_path),
        lines,
        Paint,
        8,
        "SELECT rid, note FROM {t}",
        "SELECT record_id, reason FROM {t}_rejects",
    )
    assert process == inline
    assert len(inline[2]) == n and len(inline[0]) == n - len(range(0, n, 7))


@pytest.mark.parametrize("n", [1, 3, 8, 18, 21])
def test_the_postgres_writer_thread_stores_and_reports_what_the_inline_path_does(pg_engine, n):
    """PostgreSQL's writer thread (chunks prepared as COPY text on the loading thread) against
    the inline path, for loads ending inside a chunk and on one, with a repeated id."""
    lines = [line(f"r{i}", paint(i)) if i % 7 else line(f"r{i}", "not json") for i in range(n)]
    lines += [line("r2", paint(99))]  # a repeat, in a later piece of the same chunk or the next
    inline, thread = _inline_and(
        True, lambda p: pg_engine, lines, Paint, 8,
        "SELECT rid, note FROM {t}", "SELECT record_id, reason FROM {t}_rejects",
    )  # fmt: skip
    assert thread == inline
    # one verdict per record per batch (issue #18 item 8): the first answer stands
    assert ("r2", "n2" if n > 2 else "n99") in inline[0]


def test_a_broken_stream_keeps_only_whole_chunks_on_every_path(engine, monkeypatch):
    """A load that fails mid-chunk keeps (and reports) the chunks committed before, nothing of
    the unfinished one (SQLite: the writer process rolls back the pieces it has; PostgreSQL: the
    writer thread). The writer process's early commit of an idle transaction is held off here."""
    from airflow_provider_fable.core import loading
    from airflow_provider_fable.core.results import ResultLineError

    monkeypatch.setattr(loading, "IDLE_COMMIT_S", 60.0)
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    seen: list[RecordOutcome] = []
    with pytest.raises(ResultLineError):
        load_batch(_torn_after(25), batch_id="b", output_model=Paint, sink=sink, stats=LoadStats(),
                   chunk_size=10, on_outcomes=seen.extend)  # fmt: skip
    assert rows(engine, "SELECT count(*) FROM t")[0][0] == 20
    assert sorted(o.record_id for o in seen) == sorted(f"r{i}" for i in range(20))


def test_a_ledger_in_the_destination_sqlite_file_does_not_wait_for_the_writer(tmp_path):
    """``on_outcomes`` writing to the same SQLite file as the load (a ledger kept there) while
    the writer holds the next chunk's transaction open: the writer commits when no piece comes,
    so that write waits ~``IDLE_COMMIT_S``, not until its busy timeout ("database is locked")."""
    import sqlite3
    import time

    db = tmp_path / "one.db"
    sink = ResultSink(sa.create_engine(f"sqlite:///{db}"), table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    side = sqlite3.connect(db, timeout=3, isolation_level=None)
    side.execute("CREATE TABLE verdicts (record_id TEXT, status TEXT)")

    def record(outcomes):
        side.executemany("INSERT INTO verdicts VALUES (?, ?)", [(o.record_id, o.status) for o in outcomes])

    def download():  # slower than the writer, as a download can be: it waits for pieces
        for i in range(40):
            time.sleep(0.005)
            yield parse_result_line(line(f"r{i}", paint(i)))

    stats = LoadStats()
    load_batch(download(), batch_id="b", output_model=Paint, sink=sink, stats=stats, chunk_size=8,
               on_outcomes=record, pipeline="process")  # fmt: skip
    assert stats.accepted == 40
    assert side.execute("SELECT count(*), count(DISTINCT record_id) FROM verdicts").fetchone() == (40, 40)
    assert rows(sink.engine, "SELECT count(*) FROM t")[0][0] == 40
    side.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_slow_stream_commits_idle_pieces_and_reports_exactly_what_is_committed(
    backend, request, monkeypatch
):
    """A slow stream (a slow download): everything loads once and what is reported is what is
    committed; on SQLite the writer process commits its open pieces early when the next is slow."""
    import time

    from airflow_provider_fable.core import loading

    monkeypatch.setattr(loading, "IDLE_COMMIT_S", 0.01)
    engine = request.getfixturevalue("sqlite_engine" if backend == "sqlite" else "pg_engine")
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()

    def slow():
        for i in range(30):
            if i % 5 == 4:
                time.sleep(0.05)
            yield parse_result_line(line(f"r{i}", paint(i) if i % 9 else "nope"))

    seen: list[RecordOutcome] = []
    load_batch(slow(), batch_id="b", output_model=Paint, sink=sink, stats=LoadStats(), chunk_size=16,
               on_outcomes=seen.extend)  # fmt: skip
    assert sorted(o.record_id for o in seen) == sorted(f"r{i}" for i in range(30))
    assert sorted(r[0] for r in rows(engine, "SELECT rid FROM t")) == sorted(
        o.record_id for o in seen if o.status == "accepted"
    )


def test_a_running_load_logs_its_progress(sqlite_engine, caplog):
    """A long load says how far it is (here a line per chunk: ``progress_every=0``)."""
    import logging

    sink = ResultSink(sqlite_engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    lines = [line(f"r{i}", paint(i) if i % 10 else "nope") for i in range(30)]
    with caplog.at_level(logging.INFO, logger="airflow_provider_fable.core.loading"):
        load_batch((parse_result_line(x) for x in lines), batch_id="b7", output_model=Paint, sink=sink,
                   stats=LoadStats(), chunk_size=10, pipeline=False, progress_every=0)  # fmt: skip
    progress = [r.getMessage() for r in caplog.records if "validated so far" in r.getMessage()]
    assert len(progress) == 3
    assert progress[0].startswith("batch b7: 10 results validated so far (9 accepted, 1 rejected)")
    assert progress[1].startswith("batch b7: 20 results validated so far (18 accepted, 2 rejected)")


def test_a_writer_thread_failing_while_the_last_chunk_waits_does_not_hang_the_load():
    """The writer thread fails on a chunk while the final chunk waits in its queue: the load
    raises that error instead of waiting forever to hand the thread its end marker."""
    import threading
    import time

    class Failing:
        def write_chunk(self, accepted, rejected, *, batch_id, model):
            time.sleep(0.3)  # the final chunk is queued meanwhile
            raise RuntimeError("the destination went away")

    outcome: list[BaseException | None] = []

    def run():
        try:
            load_batch((parse_result_line(line(f"r{i}", paint(i))) for i in range(20)), batch_id="b",
                       output_model=Paint, sink=Failing(), stats=LoadStats(), chunk_size=10, pipeline=True)  # fmt: skip
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(20)
    assert not runner.is_alive(), "load_batch hung after its writer thread failed"
    assert isinstance(outcome[0], RuntimeError) and "went away" in str(outcome[0])


def test_a_writer_process_reports_outcomes_per_chunk_not_per_piece(sqlite_engine):
    """The ledger writes each ``on_outcomes`` call in its own transaction: pieces do not
    multiply the calls (at most one per committed chunk, every record once)."""
    sink = ResultSink(sqlite_engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    calls: list[list[RecordOutcome]] = []
    load_batch(
        (parse_result_line(line(f"r{i}", paint(i))) for i in range(40)), batch_id="b", output_model=Paint,
        sink=sink, stats=LoadStats(), chunk_size=8, on_outcomes=calls.append, pipeline="process",
    )  # fmt: skip
    assert 1 <= len(calls) <= 5
    assert sorted(o.record_id for call in calls for o in call) == sorted(f"r{i}" for i in range(40))


def test_the_writer_process_builds_the_same_rows_as_the_inline_path(tmp_path):
    """The writer process builds rows itself (BuildJob) for a chunk of distinct ids, and takes
    finished rows for a chunk that repeats one: every column, reject, outcome and statistic is
    what the inline path gives, NUL bytes, nested values and token counts included."""

    class Nested(BaseModel):
        label: str
        tags: list[str]
        count: int

    answers = [{"label": f"l{i}\x00" if i % 5 == 0 else f"l{i}", "tags": [f"t{i}"] * (i % 3), "count": i}
               for i in range(30)]  # fmt: skip
    lines = [line(f"r{i}", a) for i, a in enumerate(answers)]
    lines[12] = line("r4", {"label": "again", "tags": [], "count": 99})  # a repeat in the second chunk
    lines += [line("bad", "[1"), line("gone", None, kind="expired"), line("r20", {"label": "x", "count": 1})]
    inline, process = _inline_and(
        "process", _files(tmp_path), lines, Nested, 10,
        "SELECT rid, label, tags, count, _batch_id, _model, _input_tokens, _output_tokens FROM {t}",
        "SELECT record_id, batch_id, reason, detail, raw_answer, retryable FROM {t}_rejects",
    )  # fmt: skip
    assert process == inline
    table, rejects, outcomes, summary = process
    # One verdict per record per batch (issue #18 item 8): the repeat of r4 writes nothing (the
    # first answer stands) and r20's later schema reject loses to its accepted answer.
    assert dict((r[0], r[1]) for r in table)["r4"] == "l4" and dict((r[0], r[1]) for r in table)["r5"] == "l5"
    assert [r[2] for r in rejects] == ["invalid_json", "expired"]
    assert len(outcomes) == 31 and summary["accepted"] == 29 and summary["usage"]["input_tokens"] == 320
    assert summary["duplicate_results"] == 2


def test_a_writer_thread_failing_reports_the_chunks_it_committed_before():
    """The writer thread commits a chunk, then fails on the next before the loading thread looks:
    the committed chunk is still reported (every committed record once), then the error raised.
    ``committed`` used to raise as soon as it met the error, dropping the results before it."""
    import time

    class FailsOnTheLast:
        calls = 0

        def write_chunk(self, accepted, rejected, *, batch_id, model):
            self.calls += 1
            if self.calls == 1:
                return []
            time.sleep(0.2)  # the final chunk is handed over meanwhile
            if self.calls == 2:
                return []
            raise RuntimeError("the destination went away")

    seen: list[RecordOutcome] = []
    with pytest.raises(RuntimeError, match="went away"):
        load_batch((parse_result_line(line(f"r{i}", paint(i))) for i in range(30)), batch_id="b",
                   output_model=Paint, sink=FailsOnTheLast(), stats=LoadStats(), chunk_size=10,
                   on_outcomes=seen.extend, pipeline=True)  # fmt: skip
    assert sorted(o.record_id for o in seen) == sorted(f"r{i}" for i in range(20))


def test_an_error_while_the_last_chunk_is_written_still_reports_the_chunks_committed_before(monkeypatch):
    """execution_timeout (SIGALRM) fires while the load waits at its end for the writer thread,
    which has committed a chunk and is stuck on the last one (a lock): the committed chunk is
    reported before the error surfaces, as for an error earlier in the load. The end-of-load
    wait used to sit outside the error handling, so its error skipped the report."""
    import signal
    import time

    import airflow_provider_fable.core.loading as loading

    monkeypatch.setattr(loading, "_FAILED_LOAD_WAIT", 0.1)

    class TimedOut(BaseException):
        pass

    def timed_out(*_):
        raise TimedOut

    class SlowSink:
        calls = 0

        def write_chunk(self, accepted, rejected, *, batch_id, model):
            self.calls += 1
            time.sleep(0.2 if self.calls == 1 else 2)  # the second chunk: blocked on a lock
            return []

    seen: list[RecordOutcome] = []
    previous = signal.signal(signal.SIGALRM, timed_out)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with pytest.raises(TimedOut):
            load_batch((parse_result_line(line(f"r{i}", paint(i))) for i in range(20)), batch_id="b",
                       output_model=Paint, sink=SlowSink(), stats=LoadStats(), chunk_size=10,
                       on_outcomes=seen.extend, pipeline=True)  # fmt: skip
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(o.record_id for o in seen) == sorted(f"r{i}" for i in range(10))


def test_closing_a_writer_process_that_failed_does_not_wait_for_its_idle_sender(tmp_path):
    """The writer process failed after every piece was sent (its sender thread idles on the
    empty queue) and ``committed`` handed back the chunks committed before, keeping the error:
    ``close`` then put no end marker (the error was set), so reaping waited 30 s for the sender
    thread, which stayed blocked for good."""
    import time

    from airflow_provider_fable.core.loading import _Chunk, _ProcessWriter
    from airflow_provider_fable.core.validation import validator_for

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'dest.db'}")
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    with engine.begin() as conn:  # an error at run time, not a refused row
        conn.execute(
            sa.text("CREATE TRIGGER boom BEFORE INSERT ON t WHEN NEW.rid = 'r10' BEGIN SELECT json('{'); END")
        )
    validate = validator_for(Paint)
    items = [validate(parse_result_line(line(f"r{i}", paint(i)))) for i in range(12)]
    writer = _ProcessWriter(sink, "b", lambda: "m", 8)
    for k in range(0, 12, 2):  # pieces of 2: the first chunk commits, the piece of r10 fails
        writer.submit(_Chunk(items[k : k + 2], []))
    deadline = time.monotonic() + 10
    while writer.threads[1].is_alive() and time.monotonic() < deadline:  # the writer is gone
        time.sleep(0.02)
    assert len(writer.committed()) == 4 and writer.error is not None
    start = time.monotonic()
    writer.close()
    assert time.monotonic() - start < 5
    assert not writer.threads[0].is_alive()
    engine.dispose()


def test_an_error_of_the_writer_process_with_pieces_still_to_send_surfaces_as_itself(tmp_path):
    """The writer process stops at a run-time error while the sender thread is still writing
    pieces to it: the load raises that error (sqlite3's), not the broken pipe of the stdin bytes
    the stopped process never read (closing that pipe flushed them again, in the error path)."""
    import sqlite3

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'dest.db'}")
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    with engine.begin() as conn:  # an error at run time, not a refused row
        conn.execute(
            sa.text(
                "CREATE TRIGGER boom BEFORE INSERT ON t WHEN NEW.rid = 'r100' BEGIN SELECT json('{'); END"
            )
        )
    seen: list[RecordOutcome] = []
    with pytest.raises(sqlite3.OperationalError):
        load_batch((parse_result_line(line(f"r{i}", paint(i))) for i in range(20000)), batch_id="b",
                   output_model=Paint, sink=sink, stats=LoadStats(), chunk_size=40, on_outcomes=seen.extend,
                   pipeline="process")  # fmt: skip
    assert sorted(o.record_id for o in seen) == sorted(f"r{i}" for i in range(80))
    assert rows(engine, "SELECT count(*) FROM t")[0][0] == 80
    engine.dispose()


class Tallied(BaseModel):
    color: Color
    glossy: bool
    count: int  # unbounded: 2**70 is valid here and refused by the database


@pytest.mark.parametrize("pipeline", ["process", True])
def test_the_distribution_counted_by_the_writer_matches_the_inline_path(tmp_path, pipeline):
    """With a writer process the distribution fields are counted there, per piece; an answer the
    database then refuses (unstorable) is taken out of the counts again, as inline."""
    colors = list(Color)
    answers = [{"color": colors[i % 3].value, "glossy": i % 4 == 0, "count": i} for i in range(50)]
    for i in (5, 17, 40):
        answers[i]["count"] = 2**70
    lines = [line(f"r{i}", a) for i, a in enumerate(answers)] + [line("x", "not json")]
    inline, other = _inline_and(
        pipeline, _files(tmp_path), lines, Tallied, 12, "SELECT rid, color, glossy FROM {t}"
    )
    assert other == inline
    kept = [a for i, a in enumerate(answers) if i not in (5, 17, 40)]
    summary = inline[-1]
    assert summary["distribution"] == {
        "color": {c.value: sum(a["color"] == c.value for a in kept) for c in colors},
        "glossy": {"True": sum(a["glossy"] for a in kept), "False": sum(not a["glossy"] for a in kept)},
    }
    assert summary["reject_reasons"] == {"unstorable": 3, "invalid_json": 1}


@pytest.mark.parametrize("pipeline", ["process", False])
def test_should_write_keeps_chunks_full_and_the_model_from_the_first_answer(tmp_path, pipeline):
    """Skipped (superseded) answers do not count towards a chunk; the model name of the load is
    the first one a result carries (errored results carry none)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    lines = [line("gone", None, kind="errored")] + [line(f"r{i}", paint(i)) for i in range(60)]
    stats, chunks = LoadStats(), []
    load_batch(
        (parse_result_line(x) for x in lines), batch_id="b", output_model=Paint, sink=sink, stats=stats,
        chunk_size=8, on_outcomes=chunks.append, pipeline=pipeline,
        should_write=lambda record_id, batch_id: int(record_id[1:] or 0) % 3 != 0 if record_id != "gone" else True,
    )  # fmt: skip
    written = [f"r{i}" for i in range(60) if i % 3]
    assert (stats.accepted, stats.rejected, stats.skipped_stale) == (40, 1, 20)
    assert sorted(r[0] for r in rows(engine, "SELECT rid FROM t")) == sorted(written)
    assert [r[0] for r in rows(engine, "SELECT DISTINCT _model FROM t")] == ["claude-haiku-4-5"]
    reported = [o.record_id for batch in chunks for o in batch]
    assert sorted(reported) == sorted([*written, "gone"])
    engine.dispose()


def test_piece_frames_carry_every_value_as_it_was(tmp_path):
    """Pieces of answer dicts travel as MessagePack, everything else (and a piece holding what
    MessagePack cannot carry: ints beyond 64 bits, lone surrogates) as a pickle; either way the
    writer process reads back exactly what was sent, floats (NaN, infinities, -0.0) included."""
    import os

    from airflow_provider_fable.core.writer_process import (
        BuildJob,
        StoreJob,
        piece_frame,
        read_frame,
        write_frame,
    )

    def job(**extra: object) -> BuildJob:
        datas = [{"x": 1.5, "inf": math.inf, "neg": -0.0, "flag": True, "none": None,
                  "nested": {"a": [1, {"b": "c"}], "n": -math.inf}, **extra}]  # fmt: skip
        return BuildJob(
            datas, ["r1"], [3], [4], [("r9", "b", "schema", "d", "raw", True, "now")], "b", None, "now"
        )

    sent = [
        (job(), False),
        (job(big=2**70), True),
        (job(text="\ud800"), False),
        (job(nan=math.nan), True),
        (StoreJob([("r1", 1)], ["r1"], [], "b", "now"), True),
        (None, True),
    ]
    frames = [piece_frame(*piece) for piece in sent]
    assert [f[0] for f in frames] == [0x92, 0x80, 0x80, 0x92, 0x80, 0x80]  # MessagePack, else pickle
    read, write = os.pipe()
    with os.fdopen(write, "wb") as out:
        for frame in frames:
            write_frame(out, frame)
    got = [read_frame(read, None) for _ in sent]
    os.close(read)
    for (job_sent, commit_sent), (job_got, commit_got) in zip(sent, got, strict=True):
        assert type(job_got) is type(job_sent) and commit_got is commit_sent
        assert repr(job_got) == repr(job_sent)  # repr: NaN != NaN, and 1 == True


def test_float_extremes_reach_the_table_alike_through_the_writer_process(tmp_path):
    """An answer with Infinity, -Infinity and NaN (valid JSON numbers for pydantic) stores the
    same row through the writer process as inline."""

    class Scored(BaseModel):
        score: float
        spread: list[float]

    lines = [line(f"r{i}", f'{{"score": {v}, "spread": [{v}, 1.5]}}') for i, v in
             enumerate(["Infinity", "-Infinity", "NaN", "-0.0", "2.5"] * 2)]  # fmt: skip
    inline, process = _inline_and(
        "process", _files(tmp_path), lines, Scored, 4, "SELECT rid, score, spread FROM {t}"
    )
    assert repr(process) == repr(inline)
    scores = {r[0]: r[1] for r in inline[0]}
    assert scores["r0"] == math.inf and scores["r1"] == -math.inf and scores["r4"] == 2.5


def test_a_writer_process_whose_loader_ends_before_sending_anything_exits_quietly():
    """The loading process may die between starting the writer and sending it the store."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "airflow_provider_fable.core.writer_process"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stderr, done.stdout) == (0, b"", b"")


def _cannot_start(kind: str, monkeypatch) -> str:
    """Make the writer process's start fail (``kind``): its error message."""
    import threading
    import types

    from airflow_provider_fable.core import loading

    if kind == "process":

        def no_process(*args: object, **kwargs: object) -> None:
            raise FileNotFoundError("no interpreter here")

        monkeypatch.setattr(loading.subprocess, "Popen", no_process)
        return "no interpreter here"

    class SecondFails(threading.Thread):
        def start(self) -> None:
            if self.name == "fable-load-receive":
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(loading, "threading", types.SimpleNamespace(Thread=SecondFails))
    return "can't start new thread"


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_writer_process_that_cannot_start_fails_the_load_and_leaves_no_thread_waiting(
    tmp_path, monkeypatch, kind
):
    """The writer process's two threads start before it and wait for it: when the process (or
    the second thread: no threads left) cannot start, the load fails with that error and no
    thread waits forever for a process never started."""
    import threading

    message = _cannot_start(kind, monkeypatch)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
    sink.ensure_tables()
    with pytest.raises((FileNotFoundError, RuntimeError), match=message):
        load_batch(
            (parse_result_line(line(f"r{i}", paint(i))) for i in range(40)),
            batch_id="b", output_model=Paint, sink=sink, stats=LoadStats(), chunk_size=8, pipeline="process",
        )  # fmt: skip
    for thread in threading.enumerate():
        if thread.name in ("fable-load-send", "fable-load-receive"):
            thread.join(timeout=10)
            assert not thread.is_alive(), f"{thread.name} waits for a process that was never started"
    engine.dispose()


def test_a_load_holds_about_one_chunk_of_answers_at_a_time():
    """The module's memory bound: one chunk of outcomes held while it is validated, not the
    chunk before it too, nor every raw result of the chunk next to its outcomes. Reading results
    a block at a time kept the previous block, its outcomes (the previous chunk) and a whole
    chunk of raw results alive while the next block was read: about three chunks at the peak."""
    import tracemalloc

    from airflow_provider_fable.core.validation import validator_for

    class Doc(BaseModel):
        summary: str

    class Dropping:  # a destination that keeps nothing
        def write_chunk(self, accepted, rejected, *, batch_id, model):
            return []

    chunk = 1000
    lines = [line(f"r{i}", {"summary": f"{i} " + "w" * 4000}) for i in range(3 * chunk)]
    validate = validator_for(Doc)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        one_chunk = [validate(parse_result_line(x)) for x in lines[:chunk]]
        chunk_bytes = tracemalloc.get_traced_memory()[0] - base
        del one_chunk
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        load_batch((parse_result_line(x) for x in lines), batch_id="b", output_model=Doc, sink=Dropping(),
                   stats=LoadStats(), chunk_size=chunk, pipeline=False)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1.6 * chunk_bytes, f"peak {peak / chunk_bytes:.2f} chunks of outcomes"


def test_what_a_pickle_carried_to_the_writer_process_a_message_pack_piece_carries_too(tmp_path):
    """A piece of answer dicts is decoded in the writer process as it was sent, whatever the
    types of its fields: custom_ids that are JSON numbers (the general result parser passes them
    through; the inline path stores them) failed the whole load there, refused by a decoder
    typed after ``BuildJob``'s annotations (``ids: list[str]``)."""
    from airflow_provider_fable.core.writer_process import BuildJob, _decode_piece, piece_frame

    lines = [line(i, paint(i)) for i in range(20)]  # type: ignore[arg-type]
    inline, process = _inline_and("process", _files(tmp_path), lines, Paint, 8, "SELECT rid, note FROM {t}")
    assert process == inline
    assert len(inline[0]) == 20 and inline[-1]["accepted"] == 20

    job = BuildJob([{"a": 1}], [7], [1.5], [None], [("r", "b", "x", "d", None, False, 3)], 5, 6.5, None)
    assert repr(_decode_piece(piece_frame(job, True))) == repr((job, True))


def test_the_writer_process_imports_the_provider_from_the_loading_process_sys_path(tmp_path):
    """Airflow adds its dags, plugins and config folders to a task's ``sys.path`` at run time, and
    its docs ("Modules Management") keep code that is not pip-installed in the dags folder: a
    provider kept there is importable by the task but not by a fresh interpreter. The writer
    process was started with ``python -m`` and this interpreter's default path, so every SQLite
    load of a piece or more failed on every try ("the load's writer process exited (code 1)",
    ModuleNotFoundError on its stderr), and with the provider also installed it ran another copy
    of it. Here the loading process imports a copy of the provider from a folder on its
    ``sys.path`` only; the copy's writer leaves a mark, so the writer must run that same copy."""
    import shutil
    import subprocess
    from pathlib import Path

    import airflow_provider_fable

    vendored = tmp_path / "dags"
    package = vendored / "airflow_provider_fable"
    shutil.copytree(Path(airflow_provider_fable.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    writer = package / "core" / "writer_process.py"
    source = writer.read_text()
    marked = source.replace(
        "def main() -> None:\n", "def main() -> None:\n    open(os.environ['FABLE_TEST_MARK'], 'w').close()\n"
    )
    assert marked != source
    writer.write_text(marked)
    driver = f"""
import sys
sys.path.insert(0, {str(vendored)!r})  # as Airflow does for its folders (PYTHONPATH is not touched)
import sqlalchemy as sa
from pydantic import BaseModel
import airflow_provider_fable
from airflow_provider_fable.core.loading import LoadStats, load_batch
from airflow_provider_fable.core.results import parse_result_line
from airflow_provider_fable.core.sinks import ResultSink
assert airflow_provider_fable.__file__.startswith({str(vendored)!r}), airflow_provider_fable.__file__

class Paint(BaseModel):
    color: str

engine = sa.create_engine("sqlite:///" + {str(tmp_path / "dest.db")!r})
sink = ResultSink(engine, table="t", id_column="rid", output_model=Paint)
sink.ensure_tables()
lines = [{line("r0", {"color": "red"})!r}.replace(b'"r0"', f'"r{{i}}"'.encode()) for i in range(40)]
stats = LoadStats()
load_batch((parse_result_line(x) for x in lines), batch_id="b", output_model=Paint, sink=sink,
           stats=stats, chunk_size=8, pipeline="process")
with engine.connect() as conn:
    print(stats.accepted, conn.execute(sa.text("SELECT count(*) FROM t")).scalar_one())
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["FABLE_TEST_MARK"] = str(tmp_path / "mark")
    done = subprocess.run(
        [sys.executable, "-c", driver], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["40", "40"]
    assert (tmp_path / "mark").exists(), "the writer process ran another copy of the provider"

"""The load task's fast paths of issue #19, each against the behaviour it replaces.

- ``core.ledger_bulk.VerdictWriter``: the same ledger rows as ``Ledger.record_outcomes`` for the
  same verdicts (accepts, rejects, a record whose resubmission is in flight, a rerun job that
  supersedes its parent's rejects, a repeated record, needs_review), SQLite and PostgreSQL; on
  PostgreSQL its statements probe the ledger's primary keys from the staged chunk instead of
  scanning the ledger; ``VerdictPipe`` writes in order and hands the thread's error back, and
  merges queued chunks into the rows of one-by-one writes; SQLite takes the set-based path,
  through the operator too (a ledger file of its own: the thread; in the destination's file:
  inline).
- ``ResultScreen`` counts the batch's succeeded results and output tokens (``_Measured`` before).
- ``write_qa_sample`` reads ids, then the chosen rows: the same sample as ``select_qa_rows`` over
  every row, integer ids and samples past one look-up chunk included.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.ledger import Ledger, Outcome
from airflow_provider_fable.core.ledger_bulk import _PLAN, _STAGE, VerdictPipe, VerdictWriter, _statements
from airflow_provider_fable.core.loading import LoadStats, ResultScreen
from airflow_provider_fable.core.qa import select_qa_rows, write_qa_sample
from airflow_provider_fable.core.results import BatchResult, Usage
from airflow_provider_fable.core.sinks import ResultSink
from airflow_provider_fable.core.validation import Accepted
from tests.conftest import Paint
from tests.test_ledger import dbs, pg_ledger_conn  # noqa: F401 - fixtures of the operator test


@pytest.fixture(params=["sqlite", "postgresql"])
def two_ledgers(request, tmp_path) -> Iterator[tuple[Ledger, Ledger]]:
    """A reference ledger written by SQLite's row-by-row ``record_outcomes`` (the rules as plain
    statements), and an empty ledger of the kind under test for ``VerdictWriter``.

    On PostgreSQL ``record_outcomes`` itself goes through ``core.ledger_bulk``, so the reference
    is always the SQLite path: comparing PostgreSQL with itself would prove nothing.
    """
    reference_engine = sa.create_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    yield Ledger(reference_engine).ensure_schema(), Ledger(engine).ensure_schema()
    reference_engine.dispose()


def _scenario(ledger: Ledger, write) -> None:
    """Submissions and verdicts covering every rule of ``record_outcomes``; ``write`` stores them."""
    rows = [(r, r, f"d-{r}") for r in ("a", "b", "c", "d", "e", "f")]
    ledger.register_job("job1", model="m")
    sub = ledger.write_intent("job1", run_key="d/r/t/-1", shard=1, records=rows, byte_size=10, model="m")
    ledger.write_batch(sub.id, "B1")
    # "f" is sent again (a newer shard of the same job) before B1's verdicts arrive: pending.
    again = ledger.write_intent(
        "job1", run_key="d/r/t/-1", shard=2, records=[rows[5]], byte_size=5, model="m"
    )
    write(ledger, "job1", "B1", [
        Outcome("a", "a", "accepted", None, False, "B1"),
        Outcome("b", "b", "rejected", "schema", True, "B1"),
        Outcome("c", "c", "rejected", "refusal", False, "B1"),
        Outcome("f", "f", "rejected", "errored", True, "B1"),
    ], 3)  # fmt: skip
    write(ledger, "job1", "B1", [
        Outcome("d", "d", "rejected", "truncated", True, "B1"),
        Outcome("d", "d", "accepted", None, False, "B1"),  # the last verdict of a record stands
        Outcome("e", "e", "rejected", "schema", True, "B1"),
    ], 1)  # review after 1: "e" needs review at once  # fmt: skip
    ledger.write_batch(again.id, "B2")
    write(ledger, "job1", "B2", [Outcome("f", "f", "accepted", None, False, "B2")], 3)
    # A rerun job (another model) accepts "b" and rejects "c" again.
    ledger.register_job("job2", model="m2", parent_job="job1")
    rerun = ledger.write_intent(
        "job2", run_key="d/r2/t/-1", shard=1, records=rows[1:3], byte_size=5, model="m2"
    )
    ledger.write_batch(rerun.id, "B3")
    write(ledger, "job2", "B3", [
        Outcome("b", "b", "accepted", None, False, "B3"),
        Outcome("c", "c", "rejected", "refusal", False, "B3"),
    ], 2)  # "c" refused twice over the job chain: needs review, in both jobs  # fmt: skip


def _state(ledger: Ledger) -> tuple[list[tuple], list[tuple]]:
    c, o = ledger.records.c, ledger.outcomes.c
    with ledger.engine.connect() as conn:
        records = conn.execute(
            sa.select(c.job_id, c.record_id, c.status, c.reason, c.retryable, c.batch_id, c.superseded_by)
            .order_by(c.job_id, c.record_id)
        ).all()  # fmt: skip
        outcomes = conn.execute(
            sa.select(o.job_id, o.record_id, o.batch_id, o.status, o.reason, o.retryable, o.superseded)
            .order_by(o.job_id, o.record_id, o.batch_id)
        ).all()  # fmt: skip
    return [tuple(r) for r in records], [tuple(r) for r in outcomes]


def test_verdict_writer_leaves_the_ledger_as_record_outcomes_does(two_ledgers):
    reference, fast = two_ledgers
    _scenario(
        reference,
        lambda lg, job, batch, outs, after: lg.record_outcomes(job, batch, outs, review_after=after),
    )
    writers: dict[tuple[str, str, int], VerdictWriter] = {}

    def write(lg: Ledger, job: str, batch: str, outs: list[Outcome], after: int) -> None:
        # One writer per (job, batch) as the load keeps it, across that batch's chunks.
        writer = writers.setdefault((job, batch, after), VerdictWriter(lg, job, batch, review_after=after))
        writer.write(outs)

    _scenario(fast, write)
    expected = _state(reference)
    assert _state(fast) == expected
    records = {(r[0], r[1]): r for r in expected[0]}
    # The rules the scenario exercises really happened (so the comparison is not of two no-ops).
    assert records[("job1", "b")][6] == "job2"  # the rerun's acceptance supersedes the parent's reject
    assert records[("job1", "e")][2] == "needs_review"
    assert records[("job1", "c")][2] == records[("job2", "c")][2] == "needs_review"
    assert records[("job1", "d")][2] == "accepted" and records[("job1", "f")][2] == "accepted"
    assert ("job1", "f", "B1", "rejected", "errored", True, True) in expected[1]  # superseded by B2


def test_verdict_statements_probe_the_ledger_from_the_stage(pg_engine):
    """A ledger with no statistics (as right after a submit): no scan of its records or outcomes."""
    ledger = Ledger(pg_engine).ensure_schema()
    ledger.register_job("job1", model="m")
    rows = [(f"r{i}", f"r{i}", "d") for i in range(5000)]
    sub = ledger.write_intent("job1", run_key="k", shard=1, records=rows, byte_size=1, model="m")
    ledger.write_batch(sub.id, "B1")
    # Every record rejected once (the outcomes the supersede UPDATE looks for), no statistics yet.
    VerdictWriter(ledger, "job1", "B1", review_after=None).write(
        [Outcome(r, r, "rejected", "schema", True, "B1") for r, _, _ in rows]
    )
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(
            f"INSERT INTO {_STAGE} (record_id, status, reason, retryable, job_id, batch_id, parent_job) "
            "SELECT record_id, 'accepted', NULL, false, job_id, batch_id, 'job0' "
            "FROM fable_records LIMIT 500"
        )
        conn.exec_driver_sql(f"ANALYZE {_STAGE}")
        for setting in _PLAN:
            conn.exec_driver_sql(setting)
        for sql in _statements("fable_records", "fable_record_outcomes", parent=True):
            plan = "\n".join(
                conn.execute(
                    sa.text(f"EXPLAIN {sql}"),
                    {"now": "x", "accepted": "accepted"},
                ).scalars()  # fmt: skip
            )
            assert "Seq Scan on fable_record" not in plan, plan
            assert "ix_fable_records_batch_id" not in plan, plan  # a probe per record, not per batch
            if sql.startswith("UPDATE"):
                assert "Index Cond: (((job_id)::text = s." in plan, plan  # probes of the primary key


def test_verdict_pipe_writes_in_order_and_raises_the_thread_error(pg_engine):
    ledger = Ledger(pg_engine).ensure_schema()
    ledger.register_job("job1", model="m")
    sub = ledger.write_intent("job1", run_key="k", shard=1, records=[("a", "a", "d"), ("b", "b", "d")],
                              byte_size=1, model="m")  # fmt: skip
    ledger.write_batch(sub.id, "B1")
    stored: list[int] = []
    pipe = VerdictPipe(VerdictWriter(ledger, "job1", "B1"), on_written=stored.append)
    pipe.put([Outcome("a", "a", "rejected", "schema", True, "B1")])
    pipe.put(
        [Outcome("a", "a", "accepted", None, False, "B1"), Outcome("b", "b", "accepted", None, False, "B1")]
    )
    pipe.close()
    assert stored == [1, 2]
    assert ledger.record_states("job1", ["a"])["a"].status == "accepted"  # the later chunk won

    with pg_engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE fable_record_outcomes"))
    broken = VerdictPipe(VerdictWriter(ledger, "job1", "B1"))
    broken.put([Outcome("a", "a", "accepted", None, False, "B1")])
    with pytest.raises(sa.exc.ProgrammingError):
        broken.close()


def test_result_screen_counts_the_succeeded_results_it_passes():
    def ok(cid: str, out: int) -> BatchResult:
        return BatchResult(cid, "succeeded", "{}", usage=Usage(input_tokens=3, output_tokens=out))

    results = [
        ok("c1", 5),
        BatchResult("c2", "errored"),
        ok("zz", 7),
        ok("c3", 11),
        BatchResult("", "unparseable"),
    ]
    screen = ResultScreen("B1", {"c1": "r1", "c2": "r2", "c3": "r3", "c4": "r4"}, LoadStats())
    out = list(screen(results))
    assert [r.custom_id for r in out] == ["r1", "r2", "r3", "r4"]  # r4: missing_result
    assert (screen.succeeded, screen.output_tokens) == (2, 16)  # "zz" was dropped: not counted
    assert screen.dropped == ["zz"]
    plain = ResultScreen("B1", None, LoadStats())
    assert len(list(plain(results))) == 4 and (plain.succeeded, plain.output_tokens) == (3, 23)


@pytest.mark.parametrize("id_type", ["text", "integer"])
def test_qa_sample_reads_ids_then_rows_and_picks_as_select_qa_rows(sqlite_engine, id_type):
    sink = ResultSink(sqlite_engine, table="paint", id_column="pid", output_model=Paint, id_type=id_type)
    sink.ensure_tables()
    ids = [str(i) if id_type == "integer" else f"p{i}" for i in range(1500)]
    answers = [Accepted(i, {"color": "red", "glossy": False, "coats": 1, "note": "n"}, Usage()) for i in ids]
    sink.write_accepted(answers[:1200], batch_id="b1", model="m")
    sink.write_accepted(answers[1200:], batch_id="b0", model="m")  # not this load's batch
    with sqlite_engine.connect() as conn:
        every = [
            dict(r) for r in conn.execute(sa.text("SELECT * FROM paint WHERE _batch_id = 'b1'")).mappings()
        ]
    for size in (7, 700):  # 700: past one 500-id look-up of the chosen rows
        name, n = write_qa_sample(sqlite_engine, table=sink.table, id_column="pid", batch_ids=["b1"], size=size,
                                  seed=3)  # fmt: skip
        with sqlite_engine.connect() as conn:
            got = [r.pid for r in conn.execute(sa.text("SELECT pid FROM paint_qa ORDER BY qa_rank"))]
        expected = [str(r["pid"]) for r in select_qa_rows(every, id_column="pid", size=size, seed=3)]
        assert (n, [str(p) for p in got]) == (size, expected)


def test_the_load_operator_on_a_postgres_ledger_writes_every_chunks_verdicts(
    fable_emulator_factory,
    dbs,  # noqa: F811 - the fixture imported above
    pg_ledger_conn,  # noqa: F811
):
    """Through the real operators: chunks of 2, so the verdict thread gets several chunks."""
    from tests.test_ledger import context, load_op, point_connection_at, submit_op

    point_connection_at(fable_emulator_factory(faults={"errored_rate": 0.3, "seed": 4}))
    manifest = submit_op(ledger_conn_id="pg_ledger").execute(context())
    summary = load_op(manifest, ledger_conn_id="pg_ledger", chunk_size=2).execute({})
    assert summary["records"] == 7 and summary["rejected"] >= 1  # some errored: rejects too
    ledger = Ledger(pg_ledger_conn)
    job = manifest["job_fingerprint"]
    counts = ledger.summary(job)
    assert counts.get("accepted", 0) == summary["accepted"]
    assert counts.get("rejected", 0) == summary["rejected"]
    with pg_ledger_conn.connect() as conn:
        outcomes = conn.execute(sa.text("SELECT count(*) FROM fable_record_outcomes")).scalar_one()
    assert outcomes == 7
    # The measured output counted by ResultScreen (succeeded results) reached the ledger.
    measured = ledger.measured_output(job)
    assert measured is not None and measured["requests"] == 7 - summary["reject_reasons"].get("errored", 0)


class _GatedWriter(VerdictWriter):
    """A real ``VerdictWriter`` whose first write waits for ``gate``: the chunks put meanwhile
    queue up behind it, so the pipe's merging of queued chunks is certain to be exercised."""

    def __init__(self, *args, **kwargs) -> None:
        import threading

        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls: list[int] = []

    def write(self, outcomes) -> None:
        if not self.calls:
            self.entered.set()
            assert self.gate.wait(30)
        self.calls.append(len(outcomes))
        super().write(outcomes)


def test_verdict_pipe_merges_queued_chunks_into_the_rows_of_one_by_one_writes(two_ledgers):
    """Chunks queued behind each other are written in one transaction when no record repeats among
    them; the ledger ends as with ``record_outcomes`` per chunk (SQLite: the set-based path on the
    pipe's thread; PostgreSQL: COPY). A chunk repeating a record stays for the next transaction."""
    reference, fast = two_ledgers
    ids = [f"r{i:03d}" for i in range(40)]
    chunks = [
        [Outcome(r, r, "accepted", None, False, "B1") for r in ids[:10]],
        [Outcome(r, r, "rejected", "schema", True, "B1") for r in ids[10:20]],
        [Outcome(r, r, "rejected", "refusal", False, "B1") for r in ids[20:30]],
        [Outcome(r, r, "accepted", None, False, "B1") for r in ids[30:35]],
        # repeats r010 (rejected above): not merged with the chunks before it; the acceptance wins
        [Outcome("r010", "r010", "accepted", None, False, "B1")]
        + [Outcome(r, r, "rejected", "truncated", True, "B1") for r in ids[35:]],
    ]

    def setup(lg: Ledger) -> None:
        lg.register_job("job1", model="m")
        sub = lg.write_intent("job1", run_key="k", shard=1, records=[(r, r, "d") for r in ids], byte_size=1,
                              model="m")  # fmt: skip
        lg.write_batch(sub.id, "B1")

    setup(reference)
    for chunk in chunks:
        reference.record_outcomes("job1", "B1", chunk, review_after=1)
    setup(fast)
    writer = _GatedWriter(fast, "job1", "B1", review_after=1)
    stored: list[int] = []
    pipe = VerdictPipe(writer, on_written=stored.append, depth=4)
    pipe.put(chunks[0])
    assert writer.entered.wait(30)
    for chunk in chunks[1:]:  # the thread holds chunk 0 at the gate: these four queue up
        pipe.put(chunk)
    writer.gate.set()
    pipe.close()
    assert writer.calls == [10, 25, 6]  # chunks 1-3 merged; chunk 4 repeats a record of chunk 1
    assert stored == writer.calls
    assert _state(fast) == _state(reference)
    states = fast.record_states("job1", ["r010", "r011", "r020"])
    assert states["r010"].status == "accepted"
    assert states["r011"].status == states["r020"].status == "needs_review"  # review_after=1


def test_sqlite_ledger_verdicts_take_the_set_based_path(sqlite_engine, tmp_path):
    """This SQLite has JSON1, so ``VerdictWriter`` uses its set-based statements (the equality
    with ``record_outcomes`` is the test above and the scenario test); ``sqlite_file`` names the
    files a verdict thread may write and tells a ledger in the destination's file."""
    from airflow_provider_fable.core.ledger_bulk import sqlite_file, sqlite_set_based

    ledger = Ledger(sqlite_engine).ensure_schema()
    ledger.register_job("job1", model="m")
    sub = ledger.write_intent("job1", run_key="k", shard=1, records=[("a", "a", "d")], byte_size=1, model="m")
    ledger.write_batch(sub.id, "B1")
    writer = VerdictWriter(ledger, "job1", "B1")
    writer.write([Outcome("a", "a", "accepted", None, False, "B1")])
    assert sqlite_set_based(sqlite_engine) and writer._set_based is True
    assert ledger.record_states("job1", ["a"])["a"].status == "accepted"
    assert sqlite_file(sqlite_engine) == str((tmp_path / "dest.db").resolve())
    same = sa.create_engine(f"sqlite:///{tmp_path}/./dest.db")
    assert sqlite_file(same) == sqlite_file(sqlite_engine)  # one file, however it is spelt
    assert sqlite_file(sa.create_engine("sqlite://")) is None  # in memory: no thread
    assert sqlite_file(None) is None
    same.dispose()


@pytest.mark.parametrize("ledger_in_destination", [False, True])
def test_the_load_operator_on_a_sqlite_ledger_writes_every_chunks_verdicts(
    fable_emulator_factory,
    dbs,  # noqa: F811 - the fixture imported above
    monkeypatch,
    ledger_in_destination,
):
    """Through the real operators, chunks of 2: the verdicts on the pipe's thread (a ledger file
    of its own) or inline (the ledger in the destination's file, whose writer holds its lock)."""
    import json

    from tests.test_ledger import context, load_op, point_connection_at, submit_op

    if ledger_in_destination:
        path = dbs.dest.url.database
        monkeypatch.setenv("AIRFLOW_CONN_LEDGER_DB", json.dumps({"conn_type": "sqlite", "host": path}))
    point_connection_at(fable_emulator_factory(faults={"errored_rate": 0.3, "seed": 4}))
    manifest = submit_op().execute(context())
    summary = load_op(manifest, chunk_size=2).execute({})
    assert summary["records"] == 7 and summary["rejected"] >= 1
    engine = dbs.dest if ledger_in_destination else dbs.ledger
    ledger = Ledger(engine)
    counts = ledger.summary(manifest["job_fingerprint"])
    assert counts.get("accepted", 0) == summary["accepted"]
    assert counts.get("rejected", 0) == summary["rejected"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM fable_record_outcomes")).scalar_one() == 7
    with dbs.dest.connect() as conn:
        loaded = conn.execute(sa.text("SELECT count(*) FROM paint")).scalar_one()
    assert loaded == summary["accepted"]

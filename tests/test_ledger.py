"""The job ledger: core behaviour on SQLite and real PostgreSQL, and exactly-once submission
through the real operators against the emulator (re-attach, lost create responses, SIGKILL at
every point of a 3-shard submit, reruns of failures, encoded ids, stale batches).
"""

from __future__ import annotations

import json
import os
import urllib.request
from datetime import timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.errors import FableError, RecordError
from airflow_provider_fable.core.ledger import (
    SCHEMA_VERSION,
    BatchCandidate,
    Ledger,
    LedgerError,
    Outcome,
    utcnow,
)
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import KILL_ENV, FableBatchSubmitOperator
from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at
from tests.conftest import Paint

RECORDS = [{"id": f"p{i}", "text": f"{['red', 'green', 'blue'][i % 3]} fence, two coats"} for i in range(7)]


def stats(server) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)


def context(run_id: str = "manual__1", task_id: str = "submit") -> dict:
    """What the operator reads from a task context: the task instance's identity."""
    return {"ti": SimpleNamespace(dag_id="d", run_id=run_id, task_id=task_id, map_index=-1)}


def submit_op(**kwargs) -> FableBatchSubmitOperator:
    spec = dict(
        task_id="submit",
        prompt_template="Paint for {id}: {text}",
        output_model=Paint,
        records=RECORDS,
        ledger_conn_id="ledger_db",
    )
    spec.update(kwargs)
    return FableBatchSubmitOperator(**spec)


def load_op(manifest, **kwargs) -> FableValidateLoadOperator:
    spec = dict(
        task_id="load",
        batch_ids=manifest,
        output_model=Paint,
        destination_conn_id="dest_db",
        table="paint",
        id_column="paint_id",
        ledger_conn_id="ledger_db",
    )
    spec.update(kwargs)
    return FableValidateLoadOperator(**spec)


@pytest.fixture
def dbs(tmp_path, monkeypatch):
    """A destination and a ledger database, each an Airflow connection on its own SQLite file."""
    out = {}
    for name in ("dest", "ledger"):
        path = tmp_path / f"{name}.db"
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{name.upper()}_DB", json.dumps({"conn_type": "sqlite", "host": str(path)})
        )
        out[name] = sa.create_engine(f"sqlite:///{path}")
    yield SimpleNamespace(**out, ledger_obj=Ledger(out["ledger"]))
    for engine in out.values():
        engine.dispose()


def dest_rows(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {
            r.paint_id: r._batch_id for r in conn.execute(sa.text("SELECT paint_id, _batch_id FROM paint"))
        }


# ---------------------------------------------------------------------------- core, both dialects
@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request) -> Ledger:
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    return Ledger(engine).ensure_schema()


def test_schema_is_created_once_and_versioned(ledger):
    assert ledger.schema_version() == SCHEMA_VERSION
    Ledger(ledger.engine).ensure_schema()  # second use: nothing to do, nothing breaks
    names = set(sa.inspect(ledger.engine).get_table_names())
    assert {"fable_jobs", "fable_submissions", "fable_records", "fable_record_outcomes"} <= names


def test_intent_batch_outcomes_and_supersede(ledger):
    ledger.register_job("job1", model="m1")
    rows = [("a", "a", "d1"), ("b@x", "enc-b-x-1", "d2")]
    sub = ledger.write_intent("job1", run_key="d/r/t/-1", shard=1, records=rows, byte_size=10, model="m1")
    assert [s.id for s in ledger.open_intents("job1")] == [sub.id]
    assert ledger.record_states("job1", ["a"])["a"].status == "pending"
    ledger.write_batch(sub.id, "B1")
    assert ledger.open_intents("job1") == []
    assert ledger.custom_id_map("B1") == {"a": "a", "enc-b-x-1": "b@x"}
    ledger.record_outcomes(
        "job1",
        "B1",
        [
            Outcome("a", "a", "accepted", None, False, "B1"),
            Outcome("b@x", "b@x", "rejected", "errored", True, "B1"),
        ],
    )
    assert ledger.failed("job1") == ["b@x"] == ledger.failed("job1", retryable_only=True)
    assert ledger.record_ids_of_run("job1", "d/r/t/-1") == ["a", "b@x"]
    # A rerun in a child job (another model) accepts b@x: the parent's reject is superseded.
    ledger.register_job("job2", model="m2", parent_job="job1")
    sub2 = ledger.write_intent(
        "job2", run_key="d/r2/t/-1", shard=1, records=[rows[1]], byte_size=5, model="m2"
    )
    ledger.write_batch(sub2.id, "B2")
    ledger.record_outcomes("job2", "B2", [Outcome("b@x", "b@x", "accepted", None, False, "B2")])
    assert ledger.failed("job1") == []
    assert ledger.summary("job1") == {"accepted": 1, "rejected_superseded": 1}
    history = ledger.history("b@x")
    assert [(h["batch_id"], h["status"], h["superseded"]) for h in history] == [
        ("B1", "rejected", True),
        ("B2", "accepted", False),
    ]


def test_a_late_load_of_the_old_batch_does_not_derail_a_rerun_in_flight(ledger):
    ledger.register_job("j", model="m")
    first = ledger.write_intent("j", run_key="k1", shard=1, records=[("r", "r", "d")], byte_size=1, model="m")
    ledger.write_batch(first.id, "B1")
    ledger.record_outcomes("j", "B1", [Outcome("r", "r", "rejected", "errored", True, "B1")])
    rerun = ledger.write_intent("j", run_key="k2", shard=1, records=[("r", "r", "d")], byte_size=1, model="m")
    # The old batch is loaded again while the rerun's create is in flight.
    ledger.record_outcomes("j", "B1", [Outcome("r", "r", "rejected", "errored", True, "B1")])
    assert ledger.record_states("j", ["r"])["r"].status == "pending"
    ledger.write_batch(rerun.id, "B2")
    state = ledger.record_states("j", ["r"])["r"]
    assert (state.status, state.batch_id) == ("submitted", "B2")
    assert ledger.custom_id_map("B1") == {}  # B1's answers are now stale for r


def test_orphan_reconciliation_adopts_abandons_or_refuses(ledger):
    ledger.register_job("j", model="m")
    now = utcnow()

    def intent(shard: int, n: int = 3):
        rows = [(f"r{shard}-{i}", f"r{shard}-{i}", "d") for i in range(n)]
        return ledger.write_intent("j", run_key="k", shard=shard, records=rows, byte_size=1, model="m")

    one = intent(1)
    old = BatchCandidate("B-old", now - timedelta(hours=1), 3)  # before the intent: not ours
    other = BatchCandidate("B-other", now + timedelta(seconds=1), 4)  # wrong request count
    mine = BatchCandidate("B-mine", now + timedelta(seconds=1), 3)
    assert ledger.reconcile(one, [mine, old, other]) == "B-mine"
    assert ledger.submission_for_batch("B-mine").state == "adopted"

    two = intent(2)
    assert ledger.reconcile(two, [mine, old]) is None  # B-mine is claimed: nothing was created
    assert ledger.submissions_of("j")[-1].state == "abandoned"

    three = intent(3)
    twins = [
        BatchCandidate("B-x", now + timedelta(seconds=2), 3),
        BatchCandidate("B-y", now + timedelta(seconds=3), 3),
    ]
    with pytest.raises(LedgerError, match=r"B-x.*B-y.*orphan_policy='resubmit'"):
        ledger.reconcile(three, twins)
    assert ledger.open_intents("j")[0].id == three.id  # nothing decided, nothing paid
    assert ledger.reconcile(three, twins, policy="resubmit") is None
    assert ledger.open_intents("j") == []


# ---------------------------------------------------------------------------- through the operators
def test_retry_and_rerun_of_the_same_records_reattach(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    first = submit_op(max_requests_per_batch=3).execute(context())
    assert first["submitted"] == 7 and len(first["batch_ids"]) == 3
    again = submit_op(max_requests_per_batch=3).execute(context())  # a retry / cleared task
    other_run = submit_op(max_requests_per_batch=3).execute(
        context(run_id="backfill__2")
    )  # same interval again
    assert stats(server)["batches_created"] == 3
    for m in (again, other_run):
        assert sorted(m["batch_ids"]) == sorted(first["batch_ids"])
        assert m["submitted"] == 0 and m["attached"] == 7 and m["request_count"] == 7
    # Another prompt is another job (new fingerprint): it pays, once.
    changed = submit_op(prompt_template="Paint {id} please: {text}").execute(context())
    assert changed["submitted"] == 7 and changed["job_fingerprint"] != first["job_fingerprint"]
    forced = submit_op(resubmit=True).execute(context())
    assert forced["submitted"] == 7
    assert stats(server)["batches_created"] == 5


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_lost_create_response_is_adopted_on_retry(fable_emulator_factory, dbs, mode):
    server = fable_emulator_factory(
        faults={"lose_create_response_first_n": 1, "lose_create_response_mode": mode}
    )
    point_connection_at(server)
    with pytest.raises(FableError, match="may or may not have been created"):
        submit_op(max_requests_per_batch=3).execute(context())
    assert stats(server)["batches_created"] == 1  # the server made it; the client never heard
    manifest = submit_op(max_requests_per_batch=3).execute(context())
    assert stats(server)["batches_created"] == 3  # shard 1 adopted, shards 2-3 sent once
    assert manifest["attached"] == 3 and manifest["submitted"] == 4
    assert stats(server)["faults"]["lost_create_response"] == 1
    summary = load_op(manifest).execute({})
    assert summary["accepted"] + summary["rejected"] == 7
    assert set(dest_rows(dbs.dest)) == {r["id"] for r in RECORDS}
    assert [s.state for s in dbs.ledger_obj.submissions_of()] == ["adopted", "created", "created"]


def test_ambiguous_orphan_fails_by_default_naming_candidates(fable_emulator_factory, dbs):
    server = fable_emulator_factory(faults={"lose_create_response_first_n": 1})
    point_connection_at(server)
    with pytest.raises(FableError):
        submit_op().execute(context())
    # Someone else creates a batch of the same size on the same key meanwhile.
    submit_op(prompt_template="Other job {id}: {text}", ledger_conn_id="dest_db").execute(context())
    with pytest.raises(LedgerError, match="2 unclaimed batches could be it"):
        submit_op().execute(context())
    assert stats(server)["batches_created"] == 2
    manifest = submit_op(orphan_policy="resubmit").execute(context())
    assert manifest["submitted"] == 7 and stats(server)["batches_created"] == 3


def _killed_try(point: str) -> int:
    """Run the submit's first try in a forked child that SIGKILLs itself at ``point``.

    A fork (not a fresh interpreter) keeps the test fast: imports are warm. The child shares
    nothing with the retry but the ledger database and the emulator, like two worker processes.
    """
    import anthropic  # noqa: F401 - warm the SDK import once, in the parent, before forking

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.environ[KILL_ENV] = point
        try:
            submit_op(max_requests_per_batch=3).execute(context(run_id="r"))
        finally:
            os._exit(0)  # survived: the parent sees exit code 0, not a kill
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize(
    "point", ["after_intent:1", "after_create:1", "after_ledger:2", "between_shards:1", "after_create:3"]
)
def test_sigkill_at_each_point_then_retry_pays_once(fable_emulator_factory, dbs, point):
    server = fable_emulator_factory()
    point_connection_at(server)
    assert _killed_try(point) == -9  # SIGKILL, at the named point
    # The retry of the same task instance (what Airflow does after a lost worker).
    manifest = submit_op(max_requests_per_batch=3).execute(context(run_id="r"))
    emulator = stats(server)
    assert emulator["batches_created"] == 3, emulator  # exactly one batch per shard
    assert emulator["requests_seen"] == 7
    assert manifest["request_count"] == 7 and len(manifest["batch_ids"]) == 3
    load_op(manifest).execute({})
    assert set(dest_rows(dbs.dest)) == {r["id"] for r in RECORDS}
    with dbs.dest.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM paint")).scalar_one() == 7


def test_rerun_failed_sends_exactly_the_retryable_rejects(fable_emulator_factory, dbs):
    flaky = fable_emulator_factory(faults={"errored_rate": 0.4, "seed": 3})
    point_connection_at(flaky)
    first = submit_op().execute(context())
    summary = load_op(first).execute({})
    failed = dbs.ledger_obj.failed(first["job_fingerprint"], retryable_only=True)
    assert failed and len(failed) == summary["reject_reasons"]["errored"]
    healthy = fable_emulator_factory()
    point_connection_at(healthy)
    rerun = submit_op(rerun="retryable").execute(context(run_id="rerun"))
    assert rerun["submitted"] == len(failed)
    load_op(rerun).execute({})
    assert healthy_ids(healthy) == sorted(failed)  # the emulator saw exactly those custom_ids
    states = dbs.ledger_obj.record_states(first["job_fingerprint"], [r["id"] for r in RECORDS])
    assert {s.status for s in states.values()} == {"accepted"}
    assert dbs.ledger_obj.failed(first["job_fingerprint"]) == []
    # Nothing left to rerun, and skip_done leaves out what the job already has.
    assert submit_op(rerun="failed").execute(context(run_id="rerun2"))["request_count"] == 0
    assert submit_op(skip_done=True).execute(context(run_id="again"))["request_count"] == 0


def healthy_ids(server) -> list[str]:
    """custom_ids of every request the emulator received (read back through its batch list)."""
    from anthropic import Anthropic

    client = Anthropic(api_key=TEST_API_KEY, base_url=server.base_url)
    out = []
    for batch in client.messages.batches.list():
        out += [r.custom_id for r in client.messages.batches.results(batch.id)]
    return sorted(out)


def round_trip(odd: list[str], dest) -> list[dict]:
    """Submit and load one record per id; every id lands once, as a row or a reject."""
    records = [{"id": rid, "text": "red fence, two coats"} for rid in odd]
    summary = load_op(submit_op(records=records).execute(context())).execute({})
    assert summary["accepted"] + summary["rejected"] == len(odd)
    with dest.connect() as conn:
        loaded = set(conn.execute(sa.text("SELECT paint_id FROM paint")).scalars())
        loaded |= set(conn.execute(sa.text("SELECT record_id FROM paint_rejects")).scalars())
    assert loaded == set(odd)
    return records


def test_unusable_ids_round_trip_under_their_real_id(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    round_trip(["has space", "a/b/c.txt", "ZD#123", "jane@example.com", "tête 東京", "x" * 200], dbs.dest)
    assert all(len(c) <= 64 for c in healthy_ids(server))


def test_encoded_ids_spilled_out_of_memory_still_map_back_to_their_records(
    fable_emulator_factory, dbs, monkeypatch
):
    """Past ``core.id_map.IN_MEMORY`` (here 3) the submit's custom_id -> id pairs and the duplicate
    check's live in a SQLite scratch file: every record still lands under its own id."""
    import airflow_provider_fable.core.id_map as id_map

    monkeypatch.setattr(id_map, "IN_MEMORY", 3)
    server = fable_emulator_factory()
    point_connection_at(server)
    odd = [f"ZD#{i} {'ü' * (i % 3)}" for i in range(25)] + ["jane@example.com", "plain_1"]
    records = round_trip(odd, dbs.dest)
    with pytest.raises(RecordError, match=r"custom_id.duplicate") as info:
        submit_op(records=records + [{"id": "ZD#4 ü", "text": "again"}]).execute(context(run_id="dup"))
    assert info.value.record_id == "ZD#4 ü" and info.value.position == len(odd) + 1


def test_an_older_batch_never_overwrites_a_newer_answer(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    old = submit_op().execute(context())
    new = submit_op(resubmit=True).execute(context(run_id="forced"))
    load_op(new).execute({})
    late = load_op(old).execute({})  # the old batch's load runs late (a cleared task, a backfill)
    assert late["stale_dropped"] == 7 and late["records"] == 0
    assert set(dest_rows(dbs.dest).values()) == set(new["batch_ids"])


@pytest.fixture
def pg_ledger_conn(pg_engine, monkeypatch):
    """An Airflow postgres connection ``pg_ledger`` to a private database on the local server."""
    from tests.conftest import private_pg_database

    with private_pg_database("fable_ledger") as url:
        monkeypatch.setenv(
            "AIRFLOW_CONN_PG_LEDGER",
            json.dumps(
                {
                    "conn_type": "postgres",
                    "host": url.host,
                    "port": url.port or 5432,
                    "login": url.username,
                    "schema": url.database,
                }
            ),
        )
        engine = sa.create_engine(url)
        yield engine
        engine.dispose()


def test_ledger_on_postgresql_through_the_operators(fable_emulator_factory, dbs, pg_ledger_conn):
    """Lost create response, retry adopts, rerun re-attaches: with the ledger on real PostgreSQL."""
    server = fable_emulator_factory(
        faults={"lose_create_response_first_n": 1, "lose_create_response_mode": "drop"}
    )
    point_connection_at(server)
    with pytest.raises(FableError):
        submit_op(ledger_conn_id="pg_ledger", records=RECORDS + [{"id": "ZD#1 ü", "text": "red"}]).execute(
            context()
        )
    manifest = submit_op(
        ledger_conn_id="pg_ledger", records=RECORDS + [{"id": "ZD#1 ü", "text": "red"}]
    ).execute(context())
    assert manifest["attached"] == 8 and stats(server)["batches_created"] == 1
    load_op(manifest, ledger_conn_id="pg_ledger").execute({})
    assert set(dest_rows(dbs.dest)) >= {"ZD#1 ü", "p0"}
    ledger = Ledger(pg_ledger_conn)
    assert ledger.summary(manifest["job_fingerprint"]).get("accepted", 0) >= 7
    assert ledger.submissions_of()[0].state == "adopted"


def test_a_canceled_wait_does_not_strand_its_records(fable_emulator_factory, dbs):
    """A wait marked failed cancels its batches; the next run must not fail on them for ever.

    Found in a real deployment: the next run re-attached its records to the canceled batch (they
    were never loaded, so neither accepted nor rejects) and its wait failed again on every run.
    Now the submit lists the re-attached batch as ``ended_incomplete``, the wait lets it through
    as partial, the load turns the canceled requests into retryable rejects, and a
    ``rerun="failed"`` sends exactly those, creating no batch for answers already paid for.
    """
    from airflow_provider_fable._compat import AirflowFailException
    from airflow_provider_fable.core.errors import FableError
    from airflow_provider_fable.hooks.fable import FableHook
    from airflow_provider_fable.sensors.batch import FableBatchSensor

    server = fable_emulator_factory(processing_retrieves=1000, cancel_seconds=0)
    point_connection_at(server)
    first = submit_op().execute(context())
    hook = FableHook()
    for batch_id in first["batch_ids"]:  # what on_kill does when the user marks the wait failed
        hook.cancel_batch(batch_id)
    assert {hook.retrieve_batch(b).processing_status for b in first["batch_ids"]} == {"ended"}
    # The earlier try's own wait fails, and is not retried: the batches cannot change any more.
    with pytest.raises(FableError, match="canceled") as failed:
        FableBatchSensor(task_id="wait", batch_ids=first, deferrable=False).poke({})
    assert isinstance(failed.value, AirflowFailException)

    again = submit_op().execute(context(run_id="manual__2"))
    assert again["submitted"] == 0 and stats(server)["batches_created"] == len(first["batch_ids"])
    assert again["ended_incomplete"] == first["batch_ids"]
    waited = FableBatchSensor(task_id="wait", batch_ids=again, deferrable=False).poke({})
    assert waited.is_done and waited.xcom_value["outcome"] == "partial"
    summary = load_op(waited.xcom_value, max_reject_rate=1.0, fail_when_all_rejected=False).execute({})
    assert summary["reject_reasons"] == {"canceled": len(RECORDS)}

    rerun = submit_op(rerun="failed").execute(context(run_id="rerun"))
    assert rerun["submitted"] == len(RECORDS) and "ended_incomplete" not in rerun
    assert stats(server)["batches_created"] == len(first["batch_ids"]) + len(rerun["batch_ids"])


def test_a_rerun_on_the_same_emulator_is_a_fresh_draw(fable_emulator_factory, dbs):
    """Faults are drawn per attempt: a record that errored is not doomed to error on every rerun.

    Found in a real deployment: with faults keyed on the custom_id alone, ``mode=failed`` reran
    exactly the rejected records and every one of them failed again, on every rerun.
    """
    server = fable_emulator_factory(faults={"errored_rate": 0.4, "seed": 3})
    point_connection_at(server)
    first = submit_op().execute(context())
    errored = load_op(first).execute({})["reject_reasons"]["errored"]
    assert errored >= 2
    rerun = submit_op(rerun="retryable").execute(context(run_id="rerun"))
    assert rerun["submitted"] == errored
    again = load_op(rerun, fail_when_all_rejected=False, max_reject_rate=1.0).execute({})
    assert again["reject_reasons"].get("errored", 0) < errored
    assert again["accepted"] >= 1

"""Exactly-once on a distributed Airflow (issue #18 items 1-4 and 12).

What a Celery deployment and an adversarial pass found, each pinned here against the emulator,
real SQLite and real PostgreSQL:

1. the job fingerprint must not depend on where the DAG file lies (Airflow names a DAG file's
   module after its absolute path, so a model class's ``__module__`` differs per mount/bundle);
2. sibling submits of one job (mapped tasks) must not settle each other's live intents, and a
   created/adopted submission can never become abandoned;
3. two runs of the same job at once: one pays, the other attaches;
4. the first use of a fresh ledger by several tasks at once must not race on ``create_all``;
12. after an all-expired wait, ``rerun="failed"``/``"retryable"`` sends the expired records.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.job import BatchJob
from airflow_provider_fable.core.ledger import Ledger
from airflow_provider_fable.hooks.fable import FableHook
from airflow_provider_fable.operators.submit import KILL_ENV
from airflow_provider_fable.testing.plugin import point_connection_at
from tests import test_ledger
from tests.conftest import PG_URL, require_pg
from tests.test_ledger import RECORDS, context, dest_rows, load_op, stats, submit_op

dbs = test_ledger.dbs  # fixtures shared with tests/test_ledger.py
pg_ledger_conn = test_ledger.pg_ledger_conn

DAG_SOURCE = '''
from pydantic import BaseModel, Field


class Triage(BaseModel):
    """The answer of one ticket."""

    label: str = Field(description="one word")
    urgent: bool
'''


def load_as_airflow_would(folder: Path) -> type:
    """Import ``folder/triage_dag.py`` the way Airflow's DagBag does: under a path-derived name."""
    path = folder / "triage_dag.py"
    path.write_text(DAG_SOURCE)
    name = f"unusual_prefix_{hashlib.sha1(str(path).encode()).hexdigest()}_triage_dag"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.Triage


# ---------------------------------------------------------------------------- 1: fingerprint
def test_fingerprint_does_not_depend_on_where_the_dag_file_lies(tmp_path):
    (tmp_path / "worker1" / "dags").mkdir(parents=True)
    (tmp_path / "bundles" / "v2" / "dags").mkdir(parents=True)
    here = load_as_airflow_would(tmp_path / "worker1" / "dags")
    there = load_as_airflow_would(tmp_path / "bundles" / "v2" / "dags")
    assert here is not there and here.__module__ != there.__module__

    def job(model: type) -> BatchJob:
        return BatchJob(prompt_template="Ticket {id}: {text}", output_model=model)

    assert job(here).fingerprint() == job(there).fingerprint()
    # What shapes a request still counts: another schema is another job.
    (tmp_path / "changed").mkdir()
    (tmp_path / "changed" / "triage_dag.py").write_text(DAG_SOURCE.replace("one word", "two words"))
    spec = importlib.util.spec_from_file_location("changed_triage", tmp_path / "changed" / "triage_dag.py")
    changed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(changed)
    assert job(changed.Triage).fingerprint() != job(here).fingerprint()
    assert job(here).fingerprint() != BatchJob(prompt_template="Other {id}", output_model=here).fingerprint()


def test_the_same_dag_parsed_by_dagbag_from_two_folders_is_one_job(tmp_path, fable_airflow):
    """Airflow's own DagBag names the module after the path; the job must not notice."""
    dag_file = (
        "from airflow.sdk import DAG\n"
        "from airflow_provider_fable.operators.submit import FableBatchSubmitOperator\n"
        + DAG_SOURCE
        + "\nwith DAG('fp_moved', schedule=None):\n"
        "    FableBatchSubmitOperator(task_id='submit', prompt_template='Ticket {id}: {text}',\n"
        "                             output_model=Triage, records=[{'id': 't1', 'text': 'x'}])\n"
    )
    jobs = []
    for folder in (tmp_path / "worker1" / "dags", tmp_path / "bundles" / "v7" / "dags"):
        folder.mkdir(parents=True)
        (folder / "fp_moved.py").write_text(dag_file)
        jobs.append(fable_airflow.load_dag("fp_moved", folder).get_task("submit").build_job())
    one, two = jobs
    assert one.output_model.__module__ != two.output_model.__module__  # Airflow's path-derived names
    assert one.fingerprint() == two.fingerprint()
    assert one.legacy_fingerprint() != two.legacy_fingerprint()  # what paid twice before


def test_a_retry_on_a_worker_that_mounts_dags_elsewhere_attaches(tmp_path, fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    records = [{"id": f"t{i}", "text": "printer on fire"} for i in range(5)]
    first = submit_op(output_model=load_as_airflow_would(tmp_path / "a"), records=records).execute(context())
    retry = submit_op(output_model=load_as_airflow_would(tmp_path / "b"), records=records).execute(context())
    assert retry["job_fingerprint"] == first["job_fingerprint"]
    assert retry["submitted"] == 0 and retry["batch_ids"] == first["batch_ids"]
    assert stats(server)["batches_created"] == 1


def test_jobs_under_a_legacy_fingerprint_are_reattached(tmp_path, fable_emulator_factory, dbs):
    """A job started before the fingerprint change keeps its ledger rows: the new one aliases it."""
    server = fable_emulator_factory()
    point_connection_at(server)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    model_a = load_as_airflow_would(tmp_path / "a")
    op = submit_op(output_model=model_a)
    legacy = op.build_job().legacy_fingerprint()
    # What the previous provider wrote: the job under its path-dependent fingerprint, a batch.
    first = op.execute(context())
    ledger = dbs.ledger_obj
    with ledger.engine.begin() as conn:
        for table in ("fable_jobs", "fable_submissions", "fable_records"):
            conn.execute(sa.text(f"UPDATE {table} SET job_id = :old"), {"old": legacy})
        conn.execute(sa.text("DELETE FROM fable_job_aliases"))
    again = submit_op(output_model=model_a).execute(context(run_id="manual__2"))
    assert again["job_fingerprint"] == legacy and again["submitted"] == 0
    # ... and once aliased, a worker whose DAG folder lies elsewhere finds it too.
    moved = submit_op(output_model=load_as_airflow_would(tmp_path / "b")).execute(context(run_id="m3"))
    assert moved["job_fingerprint"] == legacy and moved["batch_ids"] == first["batch_ids"]
    assert stats(server)["batches_created"] == 1


# ---------------------------------------------------------------------------- 4: schema creation race
def open_at_once(engines: list[sa.engine.Engine]) -> list[BaseException]:
    """Open a ledger on each engine, all threads released at the same instant; the errors."""
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def open_ledger(engine: sa.engine.Engine) -> None:
        start.wait()
        try:
            Ledger(engine).ensure_schema()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted by the caller
            errors.append(exc)

    threads = [threading.Thread(target=open_ledger, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_first_use_of_a_fresh_postgresql_ledger_by_six_tasks_at_once():
    admin = sa.create_engine(PG_URL)
    require_pg(admin)
    errors: list[BaseException] = []
    for round_ in range(4):  # the race does not lose every time: several fresh schemas
        schema = f"fable_race_{os.getpid()}_{round_}"
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        engines = [
            sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"}) for _ in range(6)
        ]
        for engine in engines:
            with engine.connect():
                pass  # connected before the start line, so the six really race
        errors += open_at_once(engines)
        assert Ledger(engines[0]).schema_version() >= 1
        for engine in engines:
            engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()
    assert errors == []


def test_first_use_of_a_fresh_sqlite_ledger_by_six_tasks_at_once(tmp_path):
    errors: list[BaseException] = []
    for round_ in range(4):
        engines = [sa.create_engine(f"sqlite:///{tmp_path / f'ledger{round_}.db'}") for _ in range(6)]
        errors += open_at_once(engines)
        for engine in engines:
            engine.dispose()
    assert errors == []


# ---------------------------------------------------------------------------- 2: sibling submits
def mapped(index: int, run_id: str = "manual__1") -> dict:
    """The context of one mapped submit (dynamic task mapping: one job, several task instances)."""
    from types import SimpleNamespace

    return {"ti": SimpleNamespace(dag_id="d", run_id=run_id, task_id="submit", map_index=index)}


def ledger_conn(request, dialect: str) -> str:
    if dialect == "postgresql":
        request.getfixturevalue("pg_ledger_conn")
        return "pg_ledger"
    return "ledger_db"


def test_a_created_or_adopted_submission_is_never_abandoned(dbs):
    ledger = dbs.ledger_obj
    ledger.register_job("j", model="m")
    sub = ledger.write_intent("j", run_key="k/0", shard=1, records=[("r", "r", "d")], byte_size=1, model="m")
    seen = ledger.open_intents("j")  # a sibling reads the open intent ...
    assert ledger.write_batch(sub.id, "B1")  # ... its owner records the batch meanwhile ...
    assert ledger.reconcile(seen[0], []) == "B1"  # ... the stale decision changes nothing
    assert not ledger.abandon(sub.id, "stale")
    assert not ledger.write_batch(sub.id, "B2", state="adopted")
    assert [(s.state, s.batch_id) for s in ledger.submissions_of("j")] == [("created", "B1")]
    assert ledger.record_states("j", ["r"])["r"].batch_id == "B1"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_mapped_sibling_does_not_settle_a_live_intent(
    tmp_path, fable_emulator_factory, dbs, request, dialect
):
    """Member 1 of a mapped submit is inside its create when member 0 starts; then it is killed.

    Before the fix member 0 found member 1's intent open, listed no batch for it yet, and
    abandoned it; member 1's create then made a batch nobody recorded, and its retry paid again.
    """
    conn_id = ledger_conn(request, dialect)
    server = fable_emulator_factory()
    point_connection_at(server)
    ready, done = tmp_path / "member1_in_create", tmp_path / "member0_done"
    import anthropic  # noqa: F401 - warm imports before forking

    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: member 1, killed right after its create
        try:
            original = FableHook.create_batch_from_body

            def slow_create(self, *args, **kwargs):
                ready.touch()
                deadline = time.monotonic() + 5  # until member 0 is done, or 5 s (it waits for us)
                while not done.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                return original(self, *args, **kwargs)

            FableHook.create_batch_from_body = slow_create
            os.environ[KILL_ENV] = "after_create:1"
            submit_op(records=RECORDS[4:], ledger_conn_id=conn_id).execute(mapped(1))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "member 1 never reached its create"
    member0 = submit_op(records=RECORDS[:4], ledger_conn_id=conn_id).execute(mapped(0))
    done.touch()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -9
    retry = submit_op(records=RECORDS[4:], ledger_conn_id=conn_id).execute(mapped(1))  # Airflow's retry
    emulator = stats(server)
    assert emulator["batches_created"] == 2, emulator  # one per member: nobody paid twice
    assert emulator["requests_seen"] == len(RECORDS)
    assert member0["submitted"] == 4 and retry["submitted"] == 0 and retry["attached"] == 3
    for manifest in (member0, retry):
        load_op(manifest, ledger_conn_id=conn_id).execute({})
    assert set(dest_rows(dbs.dest)) == {r["id"] for r in RECORDS}


# ---------------------------------------------------------------------------- 3: concurrent runs
@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_two_runs_of_one_job_at_once_pay_once(fable_emulator_factory, dbs, request, dialect, monkeypatch):
    """Two runs (or two DAGs with the same submit) start together: one pays, the other attaches."""
    conn_id = ledger_conn(request, dialect)
    server = fable_emulator_factory()
    point_connection_at(server)
    # Both reach their creates together when nothing keeps them apart (before the fix, always);
    # a lone creator goes on after 3 s. Only the order changes: each create is real HTTP.
    both = threading.Barrier(2, timeout=3)
    original = FableHook.create_batch_from_body

    def rendezvous(self, *args, **kwargs):
        try:
            both.wait()
        except threading.BrokenBarrierError:
            pass
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FableHook, "create_batch_from_body", rendezvous)
    manifests: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(dag_id: str) -> None:
        from types import SimpleNamespace

        ctx = {"ti": SimpleNamespace(dag_id=dag_id, run_id="scheduled__1", task_id="submit", map_index=-1)}
        try:
            manifests[dag_id] = submit_op(max_requests_per_batch=3, ledger_conn_id=conn_id).execute(ctx)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(dag,)) for dag in ("dag_a", "dag_b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    emulator = stats(server)
    assert emulator["batches_created"] == 3, emulator  # one batch per shard
    assert emulator["requests_seen"] == len(RECORDS)  # each record requested once
    a, b = manifests["dag_a"], manifests["dag_b"]
    assert sorted(a["batch_ids"]) == sorted(b["batch_ids"])
    assert sorted([a["submitted"], b["submitted"]]) == [0, len(RECORDS)]
    assert a["request_count"] == b["request_count"] == len(RECORDS)
    for manifest in (a, b):
        summary = load_op(manifest, ledger_conn_id=conn_id).execute({})
        assert summary["accepted"] + summary["rejected"] == len(RECORDS)
    assert set(dest_rows(dbs.dest)) == {r["id"] for r in RECORDS}


# ---------------------------------------------------------------------------- 12: all expired, then rerun
@pytest.mark.parametrize("mode", ["failed", "retryable"])
def test_a_rerun_after_an_all_expired_wait_sends_the_expired_records(fable_emulator_factory, dbs, mode):
    from airflow_provider_fable.core.errors import FableError
    from airflow_provider_fable.sensors.batch import FableBatchSensor

    server = fable_emulator_factory(faults={"expired_rate": 1.0})
    point_connection_at(server)
    first = submit_op(max_requests_per_batch=4).execute(context())
    advance = urllib.request.Request(
        f"{server.base_url}/_emulator/clock",
        data=json.dumps({"advance_seconds": 86400}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(advance).close()  # a day later every batch has expired
    with pytest.raises(FableError, match="expired"):
        FableBatchSensor(task_id="wait", batch_ids=first, deferrable=False).poke({})
    # The wait failed, so no load ran; the operator reruns what failed.
    rerun = submit_op(rerun=mode, max_requests_per_batch=4).execute(context(run_id="rerun"))
    assert rerun["submitted"] == len(RECORDS)
    assert stats(server)["batches_created"] == len(first["batch_ids"]) + len(rerun["batch_ids"])
    job = first["job_fingerprint"]
    history = dbs.ledger_obj.history("p0")
    assert [(h["batch_id"], h["status"], h["reason"]) for h in history][:1] == [
        (first["batch_ids"][0], "rejected", "expired")
    ]
    states = dbs.ledger_obj.record_states(job, [r["id"] for r in RECORDS])
    assert {s.status for s in states.values()} == {"submitted"}
    assert {s.batch_id for s in states.values()} == set(rerun["batch_ids"])
    # A retry of the rerun re-attaches; nothing is paid twice.
    again = submit_op(rerun=mode, max_requests_per_batch=4).execute(context(run_id="rerun"))
    assert again["submitted"] == 0 and sorted(again["batch_ids"]) == sorted(rerun["batch_ids"])


def test_a_submit_that_lost_its_claim_pays_nothing_more(
    fable_emulator_factory, dbs, pg_ledger_conn, monkeypatch
):
    """The PostgreSQL claim lives with its session: when the session ends (a ledger failover, an
    idle-session killer), another submitter may take the claim, so this one must not create."""
    from airflow_provider_fable.core.errors import FableError

    server = fable_emulator_factory()
    point_connection_at(server)
    original = Ledger.write_intent

    def intent_then_session_ends(self, *args, **kwargs):
        written = original(self, *args, **kwargs)
        with pg_ledger_conn.connect() as conn:  # end the claim's session, as a failover would
            ended = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            ).scalar_one()
        assert ended == 1
        return written

    monkeypatch.setattr(Ledger, "write_intent", intent_then_session_ends)
    with pytest.raises(FableError, match="lost the submit claim"):
        submit_op(ledger_conn_id="pg_ledger").execute(context())
    assert stats(server)["batches_created"] == 0
    monkeypatch.setattr(Ledger, "write_intent", original)
    manifest = submit_op(ledger_conn_id="pg_ledger").execute(context())  # the retry
    assert manifest["submitted"] == len(RECORDS) and stats(server)["batches_created"] == 1
    assert [s.state for s in Ledger(pg_ledger_conn).submissions_of()] == ["abandoned", "created"]

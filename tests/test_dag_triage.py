"""support_ticket_triage end to end: real Airflow (dag.test), real SDK, emulator, SQLite.

All DAG runs live in this one module so Airflow's first-run warm-up is paid once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable import _compat
from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at

ROOT = Path(__file__).resolve().parents[1]


def test_dag_file_imports_without_sdk_or_pandas():
    code = (
        "import sys, importlib.util;"
        "spec = importlib.util.spec_from_file_location('d', 'dags/support_ticket_triage.py');"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        "print(sorted(k for k in ('anthropic', 'pandas', 'httpx2') if k in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.fixture
def triage_env(fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    # The batch ends on its 3rd retrieve: the sensor's own check (a transient 404, as right after
    # a real create), then two trigger polls. Deterministic, whatever the machine's speed.
    server = fable_emulator_factory(
        processing_retrieves=3,
        faults={"invalid_answer_rate": 0.1, "errored_rate": 0.02, "seed": 3, "transient_404_after_create": 1},
    )
    # The job ledger in the test's own database: the backlog unit skips what its job accepted, and
    # the session's embedded ledger would remember what earlier tests' databases hold.
    point_connection_at(server, ledger_conn_id="fable_backlog_db")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.5")
    engine = sa.create_engine(f"sqlite:///{db}")
    yield fable_airflow, server, engine
    engine.dispose()


def test_triage_dag_end_to_end(triage_env):
    airflow_env, server, engine = triage_env
    dag = airflow_env.load_dag("support_ticket_triage")
    result = airflow_env.run_dag(dag, conf={"limit": 300, "pilot": 0})

    assert result.state == "success", result.task_states
    assert set(result.task_states.values()) == {"success"}

    submitted = result.xcom("tickets.s1_submit")
    assert submitted["request_count"] == 300
    assert len(submitted["batch_ids"]) == 1

    waited = result.xcom("tickets.s1_wait")
    # Only execute_complete (after the trigger fired) sets waited_in="trigger": the task deferred.
    assert waited["waited_in"] == "trigger"
    assert waited["polls"] == 2

    loaded = result.xcom("tickets.s1_load")
    assert loaded["records"] == 300
    assert loaded["accepted"] > 200
    assert loaded["rejected"] > 0
    assert {"invalid_json", "schema"} & set(loaded["reject_reasons"])
    assert set(loaded["distribution"]["category"]) <= {
        "billing",
        "account_access",
        "bug",
        "feature_request",
        "shipping",
    }
    assert loaded["usage"]["input_tokens"] > 0

    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ticket_triage")).scalar_one() == loaded["accepted"]
        reasons = dict(
            conn.execute(sa.text("SELECT reason, count(*) FROM ticket_triage_rejects GROUP BY reason")).all()
        )
        assert sum(reasons.values()) == loaded["rejected"]
        detail = conn.execute(
            sa.text(
                "SELECT detail FROM ticket_triage_rejects WHERE reason IN ('schema', 'invalid_json') LIMIT 1"
            )
        ).scalar_one()
        assert detail  # names the field and rule, e.g. "category: Input should be ..."
        # The invoice evidence rule: tickets whose subject talks about an invoice are mostly billing.
        billing_share = conn.execute(
            sa.text(
                "SELECT avg(CASE WHEN r.category = 'billing' THEN 1.0 ELSE 0 END) FROM ticket_triage r "
                "JOIN support_tickets t USING (ticket_id) WHERE lower(t.subject) LIKE '%invoice%'"
            )
        ).scalar_one()
        assert billing_share is None or billing_share > 0.5

    # The API key never reaches XCom (task logs: see the CLI test below).
    assert TEST_API_KEY not in json.dumps(result.xcoms, default=str)

    # A second manual run takes the next tickets never processed (no triage row, no reject row);
    # accepted rows are never duplicated.
    with engine.connect() as conn:
        first_rejects = {r[0] for r in conn.execute(sa.text("SELECT ticket_id FROM ticket_triage_rejects"))}
    again = airflow_env.run_dag(dag, conf={"limit": 300, "pilot": 0})
    assert again.state == "success", again.task_states
    second = again.xcom("tickets.s1_submit")
    assert second["request_count"] == second["submitted"] == 300
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*), count(DISTINCT ticket_id) FROM ticket_triage")).one()
        assert rows[0] == rows[1] == loaded["accepted"] + again.xcom("tickets.s1_load")["accepted"]
        second_ids = set(
            conn.execute(
                sa.text(
                    "SELECT ticket_id FROM ticket_triage WHERE _batch_id = :b UNION "
                    "SELECT ticket_id FROM ticket_triage_rejects WHERE _batch_id = :b"
                ),
                {"b": second["batch_ids"][0]},
            ).scalars()
        )
    assert len(second_ids) == 300 and not (second_ids & first_rejects)

    # mode=failed sends again exactly the tickets the ledger holds as rejected, in a new batch.
    # The emulator draws faults afresh for a request it sees again (as the real service would
    # not fail a rerun the same way), so most rerun tickets now land.
    dag.get_task("tickets.finalize").retries = 0  # a guardrail failure is not transient: no retry_delay wait
    failed = airflow_env.run_dag(dag, conf={"limit": 2000, "mode": "failed", "pilot": 0})
    assert failed.state == "success", failed.task_states
    assert failed.xcom("tickets.s1_load")["accepted"] > failed.xcom("tickets.s1_load")["rejected"]
    rerun = failed.xcom("tickets.s1_submit")
    assert rerun["submitted"] == loaded["rejected"] + again.xcom("tickets.s1_load")["rejected"]
    assert not set(rerun["batch_ids"]) & {submitted["batch_ids"][0], second["batch_ids"][0]}


def test_data_intervals_run_once_and_retries_never_pay_twice(
    fable_airflow, fable_emulator_factory, tmp_path, monkeypatch
):
    """Three consecutive days via `dag.test(logical_date=...)`; the first submit loses its create
    response (retries=2 recovers it by adopting the batch); re-running a day adds nothing."""
    import csv
    from datetime import datetime, timezone

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    server = fable_emulator_factory(faults={"lose_create_response_first_n": 1})
    # The job ledger in the test's own database: the backlog unit skips what its job accepted, and
    # the session's embedded ledger would remember what earlier tests' databases hold.
    point_connection_at(server, ledger_conn_id="fable_backlog_db")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    monkeypatch.setenv("FABLE_RETRY_DELAY_SECONDS", "0")
    dag = fable_airflow.load_dag("support_ticket_triage")
    with (ROOT / "airflow_provider_fable" / "example_data" / "support_tickets.csv").open(
        newline="", encoding="utf-8"
    ) as fh:
        created = [row["created_at"] for row in csv.DictReader(fh)]
    engine = sa.create_engine(f"sqlite:///{db}")

    def interval_of(run_id: str) -> tuple[str, str]:
        with create_session() as session:
            dr = session.query(DagRun).filter(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id).one()
            fmt = "%Y-%m-%dT%H:%M:%SZ"
            return dr.data_interval_start.strftime(fmt), dr.data_interval_end.strftime(fmt)

    def rows() -> int:
        with engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT (SELECT count(*) FROM ticket_triage) + (SELECT count(*) FROM ticket_triage_rejects)"
                )
            ).scalar_one()

    total = 0
    for day in (6, 7, 8):  # @daily: a run at day D covers D-1 .. D
        logical = datetime(2026, 1, day, tzinfo=timezone.utc)
        result = fable_airflow.run_dag(dag, logical_date=logical, conf={"mode": "interval"})
        assert result.state == "success", result.task_states
        start, end = interval_of(result.run_id)
        expected = sum(start <= c < end for c in created)
        assert expected > 0, (start, end, result.xcom("tickets.s1_submit"))
        assert result.xcom("tickets.s1_submit")["request_count"] == expected
        assert result.xcom("tickets.s1_load")["records"] == expected
        total += expected
        assert rows() == total
    emulator = stats(server)
    assert emulator["faults"]["lost_create_response"] == 1
    assert emulator["batches_created"] == 3  # one per interval, though the first create lost its answer

    # Re-running a finished interval selects nothing (every ticket of the day has its final or
    # reject row: selection is the backlog unit's): no batch, no row added. (Before the unit, the
    # DAG selected the day again and the ledger re-attached its batch; same outcome, no request.)
    again = fable_airflow.run_dag(
        dag, logical_date=datetime(2026, 1, 7, tzinfo=timezone.utc), conf={"mode": "interval"}
    )
    assert again.state == "success", again.task_states
    assert again.xcom("tickets.select")["full"] == 0
    assert not (again.xcom("tickets.s1_submit") or {}).get("submitted")
    assert stats(server)["batches_created"] == 3
    assert rows() == total
    engine.dispose()


def stats(server) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)


def test_airflow_dags_test_cli_runs_the_dag_and_never_logs_the_key(triage_env):
    """`airflow dags test` in a subprocess: the whole task log output is ours to inspect."""
    _, server, engine = triage_env
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("airflow")),
            "dags",
            "test",
            "support_ticket_triage",
            "-c",
            '{"limit": 40, "pilot": 0}',
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"},
        timeout=300,
    )
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-3000:]
    assert "Submitting 40 requests" in logs
    assert "Deferring" in logs
    assert "Loaded" in logs
    assert TEST_API_KEY not in logs
    with engine.connect() as conn:
        loaded = conn.execute(sa.text("SELECT count(*) FROM ticket_triage")).scalar_one()
        rejected = conn.execute(
            sa.text("SELECT count(DISTINCT ticket_id) FROM ticket_triage_rejects")
        ).scalar_one()
    assert loaded > 0 and loaded + rejected == 40


def test_quickstart_backfill_commands_are_valid_for_the_example_dag(fable_airflow):
    """The quickstart's backfill commands, run as written with --dry-run, plan one run per day."""
    import re

    text = (ROOT / "docs" / "quickstart.md").read_text()
    commands = re.findall(r"^(airflow backfill create .+)$", text, flags=re.M)
    assert len(commands) == 2
    airflow = str(Path(sys.executable).with_name("airflow"))
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags")}
    subprocess.run([airflow, "dags", "reserialize"], env=env, capture_output=True, check=True, timeout=300)
    assert commands[1].startswith(commands[0])  # the second only adds --reprocess-behavior
    args = commands[1].split()[1:] + ["--dry-run"]
    out = subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=300)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-3000:]
    days = set(re.findall(r"2026-01-0[5-9]", logs))
    assert {"2026-01-06", "2026-01-07", "2026-01-08"} <= days, logs[-3000:]


@pytest.mark.skipif(
    _compat.AIRFLOW_VERSION < (3, 3),
    reason="the task state store is an Airflow 3.3 feature: before it the retry settles the orphaned "
    "intent from the ledger by listing batches (tests/test_exactly_once.py)",
)
def test_run_without_logical_date_and_retry_after_create_uses_the_task_state_store(
    fable_airflow, fable_emulator_factory, tmp_path, monkeypatch
):
    """A run with no logical date takes the backlog. Its first submit try fails right after create
    + state store write, before the ledger write: Airflow's retry (retries=2) adopts the batch
    from the task state store, without listing batches."""
    from airflow_provider_fable.core.ledger import Ledger
    from airflow_provider_fable.operators.submit import KILL_ENV

    server = fable_emulator_factory()
    point_connection_at(server, ledger_conn_id="fable_backlog_db")
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(tmp_path / "b.db"))
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    monkeypatch.setenv("FABLE_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv(KILL_ENV, "raise:after_state_store:1")
    dag = fable_airflow.load_dag("support_ticket_triage")
    # A run with no logical date at all (as `airflow dags trigger` makes): it takes the backlog.
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dr = dag.test(logical_date=None, run_conf={"limit": 20, "pilot": 0})
    assert dr.logical_date is None and dr.data_interval_start is None
    with create_session() as session:
        states = {
            ti.task_id: str(getattr(ti.state, "value", ti.state))
            for ti in dr.get_task_instances(session=session)
        }
        rows = session.query(XComModel).filter(
            XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id, XComModel.key == "return_value"
        )
        xcoms = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    assert set(states.values()) == {"success"}, states
    submitted = xcoms["tickets.s1_submit"]
    assert submitted["request_count"] == 20
    emulator = stats(server)
    assert emulator["batches_created"] == 1
    assert emulator["calls"].get("list", 0) == 0  # settled by the state store, not by listing
    ledger = Ledger(sa.create_engine(f"sqlite:///{tmp_path / 'b.db'}"))
    (batch_id,) = submitted["batch_ids"]
    sub = ledger.submission_for_batch(batch_id)
    assert sub is not None and sub.state == "adopted"
    ledger.engine.dispose()

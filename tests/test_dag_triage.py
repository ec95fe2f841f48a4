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
    point_connection_at(server)
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.5")
    engine = sa.create_engine(f"sqlite:///{db}")
    yield fable_airflow, server, engine
    engine.dispose()


def test_triage_dag_end_to_end(triage_env):
    airflow_env, server, engine = triage_env
    dag = airflow_env.load_dag("support_ticket_triage")
    result = airflow_env.run_dag(dag, conf={"limit": 300})

    assert result.state == "success", result.task_states
    assert set(result.task_states.values()) == {"success"}

    submitted = result.xcom("submit")
    assert submitted["request_count"] == 300
    assert len(submitted["batch_ids"]) == 1

    waited = result.xcom("wait")
    # Only execute_complete (after the trigger fired) sets waited_in="trigger": the task deferred.
    assert waited["waited_in"] == "trigger"
    assert waited["polls"] == 2

    loaded = result.xcom("load")
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

    # A second run takes tickets still without a triage row: the first run's rejects come back
    # first (ORDER BY ticket_id), then the rest of the backlog; accepted rows are never duplicated.
    with engine.connect() as conn:
        first_rejects = {r[0] for r in conn.execute(sa.text("SELECT record_id FROM ticket_triage_rejects"))}
    again = airflow_env.run_dag(dag, conf={"limit": 300})
    assert again.state == "success", again.task_states
    second_batch = again.xcom("submit")["batch_ids"][0]
    assert again.xcom("submit")["request_count"] == 300
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*), count(DISTINCT ticket_id) FROM ticket_triage")).one()
        assert rows[0] == rows[1] == loaded["accepted"] + again.xcom("load")["accepted"]
        retried = {
            r[0]
            for r in conn.execute(
                sa.text(
                    "SELECT ticket_id FROM ticket_triage WHERE _batch_id = :b UNION "
                    "SELECT record_id FROM ticket_triage_rejects WHERE batch_id = :b"
                ),
                {"b": second_batch},
            )
        }
    assert first_rejects <= retried


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
            '{"limit": 40}',
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
            sa.text("SELECT count(DISTINCT record_id) FROM ticket_triage_rejects")
        ).scalar_one()
    assert loaded > 0 and loaded + rejected == 40

"""support_ticket_triage end to end: real Airflow (dag.test), real SDK, emulator, SQLite.

All DAG runs live in this one module so Airflow's first-run warm-up is paid once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import point_connection_at

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
    server = fable_emulator_factory(
        processing_seconds=2.0, faults={"invalid_answer_rate": 0.1, "errored_rate": 0.02, "seed": 3}
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
    assert waited["polls"] >= 2

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

    # A second run only picks up tickets still without a triage row (the rejects) and upserts.
    again = airflow_env.run_dag(dag, conf={"limit": 300})
    assert again.state == "success", again.task_states
    assert again.xcom("submit")["request_count"] == 300  # next 300 of the backlog + rejects first by id
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*), count(DISTINCT ticket_id) FROM ticket_triage")).one()
        assert rows[0] == rows[1]

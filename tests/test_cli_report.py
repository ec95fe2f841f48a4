"""``airflow fable ...`` on a ledger filled by a real backlog run, on SQLite and on PostgreSQL.

The triage DAG runs through real Airflow (dag.test) against the emulator with its ledger on the
connection under test; then the real ``airflow`` CLI (a subprocess: the provider's ``cli`` entry
is what registers the commands) prints jobs, status, failed and review, and every figure is
checked against the ledger's own tables read with plain SQL.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable._compat import AIRFLOW_VERSION
from airflow_provider_fable.testing.plugin import point_connection_at

# Providers' CLI command groups (``get_provider_info()["cli"]``) are read by Airflow from 3.2 on;
# on 3.1 there is no ``airflow fable`` (docs/compatibility.md; the Backlogs page shows the same).
pytestmark = pytest.mark.skipif(
    AIRFLOW_VERSION < (3, 2), reason="`airflow fable` needs Airflow >= 3.2 (provider CLI commands)"
)

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def fable(*args: str, check: bool = True, ledger: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [AIRFLOW, "fable", *args, *(["--ledger-conn-id", "fable_ledger"] if ledger else [])],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_engine(request, tmp_path, monkeypatch):
    """The ``fable_ledger`` connection (and an engine on the same database)."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"
        monkeypatch.setenv(
            "AIRFLOW_CONN_FABLE_LEDGER", json.dumps({"conn_type": "sqlite", "host": str(path)})
        )
        engine = sa.create_engine(f"sqlite:///{path}")
        yield engine
        engine.dispose()
        return
    from tests.conftest import private_pg_database

    with private_pg_database("fable_cli") as url:
        conn = {"conn_type": "postgres", "host": url.host, "port": url.port or 5432, "login": url.username,
                "schema": url.database}  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_FABLE_LEDGER", json.dumps(conn))
        engine = sa.create_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def backlog(fable_airflow, fable_emulator_factory, tmp_path, monkeypatch, ledger_engine):
    """One triage run of 120 tickets (some invalid answers, some errored) into the ledger."""
    server = fable_emulator_factory(faults={"invalid_answer_rate": 0.15, "errored_rate": 0.05, "seed": 7})
    point_connection_at(server, ledger_conn_id="fable_ledger")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    dag = fable_airflow.load_dag("support_ticket_triage")
    result = fable_airflow.run_dag(dag, conf={"limit": 120})
    assert result.state == "success", result.task_states
    yield ledger_engine, result, server
    os.environ.pop("AIRFLOW_CONN_FABLE_DEFAULT", None)


def test_cli_commands_match_the_ledger(backlog):
    engine, result, server = backlog
    submit = result.xcom("tickets.s1_submit")  # the triage example is a backlog unit, one stage
    job_id = submit["job_fingerprint"]
    with engine.begin() as conn:
        # Two accepted records flagged for review (the status a reviewing load writes).
        flagged = list(
            conn.execute(
                sa.text(
                    "SELECT record_id FROM fable_records WHERE status='accepted' ORDER BY record_id LIMIT 2"
                )
            ).scalars()
        )
        conn.execute(
            sa.text("UPDATE fable_records SET status='needs_review' WHERE record_id IN (:a, :b)"),
            {"a": flagged[0], "b": flagged[1]},
        )
        counts = dict(
            conn.execute(sa.text("SELECT status, count(*) FROM fable_records WHERE job_id=:j GROUP BY status"),
                         {"j": job_id}).all()
        )  # fmt: skip
        rejected = dict(
            conn.execute(sa.text("SELECT record_id, retryable FROM fable_records WHERE job_id=:j AND "
                                 "status='rejected'"), {"j": job_id}).all()
        )  # fmt: skip
        top_reason = conn.execute(
            sa.text("SELECT reason, count(*) AS n FROM fable_records WHERE job_id=:j AND status='rejected' "
                    "GROUP BY reason ORDER BY n DESC, reason LIMIT 1"), {"j": job_id}
        ).first()  # fmt: skip
        batch_ids = set(conn.execute(sa.text("SELECT batch_id FROM fable_submissions")).scalars())
    assert counts["rejected"] > 0 and counts["accepted"] > 0
    loaded = result.xcom("tickets.s1_load")

    jobs = json.loads(fable("jobs", "-o", "json").stdout)
    assert [j["job_id"] for j in jobs] == [job_id]
    job = jobs[0]
    assert job["dag_id"] == "support_ticket_triage" and job["stage"] == "tickets.s1_submit"
    assert job["model"] == submit["model"]
    for status in ("accepted", "rejected", "needs_review"):
        assert job["counts"][status] == counts.get(status, 0), status
    assert job["counts"]["total"] == sum(counts.values()) == 120
    # Every load of the job counts (the unit's pilot pass and full pass are one job: one stage).
    loads = [v for k, v in result.xcoms.items() if k.startswith("tickets.") and k.endswith("s1_load") and v]
    assert loaded in loads
    assert job["cost_usd"] == pytest.approx(sum(v["cost_usd"] for v in loads))
    assert job["estimated_cost_usd"] == pytest.approx(max(v["estimated_cost_usd"] or 0 for v in loads))  # the largest run's

    table = fable("jobs").stdout
    assert job_id in table and "support_ticket_triage" in table

    status = json.loads(fable("status", job_id[:10], "-o", "json").stdout)  # a prefix is enough
    assert status["job_id"] == job_id
    # The pilot pass's batch and the full pass's: both batches of the one stage's job.
    passes = {b for k, v in result.xcoms.items() if k.startswith("tickets.") and k.endswith("s1_submit") and v
              for b in v["batch_ids"]}  # fmt: skip
    assert {b["batch_id"] for b in status["batches"]} == batch_ids == passes >= set(submit["batch_ids"])
    assert sum(sum(b["counts"].values()) for b in status["batches"]) == 120
    assert (status["reject_reasons"][0]["reason"], status["reject_reasons"][0]["count"]) == tuple(top_reason)
    assert sum(r["count"] for r in status["reject_reasons"]) == counts["rejected"]
    text = fable("status", job_id).stdout
    assert top_reason[0] in text and f"rejected={counts['rejected']}" in text

    failed = list(csv.DictReader(io.StringIO(fable("failed", job_id, "-o", "csv").stdout)))
    assert {r["record_id"] for r in failed} == set(rejected)
    retryable = json.loads(fable("failed", job_id, "--retryable", "-o", "json").stdout)
    assert {r["record_id"] for r in retryable} == {k for k, v in rejected.items() if v}

    review = json.loads(fable("review", job_id, "-o", "json").stdout)
    assert [r["record_id"] for r in review] == sorted(flagged)

    missing = fable("status", "nope", check=False)
    assert missing.returncode != 0 and "no job 'nope'" in missing.stderr


def _created(server) -> int:
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)["batches_created"]


@pytest.mark.skipif(
    AIRFLOW_VERSION < (3, 3),
    reason="on Airflow 3.2.2 the estimate's inner dag.test() run of a Backlog DAG ends failed "
    "without a projection (not investigated; docs/compatibility.md)",
)
def test_estimate_projects_each_stage_and_pays_nothing(backlog):
    engine, result, server = backlog
    created = _created(server)
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT count(*) FROM fable_submissions")).scalar_one()
    out = fable("estimate", "support_ticket_triage", "-c", '{"limit": 30}', "-o", "json", ledger=False)
    report = _json_tail(out)
    (stage,) = report["stages"]
    assert "error" not in stage, stage
    # The unit's estimate-only run: 30 tickets the first run did not process, priced per request
    # from the stage's earlier answers (the first run), for its one stage.
    assert (stage["task_id"], stage["records"]) == ("tickets.s1", 30)
    assert stage["model"] == result.xcom("tickets.s1_submit")["model"]
    assert stage["cost_usd"] > 0 and report["total_cost_usd"] == stage["cost_usd"]
    assert "earlier answer" in stage["output_basis"], stage
    # Nothing was paid or recorded: no batch on the API, no intent in the ledger.
    assert _created(server) == created
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM fable_submissions")).scalar_one() == before
    text = fable("estimate", "support_ticket_triage", "-c", '{"limit": 30}', ledger=False).stdout
    assert "nothing was submitted" in text and "tickets.s1" in text


def _json_tail(out: subprocess.CompletedProcess[str]) -> dict:
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise AssertionError(
            f"not JSON on stdout:\n{out.stdout[:3000]}\n---stderr---\n{out.stderr[-2000:]}"
        ) from None

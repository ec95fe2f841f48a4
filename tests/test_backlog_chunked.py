"""Chunk-then-combine inside the backlog unit (``Chunking``) beyond the example DAG: a pilot pass
whose projection includes the section requests, a file source, a cascade on the combine, and a
``mode=failed`` rerun that pays only for the sections not accepted before. Real Airflow
(dag.test), the real SDK against the emulator, SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.chunking import parse_section_id
from airflow_provider_fable.testing.plugin import point_connection_at

DAGS = Path(__file__).resolve().parent / "backlog_chunked_dags"


@pytest.fixture
def chunked(fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    server = fable_emulator_factory(
        processing_retrieves=1, faults={"invalid_answer_rate": 0.1, "errored_rate": 0.02, "seed": 4}
    )
    # The ledger in the test's own database (the unit skips what its jobs accepted).
    point_connection_at(server, ledger_conn_id="chunked_db")
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    monkeypatch.setenv("FABLE_RETRY_DELAY_SECONDS", "0")
    db = tmp_path / "chunked.db"
    fable_airflow.set_connection("chunked_db", conn_type="sqlite", host=str(db))
    engine = sa.create_engine(f"sqlite:///{db}")
    yield fable_airflow, engine, server
    engine.dispose()


def _load_dag(dag_id: str):
    """Parse ``tests/backlog_chunked_dags`` and register the DAG under the dags-folder bundle, so
    ``dag.test()`` (which syncs the configured bundles only) finds it serialized."""
    from airflow_provider_fable.testing.airflow_env import load_dag

    return load_dag(dag_id, DAGS, serialize=True)


def _rows(engine, sql: str, **binds):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), binds).mappings()]


def _received(server, batch_ids) -> list[str]:
    ids = []
    for batch_id in batch_ids:
        batch = server.store._get(batch_id)
        if batch.lines is None:
            ids += [custom_id for custom_id, _ in batch.requests]
        else:
            ids += [json.loads(line)["custom_id"] for line in batch.lines]
    return ids


def test_pilot_projects_the_sections_and_a_failed_rerun_resends_only_failed_sections(chunked):
    airflow_env, engine, server = chunked
    dag = _load_dag("chunked_documents")
    result = airflow_env.run_dag(dag, conf={"limit": 30})
    states = result.task_states
    assert result.state == "success", states
    assert set(states.values()) == {"success"}, states

    pilot_plan, plan = result.xcom("docs.pilot_combine_plan"), result.xcom("docs.combine_plan")
    assert pilot_plan["records"] == 5 and plan["records"] == 25
    assert pilot_plan["chunked"] + plan["chunked"] > 0 and pilot_plan["sections"] > 0

    # The approval's projection prices the full pass's sections from what the pilot measured,
    # and the pilot's spend counts them.
    project = result.xcom("docs.project")
    sections_row = project["stages"][0]
    assert sections_row["stage"] == "sections" and sections_row["model"] == "claude-haiku-4-5"
    assert sections_row["requests"] == plan["sections"]  # exact: the full pass split as it is sent
    assert sections_row["projected_cost_usd"] > 0
    assert "| sections | claude-haiku-4-5 |" in project["markdown"]
    pilot_final = result.xcom("docs.pilot_finalize")
    assert project["pilot_cost_usd"] == pytest.approx(pilot_final["cost_usd"], abs=1e-6)
    assert pilot_final["cost_usd_by_stage"]["sections"] > 0
    # The full pass's sections submit got what the pilot left of the budget (no budget: None).
    assert plan["budget_left_usd"] is None

    # Every section sent names a record of its pass; one final row or one reject per record.
    sections = result.xcom("docs.sections_submit")
    sent = _received(server, sections["batch_ids"])
    full_ids = {
        r["record_id"]
        for r in _rows(engine, "SELECT record_id FROM briefs__work WHERE pass_name = 'full' AND stage = 0")
    }
    assert sent and {parse_section_id(s)[0] for s in sent} <= full_ids
    finals = {r["doc_id"]: r for r in _rows(engine, "SELECT * FROM briefs")}
    rejects = {r["doc_id"]: r for r in _rows(engine, "SELECT * FROM briefs_rejects")}
    assert len(finals) + len(rejects) == 30 and not set(finals) & set(rejects)
    assert {r["_stage"] for r in finals.values()} <= {"s1", "s2"}
    incomplete = {r["doc_id"] for r in _rows(engine, "SELECT doc_id FROM briefs_incomplete")}
    for doc in incomplete:  # never combined: rejected as such, and not escalated (nothing to escalate)
        assert rejects[doc]["reason"] == "sections_incomplete" and rejects[doc]["_stage"] == "s1", rejects[
            doc
        ]
    escalated = {r["record_id"] for r in _rows(engine, "SELECT record_id FROM briefs__work WHERE stage = 1")}
    assert not escalated & incomplete

    # mode=failed: the incomplete and rejected records again; their sections accepted before are
    # not paid for again, only the ones rejected.
    bad_sections = {r["record_id"] for r in _rows(engine, "SELECT record_id FROM briefs__sections_rejects")}
    accepted_sections = {r["section_id"] for r in _rows(engine, "SELECT section_id FROM briefs__sections")}
    rerun = airflow_env.run_dag(dag, conf={"limit": 30, "mode": "failed"})
    assert rerun.state == "success", rerun.task_states
    assert rerun.xcom("docs.select")["full"] == len([d for d, r in rejects.items() if r["retryable"]])
    again = rerun.xcom("docs.sections_submit")
    resent = _received(server, again["batch_ids"]) if again["submitted"] else []
    assert set(resent) <= bad_sections - accepted_sections and len(resent) == len(set(resent))
    assert again["skipped"] == rerun.xcom("docs.combine_plan")["sections"] - len(resent)
    assert set(resent) == {
        s for s in bad_sections - accepted_sections if parse_section_id(s)[0] in incomplete
    }


def test_an_empty_text_fails_the_sections_submit_before_anything_is_sent(chunked):
    """``on_empty="error"`` (the default): the sections submit fails naming the record and the
    rule, and no batch is created (an empty section would be a paid request about nothing)."""
    airflow_env, engine, server = chunked
    result = airflow_env.run_dag(_load_dag("chunked_empty_text"))
    assert result.state == "failed"
    assert result.task_states["notes.select"] == "success"
    assert result.task_states["notes.sections_submit"] == "failed", result.task_states
    assert int(server.store.stats.snapshot().get("calls", {}).get("create", 0)) == 0

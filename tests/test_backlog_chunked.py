"""Chunk-then-combine inside the backlog unit (``Chunking``): dags/document_summaries.py end to end."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import point_connection_at


@pytest.fixture
def docs_env(request, fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    server = fable_emulator_factory(
        processing_retrieves=1, faults={"invalid_answer_rate": 0.08, "errored_rate": 0.02, "seed": 5}
    )
    point_connection_at(server)
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    monkeypatch.setenv("FABLE_RETRY_DELAY_SECONDS", "0")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    engine = sa.create_engine(f"sqlite:///{db}")
    yield fable_airflow, engine, server
    engine.dispose()


def _rows(engine, sql: str, **binds):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), binds).mappings()]


def test_document_summaries_on_the_unit(docs_env):
    airflow_env, engine, server = docs_env
    dag = airflow_env.load_dag("document_summaries")
    result = airflow_env.run_dag(dag, conf={"limit": 14, "section_tokens": 500})
    print(json.dumps(result.task_states, indent=1))
    print(json.dumps(result.xcom("documents.combine_plan"), indent=1, default=str))
    print(json.dumps(result.xcom("documents.finalize"), indent=1, default=str))
    assert result.state == "success", result.task_states

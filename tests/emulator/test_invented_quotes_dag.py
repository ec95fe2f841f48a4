"""Invented quotes end to end: the CRM example DAG must catch every one of them.

The emulator's ``invented_quote_rate`` makes a share of ``evidence`` answers paraphrase the
record instead of quoting it. Every such answer still validates (only the DAG knows the record),
so the DAG's record-aware invariant is what has to see them: each is escalated with the reason
``evidence_not_in_record``, and no lead ends up in ``lead_enrichment`` with an unquoted
"quote". Real Airflow (``dag.test``), the real SDK, a real emulator and SQLite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import point_connection_at

ROOT = Path(__file__).resolve().parents[2]


def _crm_module():
    spec = importlib.util.spec_from_file_location("_quotes_crm_dag", ROOT / "dags" / "crm_lead_enrichment.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_crm_dag_escalates_and_never_keeps_an_invented_quote(
    fable_airflow, fable_emulator_factory, tmp_path, monkeypatch
) -> None:
    server = fable_emulator_factory(
        processing_retrieves=1, faults={"invented_quote_rate": 0.3, "description_break_rate": 0, "seed": 7}
    )
    point_connection_at(server)
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    module = _crm_module()

    result = fable_airflow.run_dag(fable_airflow.load_dag("crm_lead_enrichment"), conf={"limit": 60})
    assert result.state == "success", result.task_states

    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            leads = {
                r["lead_id"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM crm_leads")).mappings()
            }
            # The backlog unit keeps each stage's accepted answers in <table>__<stage>.
            stage1 = [dict(r) for r in conn.execute(sa.text("SELECT * FROM lead_enrichment__s1")).mappings()]
            final = [dict(r) for r in conn.execute(sa.text("SELECT * FROM lead_enrichment")).mappings()]
    finally:
        engine.dispose()

    # The cheap stage loaded them (schema-valid), about 30 % of 60 with an invented quote ...
    invented = {
        r["lead_id"] for r in stage1 if not module.evidence_is_quoted(r["evidence"], leads[r["lead_id"]])
    }
    assert 8 <= len(invented) <= 30, len(invented)
    # ... each one escalated for exactly that reason, as the stage's plan reports ...
    plan = result.xcom("leads.s1_plan")
    assert plan["by_reason"]["evidence_not_in_record"] == len(invented)
    # ... so no cheap answer with an invented quote is final: the lead is answered by the escalation
    # stage (its own draw) or left unresolved for the next run. (The last stage's answer is not
    # checked against the record again: the unit's escalation rules judge the stages before it.)
    assert final and all(
        module.evidence_is_quoted(r["evidence"], leads[r["lead_id"]]) for r in final if r["_stage"] == "s1"
    )
    escalated = [r for r in final if r["lead_id"] in invented]
    assert escalated and all(
        r["_stage"] == "s2" and r["_escalation_reason"] == "evidence_not_in_record" for r in escalated
    )

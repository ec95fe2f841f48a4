"""The three pattern DAGs end to end: real Airflow (dag.test), real SDK, emulator, SQLite and PostgreSQL.

Each test runs a DAG on a small pilot and asserts on the loaded tables: row counts, enum values,
the pattern's invariants (evidence quotes the record; ``other`` has a justification; one combined
summary per document with all four parts), escalation counts and stage costs, inconsistency rows.
All runs share this module so Airflow's first-run warm-up is paid once.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at
from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parents[1]
PATTERN_DAGS = ("crm_lead_enrichment", "document_summaries", "cancellation_reason_cleanup")


@pytest.fixture(params=["sqlite", "postgres"])
def backlog(request, fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    """(airflow, engine) with ``fable_backlog_db`` on a fresh SQLite file or a private PG schema."""
    yield from _backlog(request, request.param, fable_airflow, fable_emulator_factory, tmp_path, monkeypatch)


@pytest.fixture
def sqlite_backlog(request, fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    """The same on SQLite only, for behaviour that does not depend on the database."""
    yield from _backlog(request, "sqlite", fable_airflow, fable_emulator_factory, tmp_path, monkeypatch)


@pytest.fixture
def pg_backlog(request, fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    """PostgreSQL only (the ticket DAG's SQLite runs live in test_dag_triage.py)."""
    yield from _backlog(request, "postgres", fable_airflow, fable_emulator_factory, tmp_path, monkeypatch)


def _backlog(request, kind, fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    server = fable_emulator_factory(
        processing_retrieves=2, faults={"invalid_answer_rate": 0.05, "errored_rate": 0.01, "seed": 5}
    )
    # The job ledger in the test's own backlog database (as a deployment shares one database):
    # the backlog unit skips what its jobs accepted, and an embedded ledger shared by every test
    # of the session would remember the answers another test's database holds.
    point_connection_at(server, ledger_conn_id="fable_backlog_db")
    request.node.fable_server = server  # for tests that look at what the emulator received
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    monkeypatch.setenv("FABLE_RETRY_DELAY_SECONDS", "0")
    if kind == "sqlite":
        db = tmp_path / "backlog.db"
        fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
        engine = sa.create_engine(f"sqlite:///{db}")
    else:
        engine = request.getfixturevalue("pg_engine")
        with engine.connect() as conn:
            schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
        # The server, user and database of FABLE_TEST_PG_URL (tests/conftest.py), never a
        # hard-coded database: the private schema lives in whichever database that URL names.
        url = sa.engine.make_url(PG_URL)
        fable_airflow.set_connection(
            "fable_backlog_db",
            conn_type="postgres",
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            login=url.username or "postgres",
            password=url.password,
            schema=url.database,
            extra={"sqlalchemy_query": {"options": f"-csearch_path={schema}"}},
        )
    yield fable_airflow, engine
    if kind == "sqlite":
        engine.dispose()


def _received(server, batch_ids) -> list[str]:
    """The custom_ids the emulator received in these batches (what was sent, hence paid for).

    An ended batch keeps one result line per request it received (its params are dropped).
    """
    ids = []
    for batch_id in batch_ids:
        batch = server.store._get(batch_id)
        if batch.lines is None:
            ids += [custom_id for custom_id, _ in batch.requests]
        else:
            ids += [json.loads(line)["custom_id"] for line in batch.lines]
    return ids


def _created(server) -> int:
    return int(server.store.stats.snapshot().get("calls", {}).get("create", 0))


def _rows(engine, sql: str, **binds):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), binds).mappings()]


#: What parsing an example DAG file must never import: the SDK and pandas (slow, and never needed
#: to build a DAG), and the provider's run-time machinery (the ledger and the SQLAlchemy it runs
#: on, the job model, the loader, the hook, the trigger): bench/dag_parse.py measures why.
#: (Airflow itself imports SQLAlchemy with ``airflow.sdk``, so the check is on what the DAG file
#: adds to what its ``airflow.sdk`` import already loaded.)
NOT_AT_PARSE_TIME = (
    "anthropic",
    "pandas",
    "sqlalchemy",
    "airflow_provider_fable.core",
    "airflow_provider_fable.hooks",
    "airflow_provider_fable.triggers",
)


@pytest.mark.parametrize("path", [f"dags/{d}.py" for d in ("support_ticket_triage", *PATTERN_DAGS)])
def test_dag_files_import_only_airflow_and_pydantic(path):
    code = (
        "import sys, importlib.util; import airflow.sdk;"
        "before = set(sys.modules);"
        f"spec = importlib.util.spec_from_file_location('d', {path!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
        f"print(sorted(k for k in set(sys.modules) - before if k.startswith({NOT_AT_PARSE_TIME!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_parse_time_constants_match_their_sources():
    """Defaults written out in the cheap modules (so parsing imports nothing else) stay equal."""
    from airflow_provider_fable import DEFAULT_CONN_ID
    from airflow_provider_fable.core.terminal import DEFAULT_DEADLINE_MARGIN
    from airflow_provider_fable.hooks.fable import FableHook
    from airflow_provider_fable.operators.batch import FableBatchOperator
    from airflow_provider_fable.sensors.batch import FableBatchSensor

    assert FableHook.default_conn_name == DEFAULT_CONN_ID
    for cls in (FableBatchSensor, FableBatchOperator):
        assert (
            inspect.signature(cls.__init__).parameters["deadline_margin"].default == DEFAULT_DEADLINE_MARGIN
        )


def test_dags_are_scheduled_with_params_retries_and_assets(fable_airflow):
    for dag_id in PATTERN_DAGS:
        dag = fable_airflow.load_dag(dag_id)
        # A real data interval (not Airflow 3's zero-length cron trigger), so backfills select by it.
        assert type(dag.timetable).__name__ == "CronDataIntervalTimetable", dag_id
        # The backlog unit's Params (the models are declared per Stage, no longer Params).
        assert {"pilot", "budget_usd", "mode", "limit", "estimate_only", "approval"} <= set(dag.params), (
            dag_id
        )
        for t in dag.tasks:
            assert t.retries and t.retries >= 1, (dag_id, t.task_id)
        outlets = [o for t in dag.tasks for o in t.outlets]
        assert outlets, dag_id


def test_missing_connection_names_it_and_how_to_create_it(fable_airflow, monkeypatch):
    from airflow_provider_fable._compat import AirflowFailException
    from airflow_provider_fable.example_data import require_connections

    monkeypatch.delenv("AIRFLOW_CONN_NOPE_DB", raising=False)
    with pytest.raises(AirflowFailException) as err:
        require_connections(sql="nope_db")
    text = str(err.value)
    assert "'nope_db' is not defined" in text
    assert "airflow connections add nope_db" in text and "AIRFLOW_CONN_NOPE_DB" in text


def test_share_limits_accept_rendered_templates():
    """A Param feeding ``max_share`` arrives rendered (a string); the limits become numbers."""
    from airflow_provider_fable.core.guardrails import check_config, share_limits

    assert share_limits({"label": {"other": "0.15"}}) == {"label": {"other": 0.15}}
    assert share_limits('{"label": {"other": 0.2}}') == {"label": {"other": 0.2}}
    assert share_limits({"label": {"other": "None"}}) == {"label": {}}  # a None Param: no limit
    assert share_limits("") is None and share_limits(None) is None
    with pytest.raises(ValueError, match="must be a share in 0..1"):  # still refused before loading
        check_config(
            max_share=share_limits({"label": {"other": "lots"}}), min_share=None, fields={"label": ["other"]}
        )
    with pytest.raises(ValueError, match="must be a mapping"):
        share_limits("label=other")


# ---------------------------------------------------------------------------------------------------
# crm_lead_enrichment
# ---------------------------------------------------------------------------------------------------


def test_crm_lead_enrichment_cascade(backlog):
    airflow_env, engine = backlog
    from airflow_provider_fable import example_data as ex

    dag = airflow_env.load_dag("crm_lead_enrichment")
    result = airflow_env.run_dag(dag, conf={"limit": 120})
    assert result.state == "success", result.task_states

    selected = result.xcom("leads.select")
    assert selected["full"] == 120 and selected["window"] is None  # manual run: the backlog
    cheap = result.xcom("leads.s1_submit")
    strong = result.xcom("leads.s2_submit")
    assert cheap["request_count"] == 120 and cheap["model"] == "claude-haiku-4-5"
    # The budget gate is the submit's own estimate (max_cost_usd = params.budget_usd), before any create.
    assert 0 < cheap["estimate"]["cost_usd"] <= dag.params["budget_usd"]
    plan = result.xcom("leads.s1_plan")
    assert 0 < plan["escalated"] < 120
    assert strong["request_count"] == plan["escalated"] and strong["model"] == "claude-fable-5"
    assert set(plan["by_reason"]) <= {
        "rejected",
        "evidence_not_in_record",
        "unknown_high_value",
        "low_confidence",
    }
    # The escalation's cap is what the cheap stage left of the budget, and its estimate fits it.
    assert 0 < plan["budget_left_usd"] < dag.params["budget_usd"]
    assert strong["estimate"]["cost_usd"] <= plan["budget_left_usd"]

    final = _rows(engine, "SELECT * FROM lead_enrichment")
    report = result.xcom("report")
    assert len(final) == sum(report["final"].values()) and len(final) + report["unresolved"] == 120
    assert {r["_stage"] for r in final} <= {"s1", "s2"} and report["final"]["s1"] > 0
    if result.xcom("leads.s2_load")["accepted"]:
        assert report["final"]["s2"] > 0
    assert {r["_model"] for r in final if r["_stage"] == "s2"} == {"claude-fable-5"}
    leads = {r["lead_id"]: r for r in ex.iter_dataset("crm_leads")}
    from_module = _load_dag_module("crm_lead_enrichment")
    for r in final:
        assert r["industry"] in {e.value for e in from_module.Industry}
        assert r["company_size"] in {e.value for e in from_module.CompanySize}
        assert r["persona"] in {e.value for e in from_module.Persona}
        assert 0 <= r["confidence"] <= 1
        if r["_stage"] == "s1":  # a cheap answer with an invented quote is never final (it escalates);
            # the last stage's answer is (the unit has no check after the last stage: behaviour change)
            assert from_module.evidence_is_quoted(r["evidence"], leads[r["lead_id"]]), r
        if r["_stage"] == "s2":  # escalated: the reason is the rule that fired
            assert r["_escalation_reason"] in plan["by_reason"]

    # Stage costs: both stages cost something, and the cascade is cheaper than all-on-Fable-5.
    assert report["escalated"] == plan["escalated"]
    assert report["stage_cost_usd"]["s1"] > 0 and report["stage_cost_usd"]["s2"] > 0
    assert report["cost_usd"] == pytest.approx(sum(report["stage_cost_usd"].values()))
    assert report["cost_usd"] < report["all_on_claude_fable_5_usd"]
    assert report["labelled_rows"] >= 5
    assert all(v is None or 0 <= v <= 1 for v in report["agreement"].values())
    assert TEST_API_KEY not in json.dumps(result.xcoms, default=str)

    # A second run takes the next leads; nothing already enriched is selected again.
    again = airflow_env.run_dag(dag, conf={"limit": 30})
    assert again.state == "success", again.task_states
    second = {
        r["record_id"]
        for r in _rows(
            engine,
            "SELECT record_id FROM lead_enrichment__work WHERE run_id = :r AND stage = 0",
            r=again.run_id,
        )
    }
    assert len(second) == 30 and not second & {r["lead_id"] for r in final}


def test_crm_failed_mode_resends_only_what_each_stage_rejected(request, sqlite_backlog):
    """mode=failed: each stage sends only the leads its job has not accepted (the ledger decides)."""
    airflow_env, engine = sqlite_backlog
    server = request.node.fable_server
    dag = airflow_env.load_dag("crm_lead_enrichment")
    first = airflow_env.run_dag(dag, conf={"limit": 120})
    assert first.state == "success", first.task_states
    final = {r["lead_id"] for r in _rows(engine, "SELECT lead_id FROM lead_enrichment")}
    cheap_accepted = {r["lead_id"] for r in _rows(engine, "SELECT lead_id FROM lead_enrichment__s1")}
    strong_accepted = {r["lead_id"] for r in _rows(engine, "SELECT lead_id FROM lead_enrichment__s2")}
    failed = {
        r["lead_id"] for r in _rows(engine, "SELECT lead_id FROM lead_enrichment_rejects WHERE retryable")
    }
    assert failed and not failed & final, "the emulator's faults leave some leads without a row"

    rerun = airflow_env.run_dag(dag, conf={"limit": 500, "mode": "failed"})
    assert rerun.state == "success", rerun.task_states
    selected = rerun.xcom("leads.select")
    assert selected["mode"] == "failed" and selected["full"] == len(failed)
    cheap = rerun.xcom("leads.s1_submit")
    old = set(first.xcom("leads.s1_submit")["batch_ids"])
    sent_cheap = _received(server, [b for b in cheap["batch_ids"] if b not in old])
    # Stage 1 sends exactly the selected leads the cheap job has not accepted; its accepted
    # answers are reused (and judged again by the escalation rules).
    assert sorted(sent_cheap) == sorted(failed - cheap_accepted)
    assert cheap["attached"] == 0 and cheap["skipped"] == len(failed & cheap_accepted)
    strong = rerun.xcom("leads.s2_submit") or {}
    old_strong = set((first.xcom("leads.s2_submit") or {}).get("batch_ids", []))
    sent_strong = _received(server, [b for b in strong.get("batch_ids", []) if b not in old_strong])
    assert len(sent_strong) == len(set(sent_strong)) and not set(sent_strong) & strong_accepted
    assert set(sent_strong) <= failed
    assert rerun.xcom("report")["records"] == len(failed)


def test_crm_evidence_must_quote_the_record():
    module = _load_dag_module("crm_lead_enrichment")
    lead = {
        "company_name": "Mercy Clinics",
        "website_domain": "mercyclinics.com",
        "job_title": "CFO",
        "notes": "Hospital group,   radiology department is the buyer",
    }
    assert module.evidence_is_quoted("hospital group, radiology department", lead)  # case/space-insensitive
    assert module.evidence_is_quoted("", lead)  # nothing claimed, nothing to quote
    assert not module.evidence_is_quoted("about 1,200 staff", lead)  # an invented specific
    with pytest.raises(ValueError, match="evidence must quote"):
        module.LeadEnrichment(
            industry="healthcare", company_size="unknown", persona="finance", confidence=0.9, evidence=""
        )


def test_crm_interval_run_selects_only_its_interval(sqlite_backlog):
    airflow_env, engine = sqlite_backlog
    dag = airflow_env.load_dag("crm_lead_enrichment")
    day = datetime(2026, 3, 10, tzinfo=timezone.utc)
    result = airflow_env.run_dag(
        dag, conf={"limit": 1000, "mode": "interval", "budget_usd": None}, logical_date=day
    )
    assert result.state == "success", result.task_states
    # A run at 2026-03-10 covers the day that ended then (Airflow's data-interval semantics).
    assert result.xcom("leads.select")["window"] == ["2026-03-09T00:00:00+00:00", "2026-03-10T00:00:00+00:00"]
    window = ("2026-03-09T00:00:00Z", "2026-03-10T00:00:00Z")
    rows = _rows(
        engine,
        "SELECT l.created_at FROM crm_leads l JOIN lead_enrichment__work w ON w.record_id = l.lead_id "
        "WHERE w.stage = 0 AND w.run_id = :r",
        r=result.run_id,
    )
    assert rows and all(window[0] <= r["created_at"] < window[1] for r in rows)
    in_window = _rows(
        engine,
        "SELECT count(*) AS n FROM crm_leads WHERE created_at >= :a AND created_at < :b",
        a=window[0],
        b=window[1],
    )[0]["n"]
    assert len(rows) == in_window


def test_crm_budget_refuses_before_anything_is_sent(request, sqlite_backlog):
    airflow_env, engine = sqlite_backlog
    server = request.node.fable_server
    dag = airflow_env.load_dag("crm_lead_enrichment")
    result = airflow_env.run_dag(dag, conf={"limit": 200, "budget_usd": 0.0001})
    assert result.state == "failed"
    # The submit's max_cost_usd: the estimate ran (count_tokens) and refused before any create.
    assert result.task_states["leads.select"] == "success"
    assert result.task_states["leads.s1_submit"] == "failed", result.task_states
    assert result.xcom("leads.s1_submit") is None and _created(server) == 0
    assert server.store.stats.snapshot()["calls"].get("count_tokens", 0) > 0


def _load_dag_module(dag_id: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_pattern_{dag_id}", ROOT / "dags" / f"{dag_id}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------
# document_summaries
# ---------------------------------------------------------------------------------------------------


# The splitting itself is core.chunking's, tested in tests/test_chunking.py (the DAG's own
# split_sections/estimate_tokens were replaced by it when the DAG moved onto the backlog unit).


def _parent(section_id: str) -> str:
    from airflow_provider_fable.core.chunking import parse_section_id

    parsed = parse_section_id(section_id)
    assert parsed is not None, section_id
    return parsed[0]


def test_document_summaries_chunk_then_combine(request, backlog):
    airflow_env, engine = backlog
    server = request.node.fable_server
    dag = airflow_env.load_dag("document_summaries")
    result = airflow_env.run_dag(dag, conf={"limit": 14, "section_tokens": 500})
    assert result.state == "success", result.task_states

    plan = result.xcom("documents.combine_plan")
    assert plan["records"] == 14 and plan["direct"] > 0 and plan["chunked"] > 0
    submitted = result.xcom("documents.sections_submit")
    assert submitted["request_count"] == plan["sections"] == submitted["submitted"]
    sent = _received(server, submitted["batch_ids"])
    assert len(sent) == plan["sections"]
    from airflow_provider_fable.core.chunking import parse_section_id

    for sid in sent:  # custom_id keeps the document id, the section's place and the count
        _doc, k, n = parse_section_id(sid)
        assert 1 <= k <= n
    assert len({_parent(s) for s in sent}) == plan["chunked"]

    assert plan["to_combine"] + plan["incomplete"] == 14
    assert result.xcom("documents.s1_submit")["request_count"] == plan["to_combine"]
    finalized = result.xcom("documents.finalize")
    summaries = _rows(engine, "SELECT * FROM document_summaries")
    assert len(summaries) == finalized["accepted"] > 0
    assert len({s["doc_id"] for s in summaries}) == len(summaries)  # one per document
    for s in summaries:
        assert len(s["executive_summary"]) >= 20 and s["_stage"] == "s1" and s["_model"] == "claude-fable-5"
        for part in ("key_points", "risks", "open_questions"):
            items = json.loads(s[part])
            assert isinstance(items, list) and items and all(isinstance(i, str) and i for i in items), part

    # Incomplete documents (a section rejected) are reported, get no summary, and are rejects
    # with the reason and the sections.
    incomplete = _rows(engine, "SELECT * FROM document_summaries_incomplete")
    assert len(incomplete) == plan["incomplete"]
    assert not {r["doc_id"] for r in incomplete} & {s["doc_id"] for s in summaries}
    bad_sections = _rows(engine, "SELECT DISTINCT record_id FROM document_summaries__sections_rejects")
    bad_docs = {_parent(r["record_id"]) for r in bad_sections}
    assert {r["doc_id"] for r in incomplete} == bad_docs
    for r in incomplete:
        assert r["rejected_sections"] or r["missing_sections"]
    rejects = {r["doc_id"]: r for r in _rows(engine, "SELECT * FROM document_summaries_rejects")}
    for doc in bad_docs:
        assert rejects[doc]["reason"] == "sections_incomplete", rejects[doc]
    assert finalized["cost_usd_by_stage"]["sections"] > 0 and finalized["cost_usd_by_stage"]["s1"] > 0


def test_document_summaries_estimate_only_counts_the_sections_and_pays_nothing(request, sqlite_backlog):
    """estimate_only on a chunked backlog: the projection has the exact number of section requests
    (the selection split as it would be sent) priced at an upper bound, and nothing is created."""
    airflow_env, engine = sqlite_backlog
    server = request.node.fable_server
    dag = airflow_env.load_dag("document_summaries")
    result = airflow_env.run_dag(dag, conf={"limit": 14, "section_tokens": 500, "estimate_only": True})
    assert result.state == "success", result.task_states
    projection = result.xcom("documents.select")["projection"]
    sections, combine = projection["stages"]
    assert sections["stage"] == "sections" and sections["requests"] > 0 and sections["projected_cost_usd"] > 0
    assert "upper bound" in sections["basis"] and "| sections |" in projection["markdown"]
    assert projection["projected_cost_usd"] == pytest.approx(
        sections["projected_cost_usd"] + combine["projected_cost_usd"], abs=1e-5
    )
    assert result.task_states["documents.sections_submit"] == "skipped" and _created(server) == 0
    # The count is the split the run would send: the same run without estimate_only sends it.
    fresh = airflow_env.load_dag("document_summaries")  # dag.test() keeps the first run's params
    paid = airflow_env.run_dag(fresh, conf={"limit": 14, "section_tokens": 500, "estimate_only": False})
    assert paid.xcom("documents.sections_submit")["request_count"] == sections["requests"]


def test_document_summaries_failed_mode_resends_only_failed_sections(request, sqlite_backlog):
    airflow_env, engine = sqlite_backlog
    server = request.node.fable_server
    dag = airflow_env.load_dag("document_summaries")
    conf = {"limit": 14, "section_tokens": 500}
    first = airflow_env.run_dag(dag, conf=conf)
    assert first.state == "success", first.task_states
    summarised = {r["doc_id"] for r in _rows(engine, "SELECT doc_id FROM document_summaries")}
    failed = {
        r["doc_id"] for r in _rows(engine, "SELECT doc_id FROM document_summaries_rejects")
    } - summarised
    bad_sections = {
        r["record_id"] for r in _rows(engine, "SELECT record_id FROM document_summaries__sections_rejects")
    }
    if not failed:
        pytest.skip("the emulator's faults left no document without a summary in this pilot")

    rerun = airflow_env.run_dag(dag, conf={**conf, "mode": "failed"})
    assert rerun.state == "success", rerun.task_states
    assert rerun.xcom("documents.select")["full"] == len(failed)
    sections = rerun.xcom("documents.sections_submit")
    sent = _received(server, sections["batch_ids"]) if sections["submitted"] else []
    # Only the failed sections of the failed documents are paid for again; accepted ones are reused.
    assert sorted(sent) == sorted(s for s in bad_sections if _parent(s) in failed)
    assert sections["skipped"] == rerun.xcom("documents.combine_plan")["sections"] - len(sent)
    combine = rerun.xcom("documents.s1_submit")
    if combine and combine["submitted"]:
        assert set(_received(server, combine["batch_ids"])) <= failed


# ---------------------------------------------------------------------------------------------------
# cancellation_reason_cleanup
# ---------------------------------------------------------------------------------------------------


def test_normalise_groups_near_duplicates():
    module = _load_dag_module("cancellation_reason_cleanup")
    assert module.normalise("  Too expensive!!") == module.normalise("too expensive.") == "too expensive"
    assert module.normalise("TROP CHER") == module.normalise("trop cher :(") == "trop cher"
    assert module.normalise("zu teuer") != module.normalise("too expensive")
    assert module.normalise("n/a") == "n a" and module.normalise("-") == ""


def test_cancellation_reason_cleanup(backlog):
    airflow_env, engine = backlog
    module = _load_dag_module("cancellation_reason_cleanup")
    dag = airflow_env.load_dag("cancellation_reason_cleanup")
    result = airflow_env.run_dag(dag, conf={"limit": 600, "max_other_share": 1.0})
    assert result.state == "success", result.task_states

    final = result.xcom("reasons.finalize")
    rows = _rows(engine, "SELECT * FROM cancellation_reasons_clean")
    assert len(rows) == final["accepted"] and final["accepted"] + final["rejected"] == 600
    labels = {e.value for e in module.ReasonLabel}
    for r in rows:
        assert r["label"] in labels
        assert 0 <= r["confidence"] <= 1
        if r["label"] == "other":  # the invariant holds on every loaded row
            assert r["justification"] and len(r["justification"].strip()) >= 10
    assert len({r["label"] for r in rows}) >= 5

    # The review table holds exactly the normalised texts mapped to more than one label.
    source = {
        r["cancellation_id"]: r["reason_for_cancellation"]
        for r in _rows(engine, "SELECT cancellation_id, reason_for_cancellation FROM cancellations")
    }
    expected: dict[str, set[str]] = {}
    for r in rows:
        expected.setdefault(module.normalise(source[r["cancellation_id"]]), set()).add(r["label"])
    inconsistent = {k: v for k, v in expected.items() if len(v) > 1}
    review = _rows(engine, "SELECT * FROM cancellation_reason_review")
    assert {r["normalized_text"]: set(r["labels"].split(",")) for r in review} == inconsistent
    assert review, "near-duplicates mapped differently must be flagged"
    for r in review:
        counts = json.loads(r["label_counts"])
        assert sum(counts.values()) == r["row_count"] and r["majority_label"] in counts
    report = result.xcom("report")
    assert sum(report["final"].values()) == len(rows) and report["inconsistent_texts"] == len(review)
    assert sum(report["distribution"]["label"].values()) == len(rows)


def test_cancellation_other_guardrail_fails_after_loading(sqlite_backlog):
    """params.max_other_share is checked on the run's final rows, after they are written."""
    airflow_env, engine = sqlite_backlog
    dag = airflow_env.load_dag("cancellation_reason_cleanup")
    result = airflow_env.run_dag(dag, conf={"limit": 150, "max_other_share": 0.0})
    assert result.state == "failed" and result.task_states["other_share"] == "failed", result.task_states
    final = result.xcom("reasons.finalize")
    assert final["distribution"]["label"].get("other", 0) > 0
    # Nothing is lost: the rows stay loaded, and the review table is still rebuilt from them.
    assert (
        _rows(engine, "SELECT count(*) AS n FROM cancellation_reasons_clean")[0]["n"] == final["accepted"] > 0
    )
    assert result.task_states["flag_inconsistent"] == "success"
    assert result.task_states["report"] == "upstream_failed"  # the run stays failed


def test_cancellation_failed_mode_resends_only_the_rejected_rows(request, sqlite_backlog):
    """mode=failed: the ledger-based rerun sends exactly the rows the first run rejected."""
    airflow_env, engine = sqlite_backlog
    server = request.node.fable_server
    dag = airflow_env.load_dag("cancellation_reason_cleanup")
    first = airflow_env.run_dag(dag, conf={"limit": 300, "max_other_share": 1.0})
    assert first.state == "success", first.task_states
    rejected = {
        r["cancellation_id"]
        for r in _rows(engine, "SELECT cancellation_id FROM cancellation_reasons_clean_rejects")
    }
    accepted = {
        r["cancellation_id"] for r in _rows(engine, "SELECT cancellation_id FROM cancellation_reasons_clean")
    }
    assert rejected and len(rejected | accepted) == 300 and not rejected & accepted

    rerun = airflow_env.run_dag(dag, conf={"limit": 300, "max_other_share": 1.0, "mode": "failed"})
    manifest = rerun.xcom("reasons.s1_submit")
    assert rerun.xcom("reasons.select")["mode"] == "failed"
    assert manifest["submitted"] == len(rejected) and manifest["attached"] == 0
    assert not set(manifest["batch_ids"]) & set(first.xcom("reasons.s1_submit")["batch_ids"])
    # What the emulator received in the rerun: the rejected rows, each once, nothing accepted before.
    sent = _received(server, manifest["batch_ids"])
    assert sorted(sent) == sorted(rejected)
    assert rerun.task_states["reasons.s1_submit"] == rerun.task_states["reasons.s1_wait"] == "success"


# ---------------------------------------------------------------------------------------------------
# Copied alone into a user's dags folder
# ---------------------------------------------------------------------------------------------------


def test_each_example_dag_works_copied_alone(sqlite_backlog, tmp_path):
    """As a new user would: the DAG file and its prompt files in an empty dags folder, no repository."""
    import shutil

    airflow_env, engine = sqlite_backlog
    for dag_id in ("support_ticket_triage", *PATTERN_DAGS):
        folder = tmp_path / f"dags_{dag_id}"
        folder.mkdir()
        for path in (ROOT / "dags").glob(f"{dag_id}*"):  # the DAG file and its prompt files beside it
            shutil.copy(path, folder)
        assert airflow_env.load_dag(dag_id, dags_folder=str(folder)).dag_id == dag_id
    # The ticket DAG used to read dags/data/support_tickets.csv next to itself; now it seeds from
    # the provider's package data wherever the file lives.
    dag = airflow_env.load_dag(
        "support_ticket_triage", dags_folder=str(tmp_path / "dags_support_ticket_triage")
    )
    result = airflow_env.run_dag(dag, conf={"limit": 20, "pilot": 0})
    assert result.state == "success", result.task_states
    assert _rows(engine, "SELECT count(*) AS n FROM support_tickets")[0]["n"] >= 2000
    assert result.xcom("tickets.s1_submit")["request_count"] == 20


def test_support_ticket_triage_on_postgres(pg_backlog):
    airflow_env, engine = pg_backlog
    result = airflow_env.run_dag(
        airflow_env.load_dag("support_ticket_triage"), conf={"limit": 150, "pilot": 0}
    )
    assert result.state == "success", result.task_states
    loaded = result.xcom("tickets.s1_load")
    rows = _rows(engine, "SELECT * FROM ticket_triage")
    rejects = _rows(engine, "SELECT DISTINCT ticket_id FROM ticket_triage_rejects")
    assert len(rows) == loaded["accepted"] > 100 and len(rows) + len(rejects) == 150
    for r in rows:
        assert r["category"] in {"billing", "account_access", "bug", "feature_request", "shipping"}
        assert r["priority"] in {"low", "medium", "high", "urgent"}
        assert not r["escalate"] or r["priority"] in ("high", "urgent")  # the model's invariant

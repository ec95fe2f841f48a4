"""CRM lead enrichment with a model cascade: a cheap model first, Fable 5 only where it matters.

A CRM export is missing industry, company size band and persona for thousands of leads, and most
leads carry little evidence. Running every lead on the strongest model pays top price for "called,
no answer". This DAG runs the whole selection on a cheap model (``params.cheap_model``, default
``claude-haiku-4-5``) and escalates to ``params.escalation_model`` (default ``claude-fable-5``), in
a second batch of the same run, only the leads whose first answer is not good enough:

* rejected (bad JSON, schema, invariant, errored/expired) by the cheap stage;
* ``evidence`` that is not a verbatim quote of the record (an invented specific);
* ``unknown`` in any field on a high-value account (``pipeline_value_usd >= HIGH_VALUE_USD``);
* ``confidence`` below ``MIN_CONFIDENCE`` (0.5, the prompt's "unsure") on an answer
  that inferred something: a guess. An all-``unknown`` answer on a low-value lead stays: the cheap
  model declined to guess, and there is no evidence for the strong one to find either.

``report`` writes one row per lead into ``lead_enrichment`` (the Asset downstream DAGs can be
scheduled on) with the stage and model that produced it, and returns escalation counts,
the cost of each stage against running everything on Fable 5, and per-field accuracy on the
labelled subset bundled with the data.

Selection (``params.mode``): scheduled runs and backfills take leads created in their data
interval; manual runs and runs without a logical date take the unprocessed backlog; ``failed``
takes the leads an earlier run rejected and left without a row, and each stage sends again only
what its job has not accepted (the job ledger decides, see docs/ledger.md): a cheap answer
already accepted is not paid for twice. ``params.pilot`` caps the leads per run.
``params.budget_usd`` is the run's budget: the cheap stage's submit refuses (``max_cost_usd``,
before anything is sent) an estimate above it; escalations are planned, highest priority first,
within what the cheap stage's actual cost left, and that remainder is the escalation submit's
``max_cost_usd``.

Connections: ``fable_default`` (API or emulator) and ``fable_backlog_db`` (any SQL connection;
the bundled export is loaded into ``crm_leads`` when the table is empty). The top of this file
imports only Airflow, pydantic and the provider's operators; everything else happens in tasks.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, Param, task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.sensors.batch import FableBatchSensor

FABLE_CONN_ID = "fable_default"
BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
LEAD_ENRICHMENT = Asset(name="lead_enrichment", uri="x-fable://backlog/lead_enrichment")
LEAD_COLUMNS = ("lead_id", "created_at", "company_name", "website_domain", "job_title", "notes")
MAX_TOKENS = 300
#: The cascade's knobs (module constants rather than Params: every Param costs each parse of this
#: file a JSON-schema validation, and these change with the data, not from run to run).
#: Below this confidence an answer that inferred something is a guess and escalates.
MIN_CONFIDENCE = 0.5
#: ``unknown`` in any field on an account worth at least this (``pipeline_value_usd``) escalates.
HIGH_VALUE_USD = 50_000
#: The submits' ``rerun=``: with ``mode=failed`` each stage sends the selected leads its job has
#: not accepted (its rejects, and leads it never saw); an accepted answer is never paid for twice.
RERUN = "{{ 'unaccepted' if params.mode == 'failed' else '' }}"


class Industry(str, Enum):
    software = "software"
    financial_services = "financial_services"
    healthcare = "healthcare"
    manufacturing = "manufacturing"
    retail = "retail"
    education = "education"
    logistics = "logistics"
    professional_services = "professional_services"
    unknown = "unknown"


class CompanySize(str, Enum):
    micro = "micro"  # 1-10 employees
    small = "small"  # 11-50
    medium = "medium"  # 51-250
    large = "large"  # 251-1000
    enterprise = "enterprise"  # over 1000
    unknown = "unknown"


class Persona(str, Enum):
    executive = "executive"
    engineering = "engineering"
    finance = "finance"
    marketing = "marketing"
    sales = "sales"
    operations = "operations"
    hr = "hr"
    unknown = "unknown"


ENRICHED_FIELDS = ("industry", "company_size", "persona")


class LeadEnrichment(BaseModel):
    """One lead's inferred firmographics. ``evidence`` must quote the record (checked in the DAG,
    which has the record; the model can only check that an inference comes with a quote)."""

    # defer_build: the validator is built on first use (in a task), not while the file is parsed.
    model_config = ConfigDict(extra="forbid", defer_build=True)

    industry: Industry = Field(description="The company's industry, or unknown when the record does not say.")
    company_size: CompanySize = Field(
        description="Employee band: micro 1-10, small 11-50, medium 51-250, large 251-1000, "
        "enterprise over 1000; unknown unless the record states a headcount or equivalent."
    )
    persona: Persona = Field(description="The contact's function from the job title, or unknown.")
    confidence: float = Field(ge=0, le=1, description="How sure you are of all three fields together.")
    evidence: str = Field(
        max_length=200,
        description="A verbatim quote from the record supporting the answer; empty only if all fields are unknown.",
    )

    @model_validator(mode="after")
    def _inference_needs_evidence(self) -> LeadEnrichment:
        known = [f for f in ENRICHED_FIELDS if getattr(self, f).value != "unknown"]
        if known and len(self.evidence.strip()) < 3:
            raise ValueError(f"evidence must quote the record when {', '.join(known)} is inferred")
        return self


SYSTEM_PROMPT = """You enrich B2B CRM leads. For each lead, infer the company's industry, its size \
band and the contact's persona, using ONLY what the record says: the company name, the website \
domain, the job title and the sales rep's notes.

Rules:
- Answer unknown rather than guess. A company name like "Blue Harbor Group" says nothing about \
the industry; a free-mail domain (gmail.com, outlook.com) says nothing at all; "called, no \
answer" is not evidence. Size needs a stated headcount or an equivalent ("a two-person shop", \
"Fortune 500").
- Size bands: micro 1-10 employees, small 11-50, medium 51-250, large 251-1000, enterprise over 1000.
- Persona comes from the job title: executive (CEO, founder, managing director, COO, president), \
engineering (CTO, engineers, IT), finance, marketing, sales, operations, hr. Vague titles \
("Owner" of an unknown company aside, "Consultant", "Team member", "-") are unknown.
- evidence: copy, character for character, the shortest part of the record that supports your \
answer (e.g. "hospital group, radiology department is the buyer"). Never paraphrase, never add \
facts that are not in the record. Leave it empty only when every field is unknown.
- confidence: 0.9+ when every known field is stated outright, 0.5-0.8 when inferred from a \
hint, below 0.5 when you are unsure.
Answer with the JSON object only."""

PROMPT_TEMPLATE = """Company: {company_name}
Website: {website_domain}
Job title: {job_title}
Notes: {notes}"""

FEW_SHOT = [
    {
        "record": {
            "company_name": "Riverside Medical Group",
            "website_domain": "riversidemedicalgroup.com",
            "job_title": "CFO",
            "notes": "hospital group, about 900 staff; wants a demo next week",
        },
        "answer": {
            "industry": "healthcare",
            "company_size": "large",
            "persona": "finance",
            "confidence": 0.92,
            "evidence": "hospital group, about 900 staff",
        },
    },
    {
        "record": {
            "company_name": "Apex Holdings",
            "website_domain": "gmail.com",
            "job_title": "Team member",
            "notes": "called, no answer",
        },
        "answer": {
            "industry": "unknown",
            "company_size": "unknown",
            "persona": "unknown",
            "confidence": 0.9,
            "evidence": "",
        },
    },
]

SELECT_STAGE = """
SELECT l.lead_id, l.company_name, l.website_domain, l.job_title, l.notes
FROM crm_leads AS l JOIN lead_work AS w ON w.lead_id = l.lead_id
WHERE w.run_id = :run_id AND w.stage = :stage
ORDER BY l.lead_id
"""


def _norm(text: str | None) -> str:
    return " ".join((text or "").lower().split())


def evidence_is_quoted(evidence: str | None, record: dict[str, Any]) -> bool:
    """True when ``evidence`` is empty or a (case/whitespace-insensitive) substring of the record.

    This is the invariant that catches invented specifics: a model that "remembers" a headcount
    the record never gave cannot quote it.
    """
    quote = _norm(evidence).strip(" .,;:\"'")
    if not quote:
        return True
    haystack = " | ".join(
        _norm(record.get(c)) for c in ("company_name", "website_domain", "job_title", "notes")
    )
    return quote in haystack


with DAG(
    dag_id="crm_lead_enrichment",
    description="Infer industry, size band and persona for CRM leads: cheap model first, Fable 5 for the hard ones",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 3, 2),
    catchup=False,
    max_active_runs=1,
    params={
        "cheap_model": Param("claude-haiku-4-5", type="string", description="First stage, every lead"),
        "escalation_model": Param(
            "claude-fable-5", type="string", description="Second stage, escalated leads"
        ),
        "pilot": Param(500, type="integer", minimum=1, maximum=100_000, description="Leads per run"),
        "budget_usd": Param(
            25.0, type=["number", "null"], minimum=0, description="Refuse runs estimated above this"
        ),
        "mode": Param("auto", enum=["auto", "interval", "backlog", "failed"], description="Which leads"),
    },
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example", "cascade"],
    doc_md=__doc__,
) as dag:

    @task
    def select_leads(params: dict[str, Any], run_id: str, **context: Any) -> dict[str, Any]:
        """Seed the backlog if empty, pick this run's leads."""
        import sqlalchemy as sa

        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.sinks import ResultSink
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        ex.require_connections(fable=FABLE_CONN_ID, sql=BACKLOG_CONN_ID)
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            ex.seed_table(
                engine,
                "crm_leads",
                "crm_leads",
                key="lead_id",
                columns=(*LEAD_COLUMNS, "pipeline_value_usd"),
                int_columns=("pipeline_value_usd",),
            )
            for table in ("lead_enrichment_stage1", "lead_enrichment_stage2"):
                ResultSink(
                    engine, table=table, id_column="lead_id", output_model=LeadEnrichment
                ).ensure_tables()
            _tables(engine)
            mode, window = ex.run_mode(context, params["mode"])
            # Not enriched yet, and rejected by a stage before (failed) or by neither (otherwise: a
            # rejected lead waits for mode=failed; the ledger would only re-attach its old batch).
            rejected = (
                "(EXISTS (SELECT 1 FROM lead_enrichment_stage1_rejects AS x WHERE x.record_id = l.lead_id) "
                "OR EXISTS (SELECT 1 FROM lead_enrichment_stage2_rejects AS x WHERE x.record_id = l.lead_id))"
            )
            where = "NOT EXISTS (SELECT 1 FROM lead_enrichment AS e WHERE e.lead_id = l.lead_id) AND " + (
                rejected if mode == "failed" else f"NOT {rejected}"
            )
            binds: dict[str, Any] = {"pilot": params["pilot"]}
            if window:
                where += " AND l.created_at >= :start AND l.created_at < :end"
                binds.update(start=window[0], end=window[1])
            with engine.begin() as conn:
                rows = conn.execute(
                    sa.text(
                        f"SELECT l.lead_id FROM crm_leads AS l WHERE {where} ORDER BY l.created_at, l.lead_id LIMIT :pilot"
                    ),
                    binds,
                ).all()
                # Retry-safe: a retried task replaces this run's selection instead of adding to it.
                conn.execute(sa.text("DELETE FROM lead_work WHERE run_id = :r"), {"r": run_id})
                if rows:
                    conn.execute(
                        sa.text(
                            "INSERT INTO lead_work (run_id, lead_id, stage, reason) VALUES (:r, :l, 'cheap', NULL)"
                        ),
                        [{"r": run_id, "l": r[0]} for r in rows],
                    )
        finally:
            engine.dispose()
        window_xcom = {"start": window[0], "end": window[1]} if window else None
        return {"selected": len(rows), "mode": mode, "window": window_xcom}

    submit_cheap = FableBatchSubmitOperator(
        task_id="submit_cheap",
        sql=SELECT_STAGE,
        sql_conn_id=BACKLOG_CONN_ID,
        sql_parameters={"run_id": "{{ run_id }}", "stage": "cheap"},
        id_field="lead_id",
        prompt_template=PROMPT_TEMPLATE,
        system_prompt=SYSTEM_PROMPT,
        few_shot_examples=FEW_SHOT,
        output_model=LeadEnrichment,
        model="{{ params.cheap_model }}",
        max_tokens=MAX_TOKENS,
        max_cost_usd="{{ params.budget_usd }}",  # refuses before the first create when over
        rerun=RERUN,
    )
    wait_cheap = FableBatchSensor(
        task_id="wait_cheap", batch_ids=submit_cheap.output, poll_interval=POLL_SECONDS
    )
    load_cheap = FableValidateLoadOperator(
        task_id="load_cheap",
        batch_ids=wait_cheap.output,
        output_model=LeadEnrichment,
        destination_conn_id=BACKLOG_CONN_ID,
        table="lead_enrichment_stage1",
        id_column="lead_id",
        submit_manifest=submit_cheap.output,
        # Rejects are the cascade's input, not a broken run: plan_escalation sends them to the
        # strong model. A mode=failed rerun is made only of leads rejected before, so "every
        # answer rejected" is its likely outcome and must not stop the escalation (report counts it).
        fail_when_all_rejected=False,
    )

    @task
    def plan_escalation(params: dict[str, Any], run_id: str, ti: Any = None) -> dict[str, Any]:
        """Decide which leads go to the strong model, in priority order, within the budget.

        The budget left is ``params.budget_usd`` minus the cheap stage's actual cost; leads are
        taken in priority order while their (upper-bound) estimate fits, and what is left becomes
        the escalation submit's ``max_cost_usd``, which checks the real estimate before paying.
        """
        import sqlalchemy as sa

        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.manifest import normalise_batch_ids
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        batch_ids = normalise_batch_ids(ti.xcom_pull(task_ids="wait_cheap") or [])
        stage1 = ti.xcom_pull(task_ids="load_cheap") or {}
        if params["mode"] == "failed":
            batch_ids = None  # a lead's accepted cheap answer was not sent again: any batch counts
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            with engine.begin() as conn:
                leads = _run_leads(conn, run_id, "cheap")
                answers = _answers(conn, "lead_enrichment_stage1", list(leads), batch_ids)
                candidates: list[tuple[int, int, str, str]] = []  # (priority, -value, lead_id, reason)
                for lead_id, lead in leads.items():
                    answer = answers.get(lead_id)
                    value = int(lead["pipeline_value_usd"] or 0)
                    if answer is None:
                        candidates.append((0, -value, lead_id, "rejected"))
                    elif not evidence_is_quoted(answer["evidence"], lead):
                        candidates.append((1, -value, lead_id, "evidence_not_in_record"))
                    elif value >= HIGH_VALUE_USD and any(answer[f] == "unknown" for f in ENRICHED_FIELDS):
                        candidates.append((2, -value, lead_id, "unknown_high_value"))
                    elif answer["confidence"] < MIN_CONFIDENCE and any(
                        answer[f] != "unknown" for f in ENRICHED_FIELDS
                    ):
                        # A low-confidence inference is a guess: worth the strong model. A lead the
                        # cheap model left all-unknown has no evidence to find on a low-value account.
                        candidates.append((3, -value, lead_id, "low_confidence"))
                candidates.sort()
                spent = _stage_cost(stage1, params["cheap_model"]) or 0.0
                budget = params["budget_usd"]
                left = None if budget is None else round(max(0.0, budget - spent), 6)
                chosen, over_budget = [], 0
                for _, _, lead_id, reason in candidates:
                    lead = leads[lead_id]
                    _, cost = ex.estimate_cost_usd(
                        [
                            f"{lead['company_name']} {lead['website_domain']} {lead['job_title']} {lead['notes']}"
                        ],
                        model=params["escalation_model"],
                        prompt_chars=len(SYSTEM_PROMPT) + 600,
                        max_output_tokens=MAX_TOKENS,
                    )
                    if budget is not None and cost is not None and spent + cost > budget:
                        over_budget += 1
                        continue
                    spent += cost or 0.0
                    chosen.append({"r": run_id, "l": lead_id, "why": reason})
                conn.execute(
                    sa.text("DELETE FROM lead_work WHERE run_id = :r AND stage = 'escalated'"), {"r": run_id}
                )
                if chosen:
                    conn.execute(
                        sa.text(
                            "INSERT INTO lead_work (run_id, lead_id, stage, reason) VALUES (:r, :l, 'escalated', :why)"
                        ),
                        chosen,
                    )
        finally:
            engine.dispose()
        by_reason: dict[str, int] = {}
        for row in chosen:
            by_reason[row["why"]] = by_reason.get(row["why"], 0) + 1
        return {
            "escalated": len(chosen),
            "by_reason": by_reason,
            "not_escalated_over_budget": over_budget,
            "budget_left_usd": left,
        }

    submit_escalated = FableBatchSubmitOperator(
        task_id="submit_escalated",
        sql=SELECT_STAGE,
        sql_conn_id=BACKLOG_CONN_ID,
        sql_parameters={"run_id": "{{ run_id }}", "stage": "escalated"},
        id_field="lead_id",
        prompt_template=PROMPT_TEMPLATE,
        system_prompt=SYSTEM_PROMPT,
        few_shot_examples=FEW_SHOT,
        output_model=LeadEnrichment,
        model="{{ params.escalation_model }}",
        max_tokens=MAX_TOKENS,
        # What the cheap stage left of params.budget_usd ("None" when there is no budget).
        max_cost_usd="{{ ti.xcom_pull(task_ids='plan_escalation')['budget_left_usd'] }}",
        rerun=RERUN,
    )
    wait_escalated = FableBatchSensor(
        task_id="wait_escalated", batch_ids=submit_escalated.output, poll_interval=POLL_SECONDS
    )
    load_escalated = FableValidateLoadOperator(
        task_id="load_escalated",
        batch_ids=wait_escalated.output,
        output_model=LeadEnrichment,
        destination_conn_id=BACKLOG_CONN_ID,
        table="lead_enrichment_stage2",
        id_column="lead_id",
        submit_manifest=submit_escalated.output,
        # A lead the strong model failed keeps its valid cheap answer or is reported unresolved
        # by `report`, which must run for that (and to write the rows of every other lead).
        fail_when_all_rejected=False,
    )

    def finalize(params: dict[str, Any], run_id: str, ti: Any) -> dict[str, int]:
        """One row per lead: the escalated answer when it is valid, else the cheap one when valid.

        A lead with no valid answer from either stage gets no row, so the next run takes it again.
        Part of ``report`` (one task fewer to parse; it is quick and idempotent, so a retry of
        ``report`` simply writes the same rows again).
        """
        from datetime import timezone

        import sqlalchemy as sa

        from airflow_provider_fable.core.manifest import normalise_batch_ids
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        ids1: list[str] | None = normalise_batch_ids(ti.xcom_pull(task_ids="wait_cheap") or [])
        ids2: list[str] | None = normalise_batch_ids(ti.xcom_pull(task_ids="wait_escalated") or [])
        if params["mode"] == "failed":
            ids1 = ids2 = None  # answers accepted before were not sent again: any batch counts
        now = datetime.now(timezone.utc).isoformat()
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        counts = {"cheap": 0, "escalated": 0, "kept_cheap_after_failed_escalation": 0, "unresolved": 0}
        try:
            with engine.begin() as conn:
                leads = _run_leads(conn, run_id, "cheap")
                escalated = {
                    r.lead_id: r.reason
                    for r in conn.execute(
                        sa.text(
                            "SELECT lead_id, reason FROM lead_work WHERE run_id = :r AND stage = 'escalated'"
                        ),
                        {"r": run_id},
                    )
                }
                first = _answers(conn, "lead_enrichment_stage1", list(leads), ids1)
                second = _answers(conn, "lead_enrichment_stage2", list(escalated), ids2)
                rows = []
                for lead_id, lead in leads.items():
                    a2 = second.get(lead_id)
                    a1 = first.get(lead_id)
                    if a2 is not None and evidence_is_quoted(a2["evidence"], lead):
                        answer, stage = a2, "escalated"
                    elif a1 is not None and evidence_is_quoted(a1["evidence"], lead):
                        answer, stage = a1, "cheap"
                        if lead_id in escalated:
                            counts["kept_cheap_after_failed_escalation"] += 1
                    else:
                        counts["unresolved"] += 1
                        continue
                    counts[stage] += 1
                    rows.append(
                        {
                            "lead_id": lead_id,
                            **{f: answer[f] for f in (*ENRICHED_FIELDS, "confidence", "evidence")},
                            "stage": stage,
                            "model": answer["_model"],
                            "escalation_reason": escalated.get(lead_id),
                            "run_id": run_id,
                            "enriched_at": now,
                        }
                    )
                if rows:
                    table = _tables(engine)["lead_enrichment"]
                    conn.execute(table.delete().where(table.c.lead_id.in_([r["lead_id"] for r in rows])))
                    conn.execute(table.insert(), rows)
        finally:
            engine.dispose()
        return counts

    @task(outlets=[LEAD_ENRICHMENT])
    def report(params: dict[str, Any], run_id: str, ti: Any = None) -> dict[str, Any]:
        """Write the final rows (``finalize``), then report escalations, the cost of each stage
        versus all-on-Fable-5 and per-field accuracy."""
        import sqlalchemy as sa

        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.cost import usage_cost_usd
        from airflow_provider_fable.core.results import Usage
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        stage1 = ti.xcom_pull(task_ids="load_cheap") or {}
        stage2 = ti.xcom_pull(task_ids="load_escalated") or {}
        plan = ti.xcom_pull(task_ids="plan_escalation") or {}
        final = finalize(params, run_id, ti)
        prices = ex.example_prices()
        cost1 = _stage_cost(stage1, params["cheap_model"])
        cost2 = _stage_cost(stage2, params["escalation_model"])
        all_strong = usage_cost_usd(
            Usage(**stage1.get("usage", {})), params["escalation_model"], prices=prices
        )
        labels = {r["lead_id"]: r for r in ex.iter_dataset("crm_leads_labels")}
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            with engine.connect() as conn:
                rows = (
                    conn.execute(
                        sa.text(
                            f"SELECT lead_id, {', '.join(ENRICHED_FIELDS)} FROM lead_enrichment WHERE run_id = :r"
                        ),
                        {"r": run_id},
                    )
                    .mappings()
                    .all()
                )
        finally:
            engine.dispose()
        labelled = [r for r in rows if r["lead_id"] in labels]
        accuracy = {
            f: (
                round(sum(r[f] == labels[r["lead_id"]][f] for r in labelled) / len(labelled), 3)
                if labelled
                else None
            )
            for f in ENRICHED_FIELDS
        }
        cascade = None if cost1 is None or cost2 is None else round(cost1 + cost2, 6)
        summary = {
            "leads": stage1.get("records", 0),
            "stage1": {"model": params["cheap_model"], "accepted": stage1.get("accepted", 0),
                       "rejected": stage1.get("rejected", 0), "cost_usd": cost1},
            "escalated": plan.get("escalated", 0),
            "escalated_by_reason": plan.get("by_reason", {}),
            "not_escalated_over_budget": plan.get("not_escalated_over_budget", 0),
            "stage2": {"model": params["escalation_model"], "accepted": stage2.get("accepted", 0),
                       "rejected": stage2.get("rejected", 0), "cost_usd": cost2},
            "cascade_cost_usd": cascade,
            "all_on_escalation_model_usd": all_strong,
            "final": final,
            "labelled_leads": len(labelled),
            "accuracy": accuracy,
        }  # fmt: skip
        if cascade is not None and all_strong:
            summary["cascade_vs_all_strong"] = round(cascade / all_strong, 3)
        return summary

    selected = select_leads()
    plan = plan_escalation()
    selected >> submit_cheap >> wait_cheap >> load_cheap >> plan >> submit_escalated
    submit_escalated >> wait_escalated >> load_escalated >> report()


def _tables(engine: Any) -> dict[str, Any]:
    """The DAG's own tables: this run's work list and the final enrichment (created if missing)."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    sa.Table(
        "lead_work",
        meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("lead_id", sa.Text, primary_key=True),
        sa.Column("stage", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text),
    )
    sa.Table(
        "lead_enrichment",
        meta,
        sa.Column("lead_id", sa.Text, primary_key=True),
        *(sa.Column(f, sa.Text) for f in ENRICHED_FIELDS),
        sa.Column("confidence", sa.Float),
        sa.Column("evidence", sa.Text),
        sa.Column("stage", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("escalation_reason", sa.Text),
        sa.Column("run_id", sa.Text),
        sa.Column("enriched_at", sa.Text),
    )
    meta.create_all(engine)
    return meta.tables


def _run_leads(conn: Any, run_id: str, stage: str) -> dict[str, dict[str, Any]]:
    import sqlalchemy as sa

    rows = conn.execute(
        sa.text(
            "SELECT l.* FROM crm_leads AS l JOIN lead_work AS w ON w.lead_id = l.lead_id "
            "WHERE w.run_id = :r AND w.stage = :s ORDER BY l.lead_id"
        ),
        {"r": run_id, "s": stage},
    ).mappings()
    return {r["lead_id"]: dict(r) for r in rows}


def _answers(
    conn: Any, table: str, lead_ids: list[str], batch_ids: list[str] | None
) -> dict[str, dict[str, Any]]:
    """Accepted answers of these leads loaded from this run's batches (older answers do not
    count), or from any batch when ``batch_ids`` is None (``mode=failed``: an answer accepted
    before was deliberately not sent again)."""
    import sqlalchemy as sa

    if not lead_ids or batch_ids == []:
        return {}
    sql = f"SELECT * FROM {table} WHERE lead_id IN :ids"
    binds: dict[str, Any] = {}
    params = [sa.bindparam("ids", expanding=True)]
    if batch_ids is not None:
        sql += " AND _batch_id IN :batches"
        params.append(sa.bindparam("batches", expanding=True))
        binds["batches"] = batch_ids
    stmt = sa.text(sql).bindparams(*params)
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(lead_ids), 500):
        for row in conn.execute(stmt, {**binds, "ids": lead_ids[start : start + 500]}).mappings():
            out[row["lead_id"]] = dict(row)
    return out


def _stage_cost(load_summary: dict[str, Any], model: str | None = None) -> float | None:
    """A stage's cost from its load summary's token usage (priced with the examples' table)."""
    from airflow_provider_fable import example_data as ex
    from airflow_provider_fable.core.cost import usage_cost_usd
    from airflow_provider_fable.core.results import Usage

    usage = Usage(**load_summary.get("usage", {}))
    if not usage.input_tokens and not usage.output_tokens:
        return 0.0
    return usage_cost_usd(usage, model or "claude-haiku-4-5", prices=ex.example_prices())

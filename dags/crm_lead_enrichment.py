"""CRM lead enrichment with a model cascade: a cheap model first, Fable 5 only where it matters.

Every selected lead goes to ``claude-haiku-4-5``; it escalates to ``claude-fable-5`` (rules in
priority order, higher ``pipeline_value_usd`` first, within the budget) when the cheap answer was
rejected, quotes ``evidence`` the record lacks, says ``unknown`` on a high-value account, or
guesses. The backlog unit (docs/backlog.md) writes one row per lead into ``lead_enrichment`` with
stage, model and escalation reason; ``report`` compares the cost with all-on-Fable-5 and checks
accuracy on labelled leads. Prompts: the files beside this one.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from airflow.sdk import DAG, Asset, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1: the timetable is airflow-core's
    from airflow.timetables.interval import CronDataIntervalTimetable
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow_provider_fable.backlog import Backlog, Destination, Escalate, Prompt, Source, Stage
from airflow_provider_fable.backlog.config import is_quoted

BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
LEAD_ENRICHMENT = Asset(name="lead_enrichment", uri="x-fable://backlog/lead_enrichment")
RECORD_FIELDS = ("company_name", "website_domain", "job_title", "notes")
ENRICHED_FIELDS = ("industry", "company_size", "persona")
MIN_CONFIDENCE, HIGH_VALUE_USD = 0.5, 50_000  # a guess below this confidence; a high-value account


def _labels(name: str, values: str) -> Any:
    return Enum(name, [(v, v) for v in values.split()], type=str)  # a str Enum, values = names


Industry = _labels(
    "Industry",
    "software financial_services healthcare manufacturing retail education logistics professional_services unknown",
)
# micro 1-10 employees, small 11-50, medium 51-250, large 251-1000, enterprise over 1000
CompanySize = _labels("CompanySize", "micro small medium large enterprise unknown")
Persona = _labels("Persona", "executive engineering finance marketing sales operations hr unknown")


class LeadEnrichment(BaseModel):
    """One lead's inferred firmographics. ``evidence`` must quote the record (checked by the
    escalation rule, which has the record; the model can only check that an inference has one)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # validators built in the task

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


def evidence_is_quoted(evidence: str | None, record: dict[str, Any]) -> bool:  # an invented quote?
    return is_quoted(evidence, record, RECORD_FIELDS)


def unknown_on_high_value(answer: dict[str, Any], lead: dict[str, Any]) -> bool:
    value = float(lead.get("pipeline_value_usd") or 0)
    return value >= HIGH_VALUE_USD and any(answer.get(f) == "unknown" for f in ENRICHED_FIELDS)


def guessed(answer: dict[str, Any], lead: dict[str, Any]) -> bool:
    inferred = any(answer.get(f) != "unknown" for f in ENRICHED_FIELDS)
    return inferred and float(answer.get("confidence") or 0) < MIN_CONFIDENCE


with DAG(
    dag_id="crm_lead_enrichment",
    description="Infer industry, size band and persona for CRM leads: cheap model first, Fable 5 for the hard ones",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 3, 2),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example", "cascade"],
    doc_md=__doc__,
) as dag:

    @task
    def seed() -> int:
        """Check the connections; load the bundled export into ``crm_leads`` when it is empty."""
        from airflow_provider_fable import example_data as ex

        return ex.seed_backlog("crm_leads", sql_conn_id=BACKLOG_CONN_ID)

    leads = Backlog(
        "leads",
        source=Source(
            sql="SELECT lead_id, created_at, company_name, website_domain, job_title, notes, pipeline_value_usd FROM crm_leads",
            conn_id=BACKLOG_CONN_ID,
            id_field="lead_id",
            date_field="created_at",
        ),
        prompt=Prompt(
            template="crm_lead_enrichment.md",
            system="crm_lead_enrichment_system.md",
            few_shot="crm_lead_enrichment_examples.jsonl",
        ),
        output_model=LeadEnrichment,
        stages=[
            Stage(
                "claude-haiku-4-5",
                max_tokens=300,
                escalate=[  # in priority order
                    Escalate.rejected(),
                    Escalate.not_quoted("evidence", in_fields=RECORD_FIELDS, name="evidence_not_in_record"),
                    Escalate.when(unknown_on_high_value, name="unknown_high_value", keep_answer=True),
                    Escalate.when(guessed, name="low_confidence", keep_answer=True),
                ],
                priority_field="pipeline_value_usd",
            ),
            Stage("claude-fable-5", max_tokens=300),
        ],
        destination=Destination(conn_id=BACKLOG_CONN_ID, table="lead_enrichment"),
        limit=500,
        budget_usd=25.0,
        poll_interval=POLL_SECONDS,
    )
    dag.get_task(leads.task_id("finalize")).outlets = [LEAD_ENRICHMENT]

    @task
    def report(ti: Any = None) -> dict[str, Any]:
        """Escalations, cost per stage against all leads on Fable 5, accuracy on labelled leads."""
        from airflow_provider_fable import example_data as ex

        return ex.backlog_report(
            ti, leads, conn_id=BACKLOG_CONN_ID, dataset="crm_leads_labels",
            fields={f: f for f in ENRICHED_FIELDS}, compare_model="claude-fable-5",
        )  # fmt: skip

    seed() >> leads.group >> report()

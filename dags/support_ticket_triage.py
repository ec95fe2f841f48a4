"""Support ticket triage: label support tickets through Message Batches, exactly once per ticket.

Each ticket gets a category (the owning team), a priority, an escalation flag and a one-line
summary, validated against ``TicketTriage`` (including its invariant: escalation needs priority
high or urgent). The prompt, system prompt and few-shot examples are the files beside this one
(``support_ticket_triage.md``, ``support_ticket_triage_system.md``,
``support_ticket_triage_examples.jsonl``).

Everything else is the backlog unit's (docs/backlog.md): which tickets a run takes (``params.mode``:
scheduled runs and backfills take the tickets created in their day, so
``airflow backfill create --dag-id support_ticket_triage --from-date ... --to-date ...``
processes each day once; manual runs take the next ``params.limit`` tickets never processed;
``failed`` resends the rejected ones), the optional pilot (``params.pilot``) and approval, the
budget (``params.budget_usd``), exactly-once submission through the job ledger (every task has
``retries=2``; a retried submit re-attaches to its batches), the final table ``ticket_triage``
(one row per ticket, with the stage, model and batch), ``ticket_triage_rejects`` with each
ticket's last reason, a QA sample and the guardrails below.

Connections: ``fable_default`` (the API or the emulator) and ``fable_backlog_db`` (any SQL
connection holding ``support_tickets``; ``seed`` loads the bundled synthetic tickets into it when
the table is empty and fails naming a missing connection and how to create it). The top of this
file imports only Airflow, pydantic and the unit's config objects: parsing stays fast.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from enum import Enum

from airflow.sdk import DAG, Asset, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1: the timetable is airflow-core's
    from airflow.timetables.interval import CronDataIntervalTimetable
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow_provider_fable.backlog import Backlog, Destination, Guardrails, Prompt, Source, Stage

BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
TICKET_TRIAGE = Asset(name="ticket_triage", uri="x-fable://backlog/ticket_triage")


class Category(str, Enum):
    billing = "billing"
    account_access = "account_access"
    bug = "bug"
    feature_request = "feature_request"
    shipping = "shipping"


class Priority(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"
    urgent = "urgent"


class TicketTriage(BaseModel):
    """The answer for one ticket. The invariant below is checked on every answer at load time."""

    # defer_build: the validator is built on first use (in a task), not while the file is parsed.
    model_config = ConfigDict(extra="forbid", defer_build=True)

    category: Category = Field(description="The single team that should own the ticket.")
    priority: Priority = Field(description="How fast the customer needs an answer.")
    escalate: bool = Field(description="True when a lead must look today (legal, churn, data loss, outage).")
    summary: str = Field(min_length=3, max_length=200, description="One sentence, no customer PII.")

    @model_validator(mode="after")
    def _escalation_needs_priority(self) -> TicketTriage:
        if self.escalate and self.priority not in (Priority.high, Priority.urgent):
            raise ValueError("escalate=true requires priority high or urgent")
        return self


with DAG(
    dag_id="support_ticket_triage",
    description="Label unlabelled support tickets (category, priority, escalation) via Message Batches",
    # Real daily data intervals (midnight to midnight UTC). Airflow 3's plain "@daily" is a
    # trigger timetable whose runs have a zero-length interval, which would select nothing.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example"],
    doc_md=__doc__,
) as dag:

    @task
    def seed() -> int:
        """Check the connections; load the bundled tickets into ``support_tickets`` when it is empty."""
        from airflow_provider_fable import example_data as ex

        return ex.seed_backlog("support_tickets", sql_conn_id=BACKLOG_CONN_ID)

    triage = Backlog(
        "tickets",
        source=Source(
            sql="SELECT ticket_id, created_at, channel, customer_tier, subject, body FROM support_tickets",
            conn_id=BACKLOG_CONN_ID,
            id_field="ticket_id",
            date_field="created_at",
        ),
        prompt=Prompt(
            template="support_ticket_triage.md",
            system="support_ticket_triage_system.md",
            few_shot="support_ticket_triage_examples.jsonl",
        ),
        output_model=TicketTriage,
        stages=[Stage("claude-fable-5", max_tokens=400)],
        destination=Destination(conn_id=BACKLOG_CONN_ID, table="ticket_triage"),
        # Half the answers rejected: the prompt or schema is wrong, stop. Half urgent: suspicious.
        guardrails=Guardrails(max_reject_rate=0.5, max_share={"priority": {"urgent": 0.5}}),
        limit=2000,
        pilot=100,  # manual backlog runs: 100 sampled tickets first; their cost projects the rest
        poll_interval=POLL_SECONDS,
    )
    dag.get_task(triage.task_id("finalize")).outlets = [TICKET_TRIAGE]
    seed() >> triage.group

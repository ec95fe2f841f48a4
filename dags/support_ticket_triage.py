"""Support ticket triage: label support tickets through Message Batches, exactly once per ticket.

Which tickets a run takes (``params.mode``):

- ``interval``: tickets created within the run's data interval (``data_interval_start`` <=
  ``created_at`` < ``data_interval_end``). Scheduled and backfill runs use it by default, so
  ``airflow backfill create --dag-id support_ticket_triage --from-date ... --to-date ...``
  processes each day once; re-running a day re-attaches to its batch (nothing new is paid).
- ``backlog``: the next ``params.limit`` tickets never processed (no triage row, no reject row).
  Runs triggered from the CLI or the UI are manual runs: they may have no logical date or data
  interval at all, so by default they take the backlog instead of failing on an undefined date.
- ``failed``: the tickets the job ledger holds as rejected, sent again (``rerun="failed"``).
- ``auto`` (default): ``interval`` for scheduled/backfill runs, ``backlog`` otherwise.

Each ticket is submitted once per job (see docs/ledger.md): every task has ``retries=2``; a retried
or cleared submit re-attaches to the batches it already created. The answers are validated against
``TicketTriage``; accepted rows go to ``ticket_triage``, rejects to ``ticket_triage_rejects``.

Connections: ``fable_default`` (the API or the emulator) and ``fable_backlog_db`` (any SQL
connection holding ``support_tickets``; the ``seed_tickets`` task loads the synthetic dataset
bundled with the provider into it when the table is empty, and fails naming any missing
connection and how to create it). The top of this file imports only Airflow and
pydantic: the SDK, pandas and SQL work happen inside tasks, so parsing stays fast.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from enum import Enum

from airflow.sdk import DAG, Param, task
from airflow.sdk.definitions.timetables.interval import CronDataIntervalTimetable
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.sensors.batch import FableBatchSensor

BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))


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


SYSTEM_PROMPT = """You triage customer support tickets for an online store that sells hardware \
and a companion subscription app. For every ticket, return the owning team (category), the \
priority, whether a team lead must be pulled in today (escalate), and a one-sentence summary.

Categories:
- billing: charges, invoices, refunds, receipts, VAT, plan prices, failed or duplicate payments, \
subscription renewals and cancellations that are about money.
- account_access: logging in, passwords, two-factor codes, SSO, locked or suspended accounts, \
changing the account email. A customer who cannot log in to update a card is account_access: \
the blocker is the login, not the payment.
- bug: something that used to work or should work is broken: errors, crashes, wrong numbers, \
buttons that do nothing, sync failures. A 2FA code that never arrives is account_access, not bug.
- feature_request: asks for something the product does not do yet, including "is this a bug?" \
questions about behaviour that works as designed (e.g. exports without custom fields).
- shipping: delivery of physical orders: tracking, delays, damaged or missing parcels, address \
changes, customs. A shipping fee complaint about a late parcel is shipping.

Priority:
- urgent: the customer's business is stopped, data is being lost, security is at risk, or a \
legal/chargeback threat is explicit.
- high: a paying customer is blocked on an important task, or a deadline within days is named.
- medium: a real problem with a workaround, or a question that needs an answer this week.
- low: cosmetic issues, ideas, "no rush" questions.

Escalate only for legal threats, chargebacks, data loss, outages affecting many users, or an \
enterprise customer threatening to leave. Escalation always needs priority high or urgent.

Reading the ticket: judge the newest message only; ignore greetings, signatures, "Sent from my \
iPhone" lines and quoted earlier replies. When a ticket mixes topics, pick the team that has to \
act first. Customer tier alone never raises priority, and a web-form topic chosen by the \
customer is a hint, not the answer: customers often pick the wrong one. Mixed-language tickets \
are triaged like any other.

The summary is one plain sentence under 200 characters, without names, emails, phone numbers \
or order numbers. Answer with the JSON object only."""

PROMPT_TEMPLATE = """Ticket {ticket_id} via {channel} (customer tier: {customer_tier})
Subject: {subject}

{body}"""

FEW_SHOT = [
    {
        "record": {
            "ticket_id": "EXAMPLE-1",
            "channel": "email",
            "customer_tier": "pro",
            "subject": "Can't get in to update my card",
            "body": "My card expired so I wanted to update it, but the login page keeps saying my "
            "password is wrong even after a reset. Renewal is next week.",
        },
        "answer": {
            "category": "account_access",
            "priority": "high",
            "escalate": False,
            "summary": "Customer cannot log in after a password reset and needs to update an expiring card.",
        },
    },
    {
        "record": {
            "ticket_id": "EXAMPLE-2",
            "channel": "chat",
            "customer_tier": "enterprise",
            "subject": "Charged twice - disputing with bank",
            "body": "We were invoiced twice for the annual plan. If this is not refunded by Friday "
            "our finance team will file a chargeback.",
        },
        "answer": {
            "category": "billing",
            "priority": "urgent",
            "escalate": True,
            "summary": "Enterprise customer was invoiced twice for the annual plan and threatens a chargeback.",
        },
    },
    {
        "record": {
            "ticket_id": "EXAMPLE-3",
            "channel": "web_form",
            "customer_tier": "free",
            "subject": "Export is missing my custom fields - bug?",
            "body": "When I export contacts to CSV the custom fields I added are not in the file. "
            "Is that a bug? It would be great if the export could include them. No rush.",
        },
        "answer": {
            "category": "feature_request",
            "priority": "low",
            "escalate": False,
            "summary": "Customer asks for CSV exports to include custom fields, which they do not today.",
        },
    },
    {
        "record": {
            "ticket_id": "EXAMPLE-4",
            "channel": "phone_transcript",
            "customer_tier": "pro",
            "subject": "App crashes when opening reports",
            "body": "Since yesterday's update the app crashes every time I open the reports tab on "
            "my Android phone. I reinstalled it twice. I need the weekly report for a meeting on Monday.",
        },
        "answer": {
            "category": "bug",
            "priority": "high",
            "escalate": False,
            "summary": "App crashes on opening the reports tab on Android since the latest update.",
        },
    },
    {
        "record": {
            "ticket_id": "EXAMPLE-5",
            "channel": "email",
            "customer_tier": "free",
            "subject": "Where is my parcel?",
            "body": "My order was marked as shipped ten days ago but the tracking page has not "
            "changed since. Can you check with the courier?",
        },
        "answer": {
            "category": "shipping",
            "priority": "medium",
            "escalate": False,
            "summary": "Parcel marked as shipped ten days ago shows no tracking updates since.",
        },
    },
]


def require_interval(start: object) -> str:
    """Template macro: a clear error when ``mode=interval`` meets a run without a data interval."""
    if start is None:
        raise ValueError(
            "params.mode='interval' needs a run with a data interval (a scheduled or backfill run, "
            "or one triggered with a logical date); use mode='backlog' for runs without one"
        )
    return ""


#: ``auto`` resolves to ``interval`` for scheduled and backfill runs (they have a data interval),
#: ``backlog`` for manual runs (from the CLI or UI they may have none).
MODE = (
    "{% set mode = params.mode %}{% if mode == 'auto' %}{% set mode = 'interval' "
    "if (dag_run.run_type in ('scheduled', 'backfill') and data_interval_start) else 'backlog' %}"
    "{% endif %}"
)

SELECT_TICKETS = (
    MODE
    + """
SELECT t.ticket_id, t.channel, t.customer_tier, t.subject, t.body
FROM support_tickets AS t
{% if mode == 'interval' %}
{{ require_interval(data_interval_start) }}
WHERE t.created_at >= '{{ data_interval_start.strftime('%Y-%m-%dT%H:%M:%SZ') }}'
  AND t.created_at < '{{ data_interval_end.strftime('%Y-%m-%dT%H:%M:%SZ') }}'
{% elif mode == 'failed' %}
WHERE EXISTS (SELECT 1 FROM ticket_triage_rejects AS x WHERE x.record_id = t.ticket_id)
  AND NOT EXISTS (SELECT 1 FROM ticket_triage AS r WHERE r.ticket_id = t.ticket_id)
{% else %}
WHERE NOT EXISTS (SELECT 1 FROM ticket_triage AS r WHERE r.ticket_id = t.ticket_id)
  AND NOT EXISTS (SELECT 1 FROM ticket_triage_rejects AS x WHERE x.record_id = t.ticket_id)
{% endif %}
ORDER BY t.ticket_id
LIMIT {{ params.limit | int }}
"""
)

with DAG(
    dag_id="support_ticket_triage",
    description="Label unlabelled support tickets (category, priority, escalation) via Message Batches",
    # Real daily data intervals (midnight to midnight UTC). Airflow 3's plain "@daily" is a
    # trigger timetable whose runs have a zero-length interval, which would select nothing.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "limit": Param(2000, type="integer", minimum=1, maximum=100_000),
        # Pilot first: `airflow dags trigger support_ticket_triage -c '{"pilot": 200}'` submits a
        # seeded sample of 200 of the selected tickets; the next full run estimates its output
        # tokens from that pilot's measured answers.
        "pilot": Param(
            0, type="integer", minimum=0, description="0 = full run; N = pilot of N sampled tickets"
        ),
        "model": Param("claude-fable-5", type="string", description="Model every request is sent to"),
        "max_cost_usd": Param(
            None,
            type=["null", "number"],
            description="Fail before submitting when the estimate is above this",
        ),
        "mode": Param("auto", enum=["auto", "interval", "backlog", "failed"]),
    },
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    user_defined_macros={"require_interval": require_interval},
    tags=["fable", "backlog", "example"],
    doc_md=__doc__,
) as dag:

    @task
    def seed_tickets() -> int:
        """Create the backlog and result tables; load the bundled tickets when the backlog is empty."""
        import sqlalchemy as sa

        from airflow_provider_fable.core.sinks import ResultSink
        from airflow_provider_fable.example_data import iter_dataset, require_connections
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        require_connections(fable="fable_default", sql=BACKLOG_CONN_ID)
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        ResultSink(
            engine, table="ticket_triage", id_column="ticket_id", output_model=TicketTriage
        ).ensure_tables()
        meta = sa.MetaData()
        cols = ["ticket_id", "created_at", "channel", "customer_tier", "subject", "body"]
        tickets = sa.Table(
            "support_tickets",
            meta,
            sa.Column("ticket_id", sa.Text, primary_key=True),
            *(sa.Column(c, sa.Text) for c in cols[1:]),
        )
        meta.create_all(engine)
        with engine.begin() as conn:
            existing = conn.execute(sa.select(sa.func.count()).select_from(tickets)).scalar_one()
            if existing:
                return existing
            rows = [{c: row[c] for c in cols} for row in iter_dataset("support_tickets")]
            conn.execute(tickets.insert(), rows)
            return len(rows)

    submit = FableBatchSubmitOperator(
        task_id="submit",
        sql=SELECT_TICKETS,
        sql_conn_id=BACKLOG_CONN_ID,
        id_field="ticket_id",
        prompt_template=PROMPT_TEMPLATE,
        system_prompt=SYSTEM_PROMPT,
        few_shot_examples=FEW_SHOT,
        output_model=TicketTriage,
        max_tokens=400,
        model="{{ params.model }}",
        sample="{{ params.pilot }}",
        max_cost_usd="{{ params.max_cost_usd }}",
        # mode=failed: only tickets the ledger holds as rejected by this job are sent again.
        rerun="{{ 'failed' if params.mode == 'failed' else '' }}",
    )

    wait = FableBatchSensor(task_id="wait", batch_ids=submit.output, poll_interval=POLL_SECONDS)

    load = FableValidateLoadOperator(
        task_id="load",
        batch_ids=wait.output,
        output_model=TicketTriage,
        destination_conn_id=BACKLOG_CONN_ID,
        table="ticket_triage",
        id_column="ticket_id",
        submit_manifest=submit.output,  # estimate vs actual cost, input excerpts for the QA table
        max_reject_rate=0.5,  # half the answers rejected: the prompt or schema is wrong, stop
        max_share={"priority": {"urgent": 0.5}},
    )

    seed_tickets() >> submit >> wait >> load

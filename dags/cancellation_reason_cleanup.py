"""Free-text cleanup with confidence: map a messy ``reason_for_cancellation`` column to a taxonomy.

What customers typed into a cancel form (typos, five languages, sarcasm, "n/a", one complaint in
twenty spellings) becomes a label of ``ReasonLabel`` (described to the model in the system prompt
file beside this one) with a confidence; ``other`` needs a justification (an invariant, so a lazy
``other`` is a reject with a reason). The backlog unit (docs/backlog.md) selects, sends, validates
and writes ``cancellation_reasons_clean``; then two checks look at the answers *together*:
``other`` over ``params.max_other_share`` of the run's rows fails the run after loading (the
taxonomy no longer fits the data), and texts that normalise alike but got different labels go to
``cancellation_reason_review`` (rebuilt even then) for a human to settle.
"""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from airflow.sdk import DAG, Asset, Param, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1: the timetable is airflow-core's
    from airflow.timetables.interval import CronDataIntervalTimetable
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow_provider_fable.backlog import Backlog, Destination, Prompt, Source, Stage

BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
CLEAN_TABLE, REVIEW_TABLE = "cancellation_reasons_clean", "cancellation_reason_review"
CLEAN_ASSET = Asset(name=CLEAN_TABLE, uri=f"x-fable://backlog/{CLEAN_TABLE}")
REVIEW_ASSET = Asset(name=REVIEW_TABLE, uri=f"x-fable://backlog/{REVIEW_TABLE}")


#: The canonical taxonomy (its meanings are in the system prompt file: change both together).
ReasonLabel = Enum(
    "ReasonLabel",
    [(v, v) for v in "too_expensive missing_features switched_to_competitor poor_support technical_issues "
     "no_longer_needed business_closed temporary_pause billing_problems not_stated other".split()],
    type=str,
)  # fmt: skip


class CancellationReason(BaseModel):
    """One row's label. ``other`` must say why nothing else fits (checked on every answer)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # validators built in the task

    label: ReasonLabel
    confidence: float = Field(ge=0, le=1, description="How sure you are of the label.")
    justification: str | None = Field(
        default=None, max_length=200, description="Required for other: why no canonical label fits."
    )

    @model_validator(mode="after")
    def _other_needs_justification(self) -> CancellationReason:
        if self.label is ReasonLabel.other and len((self.justification or "").strip()) < 10:
            raise ValueError("label 'other' requires a justification of at least 10 characters")
        return self


def normalise(text: str | None) -> str:
    """The key two rows must share to count as "the same answer": case, accents, punctuation and
    spacing removed (``"  Too expensive!!"`` == ``"too expensive"``; ``"zu teuer"`` stays itself)."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


with DAG(
    dag_id="cancellation_reason_cleanup",
    description="Map messy cancellation reasons to a canonical taxonomy with confidence; flag inconsistent mappings",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 2, 2),
    catchup=False,
    max_active_runs=1,
    params={
        "max_other_share": Param(0.15, type="number", minimum=0, maximum=1, description="Cap on 'other'")
    },
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example", "cleanup"],
    doc_md=__doc__,
) as dag:

    @task
    def seed() -> int:
        """Check the connections; load the bundled rows into ``cancellations`` when it is empty."""
        from airflow_provider_fable import example_data as ex

        return ex.seed_backlog("cancellation_reasons", sql_conn_id=BACKLOG_CONN_ID)

    clean = Backlog(
        "reasons",
        source=Source(
            sql="SELECT cancellation_id, created_at, plan, tenure_months, reason_for_cancellation FROM cancellations",
            conn_id=BACKLOG_CONN_ID,
            id_field="cancellation_id",
            date_field="created_at",
        ),
        prompt=Prompt(
            template="cancellation_reason_cleanup.md",
            system="cancellation_reason_cleanup_system.md",
            few_shot="cancellation_reason_cleanup_examples.jsonl",
        ),
        output_model=CancellationReason,
        stages=[Stage("claude-fable-5", max_tokens=200)],
        destination=Destination(conn_id=BACKLOG_CONN_ID, table=CLEAN_TABLE),
        limit=2000,
        budget_usd=25.0,
        poll_interval=POLL_SECONDS,
    )
    dag.get_task(clean.task_id("finalize")).outlets = [CLEAN_ASSET]

    @task
    def other_share(params: dict[str, Any], ti: Any = None) -> dict[str, Any]:
        """The distribution guardrail: fails the run when 'other' is over ``params.max_other_share``."""
        from airflow_provider_fable import example_data as ex

        summary = ti.xcom_pull(task_ids=clean.task_id("finalize"))
        return ex.check_share(summary, "label", "other", params["max_other_share"])

    # all_done: rebuilt even when the guardrail failed (an 'other' flood is when a reviewer wants it).
    @task(outlets=[REVIEW_ASSET], trigger_rule="all_done")
    def flag_inconsistent(run_id: str) -> dict[str, Any]:
        """Rebuild the review table: every normalised text (of all labelled rows) with >1 label."""
        from airflow_provider_fable import example_data as ex

        return ex.rebuild_review_table(
            BACKLOG_CONN_ID, final_table=CLEAN_TABLE, id_column="cancellation_id", label_column="label",
            source_table="cancellations", text_column="reason_for_cancellation", review_table=REVIEW_TABLE,
            normalise=normalise, run_id=run_id,
        )  # fmt: skip

    @task
    def report(ti: Any = None) -> dict[str, Any]:
        """Label distribution, agreement with the dataset's hidden labels, inconsistencies, cost."""
        from airflow_provider_fable import example_data as ex

        out = ex.backlog_report(
            ti, clean, conn_id=BACKLOG_CONN_ID, dataset="cancellation_reasons", fields={"label": "expected_reason"}
        )  # fmt: skip
        review = ti.xcom_pull(task_ids="flag_inconsistent") or {}
        return {**out, "inconsistent_texts": review.get("inconsistent_texts", 0)}

    guardrail, flagged, summary = other_share(), flag_inconsistent(), report()
    seed() >> clean.group >> guardrail >> flagged >> summary
    guardrail >> summary

"""Free-text cleanup with confidence: map a messy ``reason_for_cancellation`` column to a taxonomy.

The column is what customers typed into a cancel form: typos, five languages, sarcasm ("oh great,
another price hike"), "n/a", and the same complaint in twenty spellings. Analysts need a closed
set of labels they can count. Every row is mapped to the taxonomy (``ReasonLabel``, described to
the model in ``cancellation_reason_cleanup_system.md`` beside this file) with a confidence;
``other`` is allowed only with a justification (an invariant checked on every answer, so a lazy
``other`` is a reject with a reason, not a silent row).

After the backlog unit has written the run's rows (``cancellation_reasons_clean``), two checks
look at the answers *together*, which no per-row validation can do:

* **distribution guardrail**: when ``other`` takes more than ``params.max_other_share`` of the
  run's rows the taxonomy (or the prompt) no longer fits the data: the run fails after loading
  (nothing is lost) so that someone looks before the next interval piles on;
* **consistency**: rows whose normalised text is the same ("Too expensive!!", "too expensive")
  but got different labels go to ``cancellation_reason_review`` (rebuilt even when the guardrail
  failed), for a human to settle and to feed back into the few-shot examples.

Selection (scheduled runs: their day; manual runs: the unlabelled backlog, ``params.limit`` per
run; ``mode=failed``: the rejected rows), pilot, approval, budget and reruns are the unit's
(docs/backlog.md). Connections: ``fable_default`` and ``fable_backlog_db`` (the bundled 6,000
rows are loaded into ``cancellations`` when the table is empty).
"""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, Param, task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from airflow_provider_fable.backlog import Backlog, Destination, Prompt, Source, Stage

BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
CLEAN_TABLE, REVIEW_TABLE = "cancellation_reasons_clean", "cancellation_reason_review"
CLEAN_ASSET = Asset(name=CLEAN_TABLE, uri=f"x-fable://backlog/{CLEAN_TABLE}")
REVIEW_ASSET = Asset(name=REVIEW_TABLE, uri=f"x-fable://backlog/{REVIEW_TABLE}")


class ReasonLabel(str, Enum):
    """The canonical taxonomy (its meanings are in the system prompt file: change both together)."""

    too_expensive = "too_expensive"
    missing_features = "missing_features"
    switched_to_competitor = "switched_to_competitor"
    poor_support = "poor_support"
    technical_issues = "technical_issues"
    no_longer_needed = "no_longer_needed"
    business_closed = "business_closed"
    temporary_pause = "temporary_pause"
    billing_problems = "billing_problems"
    not_stated = "not_stated"
    other = "other"


class CancellationReason(BaseModel):
    """One row's label. ``other`` must say why nothing else fits (checked on every answer)."""

    # defer_build: the validator is built on first use (in the task), not while the file is parsed.
    model_config = ConfigDict(extra="forbid", defer_build=True)

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
        "max_other_share": Param(
            0.15, type="number", minimum=0, maximum=1, description="Guardrail on 'other'"
        )
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

    # all_done: rebuilt even when the guardrail failed the run (an 'other' flood is exactly when
    # a reviewer wants it); ``report`` needs the guardrail, so the run stays failed.
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
    def report(run_id: str, ti: Any = None) -> dict[str, Any]:
        """Label distribution, agreement with the dataset's hidden labels, inconsistencies, cost."""
        from airflow_provider_fable import example_data as ex

        final = ti.xcom_pull(task_ids=clean.task_id("finalize")) or {}
        agree = ex.agreement_with_labels(
            BACKLOG_CONN_ID, table=CLEAN_TABLE, id_column="cancellation_id", dataset="cancellation_reasons",
            fields={"label": "expected_reason"}, run_id=run_id,
        )  # fmt: skip
        counts = (final.get("distribution") or {}).get("label", {})
        return {
            "rows": final.get("accepted", 0),
            "rejected": final.get("rejected", 0),
            "distribution": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "other_share": (ti.xcom_pull(task_ids="other_share") or {}).get("share"),
            "agreement_with_dataset_labels": agree["label"],
            "inconsistent_texts": (ti.xcom_pull(task_ids="flag_inconsistent") or {}).get(
                "inconsistent_texts", 0
            ),
            "cost_usd": final.get("cost_usd"),
        }

    guardrail, flagged, summary = other_share(), flag_inconsistent(), report()
    seed() >> clean.group >> guardrail >> flagged >> summary
    guardrail >> summary

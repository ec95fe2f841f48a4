"""Free-text cleanup with confidence: map a messy ``reason_for_cancellation`` column to a taxonomy.

The column is what customers typed into a cancel form: typos, five languages, sarcasm ("oh great,
another price hike"), "n/a", and the same complaint in twenty spellings. Analysts need a closed
set of labels they can count. This DAG maps every row to the canonical taxonomy below with a
confidence score; ``other`` is allowed only with a justification (an invariant checked on every
answer, so a lazy ``other`` is a reject with a reason, not a silent row).

After the load, two checks look at the answers *together*, which no per-row validation can do:

* **consistency**: rows whose normalised text is the same ("Too expensive!!" and "too
  expensive") but got different labels are written to ``cancellation_reason_review`` with the
  labels and counts, for a human to settle (and to feed back into the few-shot examples);
* **distribution guardrail**: when ``other`` takes more than ``params.max_other_share`` of the
  run's rows, the taxonomy (or the prompt) no longer fits the data: the load operator's own
  ``max_share`` guardrail fails the run after loading (nothing is lost; the review table is still
  rebuilt) so that someone looks before the next interval piles on.

Selection (``params.mode``): scheduled runs and backfills take rows created in their data
interval (daily); manual runs and runs without a logical date take the unlabelled backlog;
``failed`` sends again only the rows this job rejected (the job ledger decides, see
docs/ledger.md). ``params.pilot`` caps rows per run; ``params.budget_usd`` is the submit's
``max_cost_usd``: a run estimated above it fails before anything is sent.
Connections: ``fable_default`` and ``fable_backlog_db`` (the bundled 6,000 rows are loaded into
``cancellations`` when the table is empty). Top-level imports: Airflow, pydantic, the provider.
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

from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.sensors.batch import FableBatchSensor

FABLE_CONN_ID = "fable_default"
BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
CLEAN_TABLE = "cancellation_reasons_clean"
REVIEW_TABLE = "cancellation_reason_review"
CLEAN_ASSET = Asset(name=CLEAN_TABLE, uri=f"x-fable://backlog/{CLEAN_TABLE}")
REVIEW_ASSET = Asset(name=REVIEW_TABLE, uri=f"x-fable://backlog/{REVIEW_TABLE}")
MAX_TOKENS = 200
#: The submit's ``rerun=``: with ``mode=failed`` it sends the selected rows its job has not accepted
#: (its rejects); an accepted row is never paid for twice.
RERUN = "{{ 'unaccepted' if params.mode == 'failed' else '' }}"


class ReasonLabel(str, Enum):
    """The canonical taxonomy. Change it here; the prompt below is built from the descriptions."""

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


TAXONOMY = {
    "too_expensive": "price, price increases, cannot afford, cheaper elsewhere (without naming a switch)",
    "missing_features": "a capability or integration the product lacks",
    "switched_to_competitor": "moved to another product or vendor",
    "poor_support": "slow, unhelpful or absent customer support",
    "technical_issues": "bugs, crashes, outages, slowness, sync or import failures",
    "no_longer_needed": "the need went away: project ended, one-off use, stopped that work",
    "business_closed": "the customer's business closed, shut down or retired",
    "temporary_pause": "a break with intent to return (seasonal, a few months)",
    "billing_problems": "wrong or duplicate charges, card updates failing, refunds, surprise renewals",
    "not_stated": "no reason given: empty, n/a, '-', 'no comment', placeholders",
    "other": "a real reason that fits none of the above (justification required)",
}


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


SYSTEM_PROMPT = (
    "You clean up the free-text reasons customers typed when cancelling a subscription. Map each "
    "reason to exactly one label:\n"
    + "\n".join(f"- {label}: {meaning}" for label, meaning in TAXONOMY.items())
    + """

Read through typos, any language (German, French, Spanish, Polish, Dutch are common) and sarcasm: \
"love paying more for the same thing" is too_expensive, "loved the daily crashes" is \
technical_issues. When a reason names two causes, pick the first one. Use other only for a real \
reason outside the taxonomy, and then give a short justification; never use other for an empty \
or placeholder answer (that is not_stated). confidence: 0.9+ when the text is explicit, 0.6-0.8 \
for sarcasm, typos or a foreign language you are sure of, lower when guessing. Answer with the \
JSON object only."""
)

PROMPT_TEMPLATE = """Reason given: "{reason_for_cancellation}" (tier {plan}, {tenure_months} months)"""

FEW_SHOT = [
    {
        "record": {"reason_for_cancellation": "TROP CHER!!", "plan": "starter", "tenure_months": 7},
        "answer": {"label": "too_expensive", "confidence": 0.9, "justification": None},
    },
    {
        "record": {"reason_for_cancellation": "n/a", "plan": "free", "tenure_months": 2},
        "answer": {"label": "not_stated", "confidence": 0.95, "justification": None},
    },
    {
        "record": {"reason_for_cancellation": "moving abroad", "plan": "pro", "tenure_months": 30},
        "answer": {
            "label": "other",
            "confidence": 0.8,
            "justification": "Relocation is a real reason outside the taxonomy.",
        },
    },
]

SELECT_RUN = """
SELECT c.cancellation_id, c.reason_for_cancellation, c.plan, c.tenure_months
FROM cancellations AS c JOIN cancel_work AS w ON w.cancellation_id = c.cancellation_id
WHERE w.run_id = :run_id
ORDER BY c.cancellation_id
"""


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
        "model": Param("claude-fable-5", type="string"),
        "pilot": Param(2000, type="integer", minimum=1, maximum=100_000, description="Rows per run"),
        "budget_usd": Param(
            25.0, type=["number", "null"], minimum=0, description="Refuse runs estimated above this"
        ),
        "max_other_share": Param(
            0.15, type="number", minimum=0, maximum=1, description="Guardrail on 'other'"
        ),
        "mode": Param("auto", enum=["auto", "interval", "backlog", "failed"], description="Which rows"),
    },
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example", "cleanup"],
    doc_md=__doc__,
) as dag:

    @task
    def select_rows(params: dict[str, Any], run_id: str, **context: Any) -> dict[str, Any]:
        """Seed, pick this run's rows (interval, backlog or the rejected ones)."""
        import sqlalchemy as sa

        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.sinks import ResultSink
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        ex.require_connections(fable=FABLE_CONN_ID, sql=BACKLOG_CONN_ID)
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            ex.seed_table(
                engine, "cancellations", "cancellation_reasons", key="cancellation_id",
                columns=("cancellation_id", "created_at", "plan", "tenure_months", "reason_for_cancellation"),
                int_columns=("tenure_months",),
            )  # fmt: skip
            ResultSink(
                engine, table=CLEAN_TABLE, id_column="cancellation_id", output_model=CancellationReason
            ).ensure_tables()
            tables = _tables(engine)
            mode, window = ex.run_mode(context, params["mode"])
            labelled = (
                f"EXISTS (SELECT 1 FROM {CLEAN_TABLE} AS r WHERE r.cancellation_id = c.cancellation_id)"
            )
            rejected = (
                f"EXISTS (SELECT 1 FROM {CLEAN_TABLE}_rejects AS x WHERE x.record_id = c.cancellation_id)"
            )
            # failed: rejected and never labelled since. Otherwise: neither labelled nor rejected
            # (a rejected row waits for mode=failed: the job ledger would only re-attach it).
            where = f"NOT {labelled} AND " + (rejected if mode == "failed" else f"NOT {rejected}")
            binds: dict[str, Any] = {"pilot": params["pilot"]}
            if window:
                where += " AND c.created_at >= :start AND c.created_at < :end"
                binds.update(start=window[0], end=window[1])
            with engine.begin() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT c.cancellation_id FROM cancellations AS c "
                        f"WHERE {where} ORDER BY c.created_at, c.cancellation_id LIMIT :pilot"
                    ),
                    binds,
                ).all()
                n = len(rows)
                work = tables["cancel_work"]
                conn.execute(work.delete().where(work.c.run_id == run_id))
                if rows:
                    conn.execute(work.insert(), [{"run_id": run_id, "cancellation_id": r[0]} for r in rows])
        finally:
            engine.dispose()
        return {
            "selected": n,
            "mode": mode,
            "window": {"start": window[0], "end": window[1]} if window else None,
        }

    submit = FableBatchSubmitOperator(
        task_id="submit",
        sql=SELECT_RUN,
        sql_conn_id=BACKLOG_CONN_ID,
        sql_parameters={"run_id": "{{ run_id }}"},
        id_field="cancellation_id",
        prompt_template=PROMPT_TEMPLATE,
        system_prompt=SYSTEM_PROMPT,
        few_shot_examples=FEW_SHOT,
        output_model=CancellationReason,
        model="{{ params.model }}",
        max_tokens=MAX_TOKENS,
        max_cost_usd="{{ params.budget_usd }}",  # refuses before the first create when over
        rerun=RERUN,  # mode=failed: only what this job has not accepted is sent again
    )
    wait = FableBatchSensor(task_id="wait", batch_ids=submit.output, poll_interval=POLL_SECONDS)
    load = FableValidateLoadOperator(
        task_id="load",
        batch_ids=wait.output,
        output_model=CancellationReason,
        destination_conn_id=BACKLOG_CONN_ID,
        table=CLEAN_TABLE,
        id_column="cancellation_id",
        submit_manifest=submit.output,  # estimate vs actual cost, input excerpts for the QA table
        # The distribution guardrail: checked after the rows are written, fails the task (and the run).
        max_share={"label": {"other": "{{ params.max_other_share }}"}},
        outlets=[CLEAN_ASSET],
    )

    # all_done: the review is rebuilt even when the load's guardrail failed the run (the rows are
    # loaded; an 'other' flood is exactly when a reviewer wants it). ``report`` still needs the load.
    @task(outlets=[REVIEW_ASSET], trigger_rule="all_done")
    def flag_inconsistent(run_id: str) -> dict[str, Any]:
        """Rebuild the review table: every normalised text that got more than one label.

        It looks at all labelled rows, not only this run's: an inconsistency between today's
        answer and last week's is exactly what a reviewer needs to see. Groups are streamed
        from the database; memory holds one entry per distinct normalised text.
        """
        import json
        from datetime import timezone

        import sqlalchemy as sa

        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        groups: dict[str, dict[str, Any]] = {}
        try:
            tables = _tables(engine)
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=5000).execute(
                    sa.text(
                        f"SELECT c.cancellation_id, c.reason_for_cancellation, r.label FROM {CLEAN_TABLE} AS r "
                        "JOIN cancellations AS c ON c.cancellation_id = r.cancellation_id ORDER BY c.cancellation_id"
                    )
                )
                for cid, text, label in result:
                    g = groups.setdefault(normalise(text), {"labels": {}, "examples": {}})
                    g["labels"][label] = g["labels"].get(label, 0) + 1
                    g["examples"].setdefault(label, cid)
            now = datetime.now(timezone.utc).isoformat()
            flagged = [
                {
                    "normalized_text": key,
                    "labels": ",".join(sorted(g["labels"])),
                    "label_counts": json.dumps(dict(sorted(g["labels"].items()))),
                    "row_count": sum(g["labels"].values()),
                    "example_ids": json.dumps(dict(sorted(g["examples"].items()))),
                    "majority_label": max(sorted(g["labels"]), key=lambda k: g["labels"][k]),
                    "flagged_by_run": run_id,
                    "flagged_at": now,
                }
                for key, g in sorted(groups.items())
                if len(g["labels"]) > 1
            ]
            review = tables[REVIEW_TABLE]
            with engine.begin() as conn:
                conn.execute(review.delete())
                if flagged:
                    conn.execute(review.insert(), flagged)
        finally:
            engine.dispose()
        return {
            "distinct_texts": len(groups),
            "inconsistent_texts": len(flagged),
            "rows_in_inconsistent_texts": sum(r["row_count"] for r in flagged),
        }

    @task
    def report(params: dict[str, Any], run_id: str, ti: Any = None) -> dict[str, Any]:
        """Label distribution, confidence, agreement with the dataset's hidden labels, cost."""
        import sqlalchemy as sa

        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.cost import usage_cost_usd
        from airflow_provider_fable.core.results import Usage
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        loaded = ti.xcom_pull(task_ids="load") or {}
        review = ti.xcom_pull(task_ids="flag_inconsistent") or {}
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        f"SELECT r.cancellation_id, r.label, r.confidence FROM {CLEAN_TABLE} AS r "
                        "JOIN cancel_work AS w ON w.cancellation_id = r.cancellation_id WHERE w.run_id = :r"
                    ),
                    {"r": run_id},
                ).all()
        finally:
            engine.dispose()
        truth = {r["cancellation_id"]: r["expected_reason"] for r in ex.iter_dataset("cancellation_reasons")}
        counts: dict[str, int] = {}
        for _, label, _ in rows:
            counts[label] = counts.get(label, 0) + 1
        agree = sum(truth.get(cid) == label for cid, label, _ in rows)
        usage = Usage(**loaded.get("usage", {}))
        return {
            "rows": len(rows),
            "rejected": loaded.get("rejected", 0),
            "distribution": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "other_share": round(counts.get("other", 0) / len(rows), 4) if rows else 0.0,
            "low_confidence": sum(1 for *_, c in rows if c < 0.6),
            "agreement_with_dataset_labels": round(agree / len(rows), 4) if rows else None,
            "inconsistent_texts": review.get("inconsistent_texts", 0),
            "cost_usd": usage_cost_usd(usage, params["model"], prices=ex.example_prices()),
        }

    selected = select_rows()
    flagged = flag_inconsistent()
    summary = report()
    selected >> submit >> wait >> load >> flagged >> summary
    load >> summary


def _tables(engine: Any) -> dict[str, Any]:
    """The DAG's own tables (created if missing)."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    sa.Table(
        "cancel_work",
        meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("cancellation_id", sa.Text, primary_key=True),
    )
    sa.Table(
        REVIEW_TABLE,
        meta,
        sa.Column("normalized_text", sa.Text, primary_key=True),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("label_counts", sa.Text, nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("example_ids", sa.Text),
        sa.Column("majority_label", sa.Text),
        sa.Column("flagged_by_run", sa.Text),
        sa.Column("flagged_at", sa.Text),
    )
    meta.create_all(engine)
    return meta.tables

"""Document summaries with chunk-then-combine: long documents in sections, then one summary each.

A 40-page contract does not belong in one request: the answer gets vaguer as the input grows,
one failure loses the whole document and the output limit caps what can be said. ``Chunking``
splits each long document on its own heading and paragraph boundaries into sections of at most
``params.section_tokens`` (estimated offline), summarises every section (``SectionSummary``,
id ``<doc_id>__s<k>of<n>-<digest>``), then sends one combine request per document, built from its
section summaries in order, for the fixed structure of ``DocumentSummary``. Documents that fit
in one section skip the section requests. A document is combined only when *every* section is
accepted; the others are listed in ``document_summaries_incomplete`` (missing and rejected
sections, with reasons) and ``mode=failed`` resends only their sections not accepted yet.

Selection, pilot, approval, budget, reruns and the final table are the backlog unit's
(docs/backlog.md): scheduled runs and backfills take the documents created in their week,
manual runs the unsummarised backlog (``params.limit`` per run). Prompts are the ``.md`` files
beside this file. Connections: ``fable_default`` and ``fable_backlog_db`` (the bundled corpus is
loaded into ``documents`` when the table is empty).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, Param, task

try:
    from airflow.sdk import CronDataIntervalTimetable
except ImportError:  # Airflow 3.1: the timetable is airflow-core's
    from airflow.timetables.interval import CronDataIntervalTimetable
from pydantic import BaseModel, ConfigDict, Field

from airflow_provider_fable.backlog import Backlog, Chunking, Destination, Prompt, Source, Stage

BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
DOCUMENT_SUMMARIES = Asset(name="document_summaries", uri="x-fable://backlog/document_summaries")


class SectionSummary(BaseModel):
    """What one section contributes; the combine request works only from these."""

    # defer_build: validators are built on first use (in a task), not while the file is parsed.
    model_config = ConfigDict(extra="forbid", defer_build=True)

    summary: str = Field(
        min_length=10, max_length=800, description="What this section says, in 1-3 sentences."
    )
    key_points: list[str] = Field(
        min_length=1, max_length=5, description="Facts, figures, decisions, obligations."
    )
    risks: list[str] = Field(max_length=5, description="Risks, liabilities or failures the section names.")
    open_questions: list[str] = Field(max_length=5, description="Anything the section leaves undecided.")


class DocumentSummary(BaseModel):
    """The fixed structure every document ends up in. All four parts are required; a document
    without risks or open questions says so ("None identified.") rather than leaving a hole."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    executive_summary: str = Field(
        min_length=20, max_length=1200, description="3-5 sentences for an executive."
    )
    key_points: list[str] = Field(min_length=1, max_length=8)
    risks: list[str] = Field(min_length=1, max_length=8)
    open_questions: list[str] = Field(min_length=1, max_length=8)


with DAG(
    dag_id="document_summaries",
    description="Summarise long documents: sections first, then one combined summary per document",
    schedule=CronDataIntervalTimetable("@weekly", timezone="UTC"),
    start_date=datetime(2026, 1, 4),
    catchup=False,
    max_active_runs=1,
    params={
        "section_tokens": Param(
            1500, type="integer", minimum=200, maximum=50_000, description="Section size bound (tokens)"
        ),
    },
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example", "chunk-then-combine"],
    doc_md=__doc__,
) as dag:

    @task
    def seed() -> int:
        """Check the connections; load the bundled corpus into ``documents`` when it is empty."""
        from airflow_provider_fable import example_data as ex

        return ex.seed_backlog("documents", sql_conn_id=BACKLOG_CONN_ID)

    summaries = Backlog(
        "documents",
        source=Source(
            sql="SELECT doc_id, created_at, doc_type, title, body FROM documents",
            conn_id=BACKLOG_CONN_ID,
            id_field="doc_id",
            date_field="created_at",
        ),
        chunking=Chunking(
            field="body",
            prompt=Prompt(
                template="document_summaries_section.md", system="document_summaries_section_system.md"
            ),
            output_model=SectionSummary,
            model="claude-fable-5",
            max_tokens=700,
            section_tokens=1500,  # the default; params.section_tokens overrides it per run
        ),
        prompt=Prompt(template="document_summaries.md", system="document_summaries_system.md"),
        output_model=DocumentSummary,
        stages=[Stage("claude-fable-5", max_tokens=1500)],
        destination=Destination(conn_id=BACKLOG_CONN_ID, table="document_summaries"),
        limit=50,
        budget_usd=25.0,
        poll_interval=POLL_SECONDS,
    )
    dag.get_task(summaries.task_id("finalize")).outlets = [DOCUMENT_SUMMARIES]
    seed() >> summaries.group

"""Chunk-then-combine in the backlog unit with what the example does not use: a pilot before the
full pass, a file source (no SQL), inline prompts, a cheap section model and a two-stage cascade
on the combine (rejected combines escalate)."""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, Param
from pydantic import BaseModel, ConfigDict, Field

from airflow_provider_fable.backlog import Backlog, Chunking, Destination, Escalate, Prompt, Source, Stage
from airflow_provider_fable.example_data import dataset_path


class SectionNotes(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    summary: str = Field(min_length=10, max_length=800)
    key_points: list[str] = Field(min_length=1, max_length=5)


class Brief(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    executive_summary: str = Field(min_length=20, max_length=1200)
    key_points: list[str] = Field(min_length=1, max_length=8)


with DAG(
    dag_id="chunked_documents",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={"section_tokens": Param(400, type="integer", minimum=50)},
    default_args={"retries": 1},
):
    Backlog(
        "docs",
        source=Source(records=str(dataset_path("documents")), id_field="doc_id", date_field="created_at"),
        chunking=Chunking(
            field="body",
            prompt=Prompt(template="{body}\n\n(section {section_index} of {section_count} of {title})",
                          system="Summarise this section of a document. JSON only."),
            output_model=SectionNotes,
            model="claude-haiku-4-5",
            max_tokens=400,
        ),
        prompt=Prompt(template="{material}\n\n({title}: {material_note})", system="Write the brief. JSON only."),
        output_model=Brief,
        stages=[Stage("claude-haiku-4-5", max_tokens=600, escalate=[Escalate.rejected()]),
                Stage("claude-fable-5", max_tokens=600)],
        destination=Destination(conn_id=os.environ.get("CHUNKED_DB", "chunked_db"), table="briefs"),
        pilot=5,
        poll_interval=float(os.environ.get("FABLE_POLL_SECONDS", "60")),
    )  # fmt: skip

"""A chunked backlog whose source holds a record with an empty text field."""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG
from pydantic import BaseModel, ConfigDict

from airflow_provider_fable.backlog import Backlog, Chunking, Destination, Prompt, Source, Stage


class Note(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    summary: str


LONG = "\n\n".join(f"Paragraph {i} states a fact. It has a second sentence." for i in range(40))

with DAG(dag_id="chunked_empty_text", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    Backlog(
        "notes",
        source=Source(records=[{"id": "a", "text": LONG}, {"id": "b", "text": "  \n "}], id_field="id"),
        chunking=Chunking(
            field="text", prompt=Prompt(template="{text}"), output_model=Note, section_tokens=100
        ),
        prompt=Prompt(template="{material}"),
        output_model=Note,
        stages=[Stage("claude-fable-5", max_tokens=100)],
        destination=Destination(conn_id=os.environ.get("CHUNKED_DB", "chunked_db"), table="notes"),
        poll_interval=0.2,
    )

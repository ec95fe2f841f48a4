"""Product reviews: sentiment and aspects, a cheap stage escalating to Fable 5 (the issue #17 acceptance DAG)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from enum import Enum

from airflow.sdk import DAG, CronDataIntervalTimetable
from pydantic import BaseModel, ConfigDict, Field

from airflow_provider_fable.backlog import Backlog, Destination, Escalate, Guardrails, Prompt, Source, Stage


# --- schema ---
class Sentiment(str, Enum):
    positive = "positive"
    negative = "negative"
    neutral = "neutral"
    mixed = "mixed"


class ReviewSentiment(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    sentiment: Sentiment = Field(description="Overall sentiment of the review.")
    aspect: str = Field(max_length=40, description="The product aspect the review is mostly about.")
    confidence: float = Field(ge=0, le=1, description="How sure you are of the sentiment.")
    evidence: str = Field(
        max_length=200, description="A verbatim quote from the review supporting the sentiment."
    )


# --- end of schema ---
DB = os.environ.get("REVIEWS_CONN_ID", "reviews_db")

with DAG(
    dag_id="product_reviews",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 3, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 1,
        "retry_delay": timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "300"))),
    },
) as dag:
    Backlog(
        "reviews",
        source=Source(
            sql="SELECT review_id, product, title, body, helpful_votes, created_at FROM product_reviews",
            conn_id=DB,
            id_field="review_id",
            date_field="created_at",
        ),
        prompt=Prompt(template="review.md", system="review_system.md", few_shot="review_examples.jsonl"),
        output_model=ReviewSentiment,
        stages=[
            Stage(
                "claude-haiku-4-5",
                max_tokens=200,
                escalate=[
                    Escalate.rejected(),
                    Escalate.not_quoted("evidence", in_fields=("product", "title", "body")),
                    Escalate.below("confidence", 0.6),
                ],
                priority_field="helpful_votes",
            ),
            Stage("claude-fable-5", max_tokens=200),
        ],
        destination=Destination(conn_id=DB, table="review_sentiment"),
        guardrails=Guardrails(max_reject_rate=0.2, review_after=3),
        pilot=150,
        approval=True,
        budget_usd=5.0,
        poll_interval=float(os.environ.get("FABLE_POLL_SECONDS", "60")),
    )

"""The backlog unit (issue #17) end to end: real Airflow (dag.test), real SDK, emulator, SQLite.

The acceptance DAG (``tests/backlog_dags/product_reviews.py``) is a backlog the examples do not
cover: product review sentiment, a cheap stage escalating to claude-fable-5.
"""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import point_connection_at

DAGS = Path(__file__).resolve().parent / "backlog_dags"
WORDS = {
    "positive": ["love it", "works great", "excellent quality", "very happy", "highly recommend"],
    "negative": ["broke after two days", "terrible support", "waste of money", "arrived damaged", "very disappointed"],
    "neutral": ["it is a lamp", "does what it says", "arrived on Tuesday", "average product"],
}
PRODUCTS = ["Desk lamp", "Kettle", "Headphones", "Backpack", "Coffee grinder", "Phone case"]


def seed_reviews(engine, n: int, *, start: datetime, days: int, first_id: int = 1, seed: int = 7) -> list[str]:
    """``n`` reviews spread over ``days`` days from ``start`` (ISO text dates, as SQLite keeps them)."""
    rng = random.Random(seed + first_id)
    rows = []
    for k in range(n):
        tone = rng.choice(list(WORDS))
        body = f"{rng.choice(WORDS[tone]).capitalize()}. {rng.choice(WORDS[tone]).capitalize()}, {rng.choice(['shipping was fast', 'price is fair', 'easy to use', 'the manual is unclear'])}."
        created = start + timedelta(days=k % days, hours=rng.randrange(24), minutes=rng.randrange(60))
        rows.append({
            "review_id": f"r{first_id + k:05d}", "product": rng.choice(PRODUCTS), "title": rng.choice(WORDS[tone]).title(),
            "body": body, "helpful_votes": rng.randrange(50), "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        })  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE IF NOT EXISTS product_reviews (review_id TEXT PRIMARY KEY, product TEXT, title TEXT, "
            "body TEXT, helpful_votes INTEGER, created_at TEXT)"
        ))  # fmt: skip
        conn.execute(
            sa.text("INSERT INTO product_reviews VALUES (:review_id, :product, :title, :body, :helpful_votes, :created_at)"),
            rows,
        )
    return [r["review_id"] for r in rows]


@pytest.fixture
def reviews(fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    server = fable_emulator_factory(
        processing_retrieves=1, faults={"invalid_answer_rate": 0.08, "errored_rate": 0.02, "seed": 11}
    )
    point_connection_at(server)
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    db = tmp_path / "reviews.db"
    fable_airflow.set_connection("reviews_db", conn_type="sqlite", host=str(db))
    engine = sa.create_engine(f"sqlite:///{db}")
    yield fable_airflow, engine, server
    engine.dispose()


def load_backlog_dag(dag_id: str = "product_reviews"):
    """Parse ``tests/backlog_dags`` and register the DAG in the metadata DB under the dags-folder
    bundle, so ``dag.test()`` (which syncs the configured bundles only) finds it serialized."""
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    from airflow_provider_fable.testing.airflow_env import ensure_metadata_db

    ensure_metadata_db()
    from airflow.dag_processing.bundles.manager import DagBundlesManager

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(DAGS))
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, "dags-folder", None)
    return bag.get_dag(dag_id)


def _rows(engine, sql: str, **binds):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(sql), binds).mappings()]

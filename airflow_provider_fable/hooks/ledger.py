"""Airflow wiring of the job ledger: which database it lives in, and the API's batch listing.

Resolution order (first that is set wins): the operator's ``ledger_conn_id``, the ``fable``
connection's extra ``ledger_conn_id`` (set once per deployment), then an embedded SQLite file
under ``AIRFLOW_HOME``. The embedded one works on one machine only: on Celery or Kubernetes
executors each worker would keep its own ledger and exactly-once would not hold, so it logs that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from airflow_provider_fable.core.ledger import BatchCandidate, Ledger
from airflow_provider_fable.hooks.sql import sqlalchemy_engine

log = logging.getLogger(__name__)

EMBEDDED_LEDGER_FILE = "fable_ledger.db"


def ledger_conn_id_from_fable(fable_conn_id: str) -> str | None:
    """The ``ledger_conn_id`` extra of the fable connection, if any."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(fable_conn_id)
    except Exception:  # noqa: BLE001 - a missing connection fails later with a better message
        return None
    return (conn.extra_dejson or {}).get("ledger_conn_id") or None


def embedded_ledger_url() -> str:
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / EMBEDDED_LEDGER_FILE}"


def open_ledger(ledger_conn_id: str | None, fable_conn_id: str, logger: Any = log) -> Ledger:
    """The ledger for an operator; caller disposes ``ledger.engine``."""
    conn_id = ledger_conn_id or ledger_conn_id_from_fable(fable_conn_id)
    if conn_id:
        engine = sqlalchemy_engine(conn_id)
        logger.info("Job ledger: connection %r (%s)", conn_id, engine.dialect.name)
    else:
        url = embedded_ledger_url()
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        logger.warning(
            "Job ledger: embedded SQLite at %s. It is NOT shared between workers: on Celery or "
            "Kubernetes executors set ledger_conn_id (operator argument, or an extra of the %r "
            "connection) to a shared database, or retries on another worker may pay twice.",
            url.removeprefix("sqlite:///"),
            fable_conn_id,
        )
    return Ledger(engine).ensure_schema()


def _as_utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def batch_candidates(hook: Any, since: datetime) -> Iterator[BatchCandidate]:
    """Batches the key can see, created at or after ``since`` (the list is newest first)."""
    for batch in hook.list_batches(limit=100):
        created = _as_utc(batch.created_at)
        if created < since:
            return
        counts = batch.request_counts
        total = sum(
            int(getattr(counts, k, 0) or 0)
            for k in ("processing", "succeeded", "errored", "canceled", "expired")
        )
        yield BatchCandidate(id=batch.id, created_at=created, request_count=total)

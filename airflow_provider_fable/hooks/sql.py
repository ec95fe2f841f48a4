"""SQLAlchemy engines from Airflow SQL connections (any provider whose hook offers one)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from airflow_provider_fable.core.errors import FableError


def sqlalchemy_engine(conn_id: str) -> Any:
    """A SQLAlchemy engine for an Airflow SQL connection (sqlite, postgres, ...). Caller disposes."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise FableError(
            f"connection {conn_id!r} is not a SQL connection (its hook has no SQLAlchemy engine)"
        )
    return hook.get_sqlalchemy_engine()

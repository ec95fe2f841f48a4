"""SQLAlchemy engines from Airflow SQL connections (any provider whose hook offers one)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.job import import_output_model
from airflow_provider_fable.core.preflight import PreflightError, check_destination


def sqlalchemy_engine(conn_id: str) -> Any:
    """A SQLAlchemy engine for an Airflow SQL connection (sqlite, postgres, ...). Caller disposes."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise FableError(
            f"connection {conn_id!r} is not a SQL connection (its hook has no SQLAlchemy engine)"
        )
    return hook.get_sqlalchemy_engine()


def preflight_destination(
    destination_conn_id: str,
    *,
    table: str,
    output_model: Any,
    id_column: str = "id",
    rejects_table: str | None = None,
    qa_table: str | None = None,
) -> None:
    """Check, before any batch is created, that the load task will be able to write its answers.

    The connection must exist and be a SQL connection the sink supports, the names must be
    plain identifiers, the output model storable, and the tables that already exist (answers,
    rejects, QA: one reflection each) tables the load can write (``core.preflight``). Every
    problem found is reported at once in one :class:`PreflightError`.
    """
    model = import_output_model(output_model)
    try:
        BaseHook.get_connection(destination_conn_id)
    except Exception as exc:  # AirflowNotFoundException (its import path moves between versions)
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
        raise PreflightError(
            [f"destination connection {destination_conn_id!r} does not exist; create it before submitting"]
        ) from None
    try:
        engine = sqlalchemy_engine(destination_conn_id)
    except FableError as exc:
        raise PreflightError([str(exc)]) from None
    try:
        check_destination(
            table=table,
            id_column=id_column,
            output_model=model,
            rejects_table=rejects_table,
            qa_table=qa_table,
            engine=engine,
        )
    finally:
        engine.dispose()

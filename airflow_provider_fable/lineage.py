"""Assets for the tables the provider writes, named from their Airflow connection.

``fable_asset(conn_id, table)`` gives the Asset a load operator writing ``table`` through
``conn_id`` emits, for a downstream DAG's ``schedule=``. It looks the connection up when called,
i.e. when the downstream DAG file is parsed (one connection read; the URI needs the host, port
and database). Without that, write the URI by hand: ``postgres://host:port/db/schema/table`` or
``sqlite://localhost/abs/path.db/table`` (``core.lineage`` holds the rules).

The load operator itself never reads a connection at parse time: it declares an ``AssetAlias``
named after the connection id and the table (``fable_table_alias``), and after its rows are
committed it attaches the destination and rejects tables' Assets to that alias, with their real
URIs built from the connection on the worker. Airflow records an event for each Asset, so a DAG
scheduled on the Asset runs after the load.
"""

from __future__ import annotations

from typing import Any


def fable_table_alias_name(conn_id: str, table: str) -> str:
    """The AssetAlias a load declares for ``table`` on ``conn_id`` (stable, no connection read)."""
    return f"fable-table:{conn_id}/{table}"


def table_uri(conn_id: str, table: str) -> str:
    """The Asset URI of ``table`` on the Airflow SQL connection ``conn_id`` (reads the connection)."""
    from airflow.sdk import BaseHook

    from airflow_provider_fable.core.lineage import table_name_from_connection

    return table_name_from_connection(BaseHook.get_connection(conn_id), table).uri


def fable_asset(conn_id: str, table: str, **kwargs: Any) -> Any:
    """The Asset of ``table`` on ``conn_id``: what ``FableValidateLoadOperator`` emits after a load.

    ``schedule=[fable_asset("backlog_db", "tickets_triage")]`` runs a DAG after each load of that
    table. Reads the connection when called (at parse time of the DAG file that calls it).
    """
    from airflow.sdk import Asset

    return Asset(uri=table_uri(conn_id, table), **kwargs)

"""Where Airflow 3.1, 3.2 and 3.3 keep what the provider imports, and which features they have.

The provider supports every Airflow 3 minor from 3.1 (docs/compatibility.md). A few names moved
between them, and two features exist only from 3.3; this module is the one place that knows, so
the rest of the package imports a name from here instead of guessing its location:

* ``AirflowFailException`` / ``AirflowNotFoundException`` / ``TaskDeferred``: ``airflow.sdk.exceptions`` from 3.2,
  ``airflow.exceptions`` in 3.1 (which 3.2+ still re-exports for compatibility).
* ``DagBag``: ``airflow.dag_processing.dagbag`` from 3.2, ``airflow.models.dagbag`` in 3.1.
* The task state store (``context["task_state_store"]``) and the trigger's ``on_kill`` (called
  when a user marks a deferred task failed/success or clears it) are 3.3 features. Before 3.3 the
  submit/sensor feature-detect the store (a no-op without it: the job ledger alone gives
  exactly-once) and a deferred wait killed by a user does not cancel its batches (they run to the
  end and are billed; the ledger keeps them, so a rerun pays nothing twice).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:  # Airflow >= 3.2
    from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, TaskDeferred
except ImportError:  # Airflow 3.1
    from airflow.exceptions import (  # type: ignore[no-redef]
        AirflowFailException,
        AirflowNotFoundException,
        TaskDeferred,
    )


def _airflow_version() -> tuple[int, int]:
    """(major, minor) of the installed Airflow core, from its distribution metadata."""
    for dist in ("apache-airflow-core", "apache-airflow"):
        try:
            major, minor = version(dist).split(".")[:2]
            return int(major), int(minor)
        except (PackageNotFoundError, ValueError):
            continue
    return (0, 0)


AIRFLOW_VERSION: tuple[int, int] = _airflow_version()

#: Airflow calls ``BaseTrigger.on_kill`` for a user's mark-failed/success or clear (3.3+).
TRIGGER_ON_KILL: bool = AIRFLOW_VERSION >= (3, 3)


def dagbag_class() -> type:
    """Airflow's ``DagBag`` (imported on call: importing it loads much of Airflow's core)."""
    try:  # Airflow >= 3.2
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    return DagBag


def sync_bag_to_db(bag: Any, bundle_name: str, bundle_version: str | None) -> None:
    """Airflow's ``sync_bag_to_db`` (serializes a parsed bag's DAGs into the metadata DB), which
    lives beside ``DagBag``: ``airflow.dag_processing.dagbag`` from 3.2, ``airflow.models.dagbag``
    in 3.1."""
    try:  # Airflow >= 3.2
        from airflow.dag_processing.dagbag import sync_bag_to_db as sync
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import sync_bag_to_db as sync  # type: ignore[no-redef]
    sync(bag, bundle_name, bundle_version)


__all__ = [
    "AIRFLOW_VERSION",
    "TRIGGER_ON_KILL",
    "AirflowFailException",
    "AirflowNotFoundException",
    "TaskDeferred",
    "dagbag_class",
    "sync_bag_to_db",
]

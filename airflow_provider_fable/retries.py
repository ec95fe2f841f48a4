"""Failures a retry cannot change, marked so Airflow does not retry them.

A budget refusal is decided by the records and the prices, a failed wait on batches that have
ended by their final state: a retry would meet the same and fail the same, after ``retry_delay``
each time. The error keeps its own type (callers catching ``BudgetExceededError`` or
``FableError`` still catch it) and also becomes an ``AirflowFailException``.
"""

from __future__ import annotations

import functools


@functools.cache
def _final(kind: type[Exception]) -> type[Exception]:
    from airflow.sdk.exceptions import AirflowFailException

    return type(kind.__name__, (kind, AirflowFailException), {"__module__": kind.__module__})


def not_retried(exc: Exception) -> Exception:
    """The same error (type and arguments), also an ``AirflowFailException``."""
    return _final(type(exc))(*exc.args)

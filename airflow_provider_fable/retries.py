"""Failures a retry cannot change, marked so Airflow does not retry them.

A budget refusal is decided by the records and the prices, a failed wait on batches that have
ended by their final state, a bad record by the record: a retry would meet the same and fail the
same, after ``retry_delay`` each time. The error keeps its own type (callers catching
``BudgetExceededError`` or ``FableError`` still catch it), its attributes and its message, and
also becomes an ``AirflowFailException``, which Airflow fails without retrying.

Core exceptions say whether a retry could help with ``retryable`` (``core.errors.FableError``);
:func:`fail_fast` is the one place that maps ``retryable = False`` to Airflow's fail-fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def _fail_exception() -> type[Exception]:
    """Airflow's fail-without-retry exception (its location per Airflow minor: ``_compat``)."""
    from airflow_provider_fable._compat import AirflowFailException

    return AirflowFailException


#: One fail-fast twin per error type (``isinstance`` and ``except`` still see the original type).
_FINAL: dict[type[Exception], type[Exception]] = {}


def _final(kind: type[Exception]) -> type[Exception]:
    twin = _FINAL.get(kind)
    if twin is None:
        fail = _fail_exception()
        twin = (
            kind
            if issubclass(kind, fail)
            else type(kind.__name__, (kind, fail), {"__module__": kind.__module__})
        )
        _FINAL[kind] = twin
    return twin


def not_retried(exc: Exception) -> Exception:
    """The same error (type, arguments, attributes), also an ``AirflowFailException``.

    Built without calling the error's ``__init__`` (``RecordError`` takes other arguments than
    the message it stores in ``args``), so every error type can be converted.
    """
    cls = _final(type(exc))
    if cls is type(exc):
        return exc
    new = cls.__new__(cls, *exc.args)
    new.args = exc.args
    new.__dict__.update(exc.__dict__)
    return new


@contextmanager
def fail_fast() -> Iterator[None]:
    """Re-raise errors marked ``retryable = False`` as fail-fast (no Airflow retries).

    Wraps an operator's ``execute``; errors without the attribute (network, database) and
    retryable ones pass through unchanged, so Airflow's retries still cover them.
    """
    try:
        yield
    except Exception as exc:
        if getattr(exc, "retryable", True) is False and not isinstance(exc, _fail_exception()):
            raise not_retried(exc).with_traceback(exc.__traceback__) from exc.__cause__
        raise

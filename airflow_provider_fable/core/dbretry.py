"""Transient database errors (ledger, destination): tell them apart, and ride them out in the task.

A ledger or destination that fails over, restarts or refuses connections for half a minute
should not burn a task's tries (each try of a load re-reads results; each try of a submit
reconciles): the step that hit the outage is run again, with a bounded backoff, inside the task.
Only errors that say the connection could not be made or was lost, or that SQLite's file is
locked, count as transient; a constraint violation or a syntax error fails at once.

The budget (seconds, default :data:`DEFAULT_DB_RETRY_SECONDS`) is the environment variable
``FABLE_DB_RETRY_SECONDS`` (0 turns the retries off), or an operator's argument where it has one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from airflow_provider_fable.exceptions import DatabaseUnavailableError as DatabaseUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds of retries before a transient database error is given up on: longer than a typical
#: PostgreSQL failover or restart (~30 s), short enough that a real outage fails the try soon.
DEFAULT_DB_RETRY_SECONDS = 75.0
RETRY_ENV = "FABLE_DB_RETRY_SECONDS"

#: Lower-case fragments of driver messages (psycopg2, psycopg 3, sqlite3) that mean "the server
#: or file is not reachable right now", not "this statement is wrong".
TRANSIENT_MARKERS = (
    "connection refused",
    "could not connect",
    "server closed the connection",
    "terminating connection due to administrator command",
    "connection reset",
    "connection timed out",
    "connection already closed",
    "connection is closed",
    "ssl connection has been closed",
    "broken pipe",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "is not currently accepting connections",
    "cannot connect now",
    "no connection to the server",
    "database is locked",
    "database table is locked",
)


def retry_budget(seconds: float | None = None) -> float:
    """The budget in seconds: ``seconds`` when given, else ``FABLE_DB_RETRY_SECONDS``, else 75."""
    if seconds is not None:
        return max(0.0, float(seconds))
    raw = os.environ.get(RETRY_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_DB_RETRY_SECONDS
    except ValueError:
        return DEFAULT_DB_RETRY_SECONDS


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(out) < 10:
        item = todo.pop()
        if item is None or any(item is seen for seen in out):
            continue
        out.append(item)
        todo += [getattr(item, "orig", None), item.__cause__, item.__context__]
    return out


_DB_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg")


def _from_database(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] in _DB_MODULES


def is_database_error(exc: BaseException) -> bool:
    """An error raised by a database driver or SQLAlchemy (anything in ``exc``'s chain)."""
    return any(_from_database(e) for e in _chain(exc))


def is_transient_db_error(exc: BaseException) -> bool:
    """True when ``exc`` (or its chain) is a database error saying the database could not be
    reached or dropped the connection. Only database errors count: an API call's "connection
    refused" is the HTTP client's business (its own retry rules), not this one's."""
    for e in _chain(exc):
        if not _from_database(e):
            continue
        if getattr(e, "connection_invalidated", False):
            return True
        text = str(e).lower()
        if any(marker in text for marker in TRANSIENT_MARKERS):
            return True
    return False


def short(exc: BaseException) -> str:
    """The driver's first message line (no SQL, no parameters: those may hold record data)."""
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"


def retry_transient_db(
    fn: Callable[[], T],
    *,
    what: str,
    budget: float | None = None,
    on_retry: Callable[[], Any] | None = None,
    logger: Any = log,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """``fn()``, run again after transient database errors until ``budget`` seconds have passed.

    Backoff 1, 2, 4, 8, 15, 15 ... s. ``on_retry`` runs before each new attempt (e.g. to undo
    counts the failed attempt made). ``fn`` must be safe to run again: the callers' steps are
    idempotent (upserts, reads, a whole batch's load). The last error is re-raised as it is.
    """
    deadline = time.monotonic() + retry_budget(budget)
    delay = 1.0
    while True:
        try:
            return fn()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient_db_error(exc) or left <= 0:
                raise
            wait = min(delay, left)
            logger.warning(
                "%s: the database is unavailable (%s); trying again in %.0f s (%.0f s left before giving up)",
                what, short(exc), wait, left,
            )  # fmt: skip
            sleep(wait)
            delay = min(delay * 2, 15.0)
            if on_retry is not None:
                on_retry()

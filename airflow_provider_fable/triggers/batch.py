"""FableBatchTrigger: waits in the triggerer for a set of batches to end, cheaply and safely.

Lives in the installed package (never in a DAG file) so the triggerer process can import it, and
imports nothing heavy at module level: the SDK is loaded off the event loop on first use.

A triggerer runs the deferred waits of a whole deployment in one event loop, so this trigger is
written to cost as little as possible there:

- all waits on one connection share one client per process (``hooks.shared_client``), built in a
  worker thread; nothing blocking (SDK import, TLS context, connection read) runs on the loop;
- the waits do not poll one by one: ``triggers.poller`` reads the statuses of every wait of the
  connection due in a round from list pages (1,000 batches per call), falling back to a plain
  retrieve for a batch the pages did not show; a lone wait on one batch just retrieves it;
- rounds carry jitter (and waits started together share one), progress is logged when the
  counts move, and a wait's first step only schedules a timer.

What a finished wait means (success, partial, incomplete, timeout) is decided by
``core.terminal.TerminalPolicy``, the same rules the sensor applies when it polls from a worker.
On a deadline the batches still running are canceled (best effort) before the failure event;
when a user kills the deferred task (mark failed/success, clear) Airflow >= 3.3 calls
:meth:`FableBatchTrigger.on_kill`, which cancels them too. ``cleanup()`` never cancels: it also
runs when a triggerer restarts or hands the trigger to another process, and the batches must
keep running then.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.terminal import (
    COUNT_KEYS,
    DEFAULT_DEADLINE_MARGIN,
    Progress,
    TerminalPolicy,
    Verdict,
    default_deadline,
    totals,
)
from airflow_provider_fable.hooks.shared_client import shared_client
from airflow_provider_fable.triggers.poller import ConnectionSetupError, batch_poller

#: Seconds ``on_kill`` and a deadline give each cancel call before giving up on it.
CANCEL_TIMEOUT = 20.0
#: Seconds over which the first steps of waits started together are spread.
START_SPREAD = 1.0
#: Seconds between progress lines of a wait whose counts did not move.
PROGRESS_EVERY = 600.0


def batch_summary(batch: Any) -> dict[str, Any]:
    """The small, JSON-safe view of an SDK MessageBatch that travels in events and XCom."""
    counts = batch.request_counts
    return {
        "id": batch.id,
        "processing_status": batch.processing_status,
        "request_counts": {k: getattr(counts, k) for k in COUNT_KEYS},
        "created_at": batch.created_at.isoformat() if batch.created_at else None,
        "ended_at": batch.ended_at.isoformat() if batch.ended_at else None,
        "expires_at": batch.expires_at.isoformat() if batch.expires_at else None,
    }


def is_transient(exc: Exception) -> bool:
    """API errors worth another poll (the hook's rule, shared with the load's status read)."""
    from airflow_provider_fable.hooks.fable import is_transient_api_error

    return is_transient_api_error(exc)


def _unknown(batch_id: str) -> dict[str, Any]:
    """Placeholder for a batch not read yet (the API errored on every poll so far)."""
    return {
        "id": batch_id,
        "processing_status": "unknown",
        "request_counts": dict.fromkeys(COUNT_KEYS, 0),
        "created_at": None,
        "ended_at": None,
        "expires_at": None,
    }


async def cancel_batches(client: Any, batch_ids: Any, log: Any) -> list[str]:
    """Ask the API to cancel each batch, best effort; returns the ids whose cancel was accepted."""
    accepted = []
    for batch_id in batch_ids:
        try:
            status = await asyncio.wait_for(client.cancel(batch_id), timeout=CANCEL_TIMEOUT)
        except (FableError, asyncio.TimeoutError) as exc:
            log.warning("Could not cancel batch %s (it may still be running and billed): %s", batch_id, exc)
            continue
        accepted.append(batch_id)
        log.info("Cancel requested for batch %s: now %s", batch_id, status)
    return accepted


class FableBatchTrigger(BaseTrigger):
    """Poll batches until every one has ended, the deadline passes, or the task is killed.

    :param batch_ids: the batches to wait for.
    :param fable_conn_id: Airflow connection of type ``fable``.
    :param poll_interval: seconds between polls (each poll varies by +-``jitter``).
    :param max_consecutive_errors: transient failures in a row tolerated before giving up.
    :param deadline: wall-clock epoch seconds after which the wait fails and the batches still
        running are canceled; None = the batches' latest ``expires_at`` + ``deadline_margin``.
    :param fail_on_partial: / :param accept_incomplete: / :param known_incomplete: see
        ``core.terminal.TerminalPolicy``.
    :param jitter: relative spread of poll times (0.1 = +-10 %).
    """

    def __init__(
        self,
        batch_ids: list[str],
        fable_conn_id: str = "fable_default",
        poll_interval: float = 60.0,
        max_consecutive_errors: int = 10,
        deadline: float | None = None,
        deadline_margin: float = DEFAULT_DEADLINE_MARGIN,
        fail_on_partial: bool = False,
        accept_incomplete: bool = False,
        jitter: float = 0.1,
        known_incomplete: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.fable_conn_id = fable_conn_id
        self.poll_interval = float(poll_interval)
        self.max_consecutive_errors = int(max_consecutive_errors)
        self.deadline = None if deadline is None else float(deadline)
        self.deadline_margin = float(deadline_margin)
        self.fail_on_partial = bool(fail_on_partial)
        self.accept_incomplete = bool(accept_incomplete)
        self.known_incomplete = list(known_incomplete or ())
        self.jitter = min(max(float(jitter), 0.0), 0.9)
        self._latest: dict[str, dict[str, Any]] = {}
        self._logged_state: tuple[Any, ...] = ()
        self._logged_at = 0.0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        # Ids, names and numbers only: the API key is read from the connection where the trigger
        # runs and never travels through the metadata DB.
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": self.batch_ids,
                "fable_conn_id": self.fable_conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "deadline": self.deadline,
                "deadline_margin": self.deadline_margin,
                "fail_on_partial": self.fail_on_partial,
                "accept_incomplete": self.accept_incomplete,
                "jitter": self.jitter,
                "known_incomplete": self.known_incomplete,
            },
        )

    def _next_delay(self) -> float:
        return self.poll_interval * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def _pending(self) -> list[str]:
        return [b for b in self.batch_ids if self._latest.get(b, {}).get("processing_status") != "ended"]

    def _event(self, verdict: Verdict, polls: int, canceled: list[str] | None = None) -> TriggerEvent:
        return TriggerEvent(
            {
                "status": "success" if verdict.ok else "failed",
                "reason": verdict.reason,
                "message": verdict.message,
                "batch_ids": self.batch_ids,
                "batches": [self._latest.get(b) or _unknown(b) for b in self.batch_ids],
                "polls": polls,
                "canceled": canceled or [],
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # The first step does no work: thousands of waits deferred in the same instant (a
        # triggerer starting, a backfill) each only schedule a timer here, so their starts
        # spread over up to START_SPREAD seconds instead of running in one loop iteration.
        await asyncio.sleep(random.uniform(0.0, min(START_SPREAD, self.poll_interval / 2)))
        policy = TerminalPolicy(
            fail_on_partial=self.fail_on_partial,
            accept_incomplete=self.accept_incomplete,
            known_incomplete=tuple(self.known_incomplete),
        )
        progress = Progress()
        watch = batch_poller(self.fable_conn_id).watch(self.poll_interval, self.jitter)
        try:
            deadline = self.deadline
            errors = polls = 0
            while True:
                # The sensor checked once before deferring, so the first turn can wait: the
                # poller puts it in the round already planned, or at a random point of one
                # interval, and every later turn one interval (+-jitter) after the previous.
                try:
                    fresh = await watch.poll(self._pending())
                except ConnectionSetupError as exc:
                    yield TriggerEvent(
                        {
                            "status": "error",
                            "reason": "config",
                            "message": str(exc),
                            "batch_ids": self.batch_ids,
                        }
                    )
                    return
                except FableError as exc:
                    polls += 1
                    errors += 1
                    if not is_transient(exc) or errors >= self.max_consecutive_errors:
                        yield TriggerEvent(
                            {
                                "status": "error",
                                "reason": "api_error",
                                "message": f"{exc} ({errors} failed poll(s) in a row)",
                                "batch_ids": self.batch_ids,
                                "polls": polls,
                            }
                        )
                        return
                    self.log.warning("Poll %d failed (%d in a row, will retry): %s", polls, errors, exc)
                    if deadline is None or time.time() < deadline:
                        continue
                else:
                    polls += 1
                    errors = 0
                    for batch_id in self._pending():
                        self._latest[batch_id] = fresh[batch_id]
                summaries = [self._latest.get(b) or _unknown(b) for b in self.batch_ids]
                if deadline is None:
                    deadline = default_deadline(summaries, self.deadline_margin)
                verdict = policy.decide(summaries, now=time.time(), deadline=deadline)
                if verdict is None:
                    self._log_progress(progress, summaries, polls)
                    continue
                canceled = await cancel_batches_of(self.fable_conn_id, verdict.to_cancel, self.log)
                (self.log.info if verdict.ok else self.log.error)(
                    "Wait over after %d polls: %s", polls, verdict.message
                )
                yield self._event(verdict, polls, canceled)
                return
        finally:
            watch.close()

    def _log_progress(self, progress: Progress, summaries: list[dict[str, Any]], polls: int) -> None:
        """Progress lines when the counts moved, or every PROGRESS_EVERY seconds at most.

        A log record costs more than the poll itself once polls are coalesced, and an unchanged
        line every minute for 24 hours says nothing; the first poll always logs.
        """
        now = time.monotonic()
        state = tuple((s["processing_status"], *s["request_counts"].values()) for s in summaries)
        if state == self._logged_state and now - self._logged_at < PROGRESS_EVERY:
            return
        self._logged_state, self._logged_at = state, now
        if len(summaries) > 1:
            for s in summaries:
                if s["processing_status"] != "ended":
                    t = totals([s])
                    self.log.info("Batch %s %s: %s", s["id"], s["processing_status"], t.describe())
        self.log.info(
            "Poll %d: %s; next poll in ~%.0fs",
            polls,
            progress.line(summaries, time.time()),
            self.poll_interval,
        )

    async def on_kill(self) -> None:
        """The user killed the deferred task (mark failed/success, clear): stop the billing.

        Called by Airflow >= 3.3 only for user actions, after ``run`` was cancelled; never on a
        triggerer restart or hand-over (those only call ``cleanup``, which does nothing here).
        """
        pending = self._pending()
        if not pending:
            return
        self.log.info("Task killed by a user: canceling batches %s", ", ".join(pending))
        try:
            client = await shared_client(self.fable_conn_id)
        except FableError as exc:
            self.log.warning("Could not cancel batches %s: %s", pending, exc)
            return
        await cancel_batches(client, pending, self.log)


async def cancel_batches_of(conn_id: str, batch_ids: Any, log: Any) -> list[str]:
    """:func:`cancel_batches` through the connection's shared client (nothing to cancel: no-op)."""
    if not batch_ids:
        return []
    try:
        client = await shared_client(conn_id)
    except FableError as exc:
        log.warning("Could not cancel batches %s (they may still be running and billed): %s", batch_ids, exc)
        return []
    return await cancel_batches(client, batch_ids, log)

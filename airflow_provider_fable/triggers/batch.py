"""FableBatchTrigger: waits in the triggerer for a set of batches to end, cheaply and safely.

Lives in the installed package (never in a DAG file) so the triggerer process can import it, and
imports nothing heavy at module level: the SDK is loaded off the event loop on first use.

A triggerer runs the deferred waits of a whole deployment in one event loop, so this trigger is
written to cost as little as possible there:

- all waits on one connection share one client per process (``hooks.shared_client``), built in a
  worker thread; nothing blocking (SDK import, TLS context, connection read) runs on the loop;
- a poll is one small GET per unfinished batch, read into a five-field summary;
- poll times carry jitter, so thousands of waits deferred together do not poll in step.

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

#: Seconds ``on_kill`` and a deadline give each cancel call before giving up on it.
CANCEL_TIMEOUT = 20.0


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
    :param fail_on_partial: / :param accept_incomplete: see ``core.terminal.TerminalPolicy``.
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
        self.jitter = min(max(float(jitter), 0.0), 0.9)
        self._latest: dict[str, dict[str, Any]] = {}

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
        policy = TerminalPolicy(
            fail_on_partial=self.fail_on_partial, accept_incomplete=self.accept_incomplete
        )
        progress = Progress()
        try:
            client = await shared_client(self.fable_conn_id)
        except FableError as exc:
            yield TriggerEvent(
                {"status": "error", "reason": "config", "message": str(exc), "batch_ids": self.batch_ids}
            )
            return
        deadline = self.deadline
        errors = polls = 0
        # The sensor checked once before deferring, so the first poll can wait; spreading it over
        # a whole interval keeps thousands of waits deferred together from polling in step.
        delay = random.uniform(0.0, self.poll_interval)
        while True:
            await asyncio.sleep(delay)
            delay = self._next_delay()
            polls += 1
            try:
                for batch_id in self._pending():
                    self._latest[batch_id] = await client.poll(batch_id)
                errors = 0
            except FableError as exc:
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
            summaries = [self._latest.get(b) or _unknown(b) for b in self.batch_ids]
            if deadline is None:
                deadline = default_deadline(summaries, self.deadline_margin)
            verdict = policy.decide(summaries, now=time.time(), deadline=deadline)
            if verdict is None:
                self._log_progress(progress, summaries, polls, delay)
                continue
            canceled = await cancel_batches(client, verdict.to_cancel, self.log) if verdict.to_cancel else []
            (self.log.info if verdict.ok else self.log.error)(
                "Wait over after %d polls: %s", polls, verdict.message
            )
            yield self._event(verdict, polls, canceled)
            return

    def _log_progress(
        self, progress: Progress, summaries: list[dict[str, Any]], polls: int, delay: float
    ) -> None:
        if len(summaries) > 1:
            for s in summaries:
                if s["processing_status"] != "ended":
                    t = totals([s])
                    self.log.info("Batch %s %s: %s", s["id"], s["processing_status"], t.describe())
        self.log.info(
            "Poll %d: %s; next poll in %.0fs",
            polls,
            progress.line(summaries, time.time()),
            delay,
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

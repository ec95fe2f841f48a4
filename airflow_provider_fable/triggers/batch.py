"""FableBatchTrigger: waits in the triggerer for a set of batches to end, with one async client.

Lives in the installed package (never in a DAG file) so the triggerer process can import it.
Transient API trouble (a 404 right after create, 5xx, timeouts) is tolerated for a number of
consecutive polls; anything else ends the wait with an error event the sensor turns into a
task failure that says what happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_fable.core.errors import FableError


def batch_summary(batch: Any) -> dict[str, Any]:
    """The small, JSON-safe view of a MessageBatch that travels in events and XCom."""
    counts = batch.request_counts
    return {
        "id": batch.id,
        "processing_status": batch.processing_status,
        "request_counts": {
            "processing": counts.processing,
            "succeeded": counts.succeeded,
            "errored": counts.errored,
            "canceled": counts.canceled,
            "expired": counts.expired,
        },
        "created_at": batch.created_at.isoformat() if batch.created_at else None,
        "ended_at": batch.ended_at.isoformat() if batch.ended_at else None,
        "expires_at": batch.expires_at.isoformat() if batch.expires_at else None,
    }


def is_transient(exc: Exception) -> bool:
    """API errors worth another poll: eventual-consistency 404s, 408/409/429/5xx, network trouble.

    Configuration errors (no key) and other 4xx are final: retrying them only delays the alert.
    """
    from airflow_provider_fable.hooks.fable import FableApiError

    if not isinstance(exc, FableApiError):
        return False
    status = exc.status_code
    return status is None or status in (404, 408, 409, 429) or status >= 500


class FableBatchTrigger(BaseTrigger):
    """Poll batches until every one has ``processing_status == "ended"``.

    :param batch_ids: the batches to wait for.
    :param fable_conn_id: Airflow connection of type ``fable``.
    :param poll_interval: seconds between polls of the whole set.
    :param max_consecutive_errors: transient failures in a row tolerated before giving up.
    """

    def __init__(
        self,
        batch_ids: list[str],
        fable_conn_id: str = "fable_default",
        poll_interval: float = 60.0,
        max_consecutive_errors: int = 10,
    ) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.fable_conn_id = fable_conn_id
        self.poll_interval = float(poll_interval)
        self.max_consecutive_errors = int(max_consecutive_errors)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": self.batch_ids,
                "fable_conn_id": self.fable_conn_id,
                "poll_interval": self.poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_provider_fable.hooks.fable import FableHook

        hook = FableHook(self.fable_conn_id)
        ended: dict[str, dict[str, Any]] = {}
        errors = 0
        polls = 0
        try:
            while True:
                polls += 1
                pending: dict[str, dict[str, Any]] = {}
                try:
                    for batch_id in self.batch_ids:
                        if batch_id in ended:
                            continue
                        summary = batch_summary(await hook.aretrieve_batch(batch_id))
                        if summary["processing_status"] == "ended":
                            ended[batch_id] = summary
                            self.log.info("Batch %s ended: %s", batch_id, summary["request_counts"])
                        else:
                            pending[batch_id] = summary
                    errors = 0
                except FableError as exc:
                    errors += 1
                    if not is_transient(exc) or errors >= self.max_consecutive_errors:
                        yield TriggerEvent(
                            {
                                "status": "error",
                                "message": str(exc),
                                "batch_ids": self.batch_ids,
                                "polls": polls,
                            }
                        )
                        return
                    self.log.warning("Poll %d failed (%d in a row, will retry): %s", polls, errors, exc)
                    await asyncio.sleep(self.poll_interval)
                    continue
                if not pending:
                    yield TriggerEvent(
                        {
                            "status": "success",
                            "batches": [ended[b] for b in self.batch_ids],
                            "polls": polls,
                        }
                    )
                    return
                processing = sum(s["request_counts"]["processing"] for s in pending.values())
                self.log.info(
                    "%d/%d batches ended; %d requests still processing; next poll in %.0fs",
                    len(ended),
                    len(self.batch_ids),
                    processing,
                    self.poll_interval,
                )
                await asyncio.sleep(self.poll_interval)
        finally:
            await hook.aclose()

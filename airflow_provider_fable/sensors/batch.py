"""FableBatchSensor: wait for Message Batches to end, deferring to the triggerer by default.

A batch can take up to 24 hours; holding a worker slot for that is waste, so ``deferrable``
follows ``[operators] default_deferrable`` like Airflow's own operators, and when it is on the
wait costs no worker at all. It checks once before deferring so a batch that already ended (a
rerun, the emulator's instant mode) resumes without a trip through the triggerer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

try:  # Task SDK >= 1.2 (Airflow 3.2); Airflow 3.1 only has the core module
    from airflow.sdk import conf
except ImportError:  # pragma: no cover - depends on the installed Airflow
    from airflow.configuration import conf

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.manifest import normalise_batch_ids
from airflow_provider_fable.hooks.fable import FableHook
from airflow_provider_fable.triggers.batch import FableBatchTrigger, batch_summary, is_transient

#: Batches expire 24 h after creation; waiting a little longer than that is the natural limit.
DEFAULT_TIMEOUT = timedelta(hours=25).total_seconds()


class FableBatchSensor(BaseSensorOperator):
    """Wait until every batch in ``batch_ids`` has ended.

    Returns (XCom) ``{"batch_ids": [...], "batches": [summary, ...], "waited_in": "trigger"|"worker"}``.

    :param batch_ids: ids, one id, or the submit operator's output manifest. Templated.
    :param fable_conn_id: connection of type ``fable``.
    :param poll_interval: seconds between polls (``poke_interval`` for non-deferrable mode).
    :param deferrable: wait in the triggerer instead of a worker slot.
    :param max_consecutive_errors: transient API errors in a row tolerated before failing (a
        mistyped or deleted batch id answers 404 forever; it must not wait out the timeout).
    """

    template_fields: Sequence[str] = ("batch_ids",)
    ui_color = "#d4a27f"

    def __init__(
        self,
        *,
        batch_ids: Any,
        fable_conn_id: str = FableHook.default_conn_name,
        poll_interval: float = 60.0,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        timeout: float = DEFAULT_TIMEOUT,
        max_consecutive_errors: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        super().__init__(timeout=timeout, **kwargs)
        self.batch_ids = batch_ids
        self.fable_conn_id = fable_conn_id
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.max_consecutive_errors = max_consecutive_errors
        self._errors_in_a_row = 0

    def _summaries(self) -> list[dict[str, Any]] | None:
        """Current summaries, or None when the API had a transient hiccup (poll again later).

        A 404 right after create (eventual consistency) or a 5xx must not fail a wait that
        the trigger would simply have retried.
        """
        hook = FableHook(self.fable_conn_id)
        try:
            summaries = [batch_summary(hook.retrieve_batch(b)) for b in normalise_batch_ids(self.batch_ids)]
        except FableError as exc:
            self._errors_in_a_row += 1
            if not is_transient(exc) or self._errors_in_a_row >= self.max_consecutive_errors:
                raise
            self.log.warning(
                "Could not read batch status (%d in a row, will check again): %s", self._errors_in_a_row, exc
            )
            return None
        finally:
            hook.close()
        self._errors_in_a_row = 0
        return summaries

    def poke(self, context: Any) -> PokeReturnValue:
        summaries = self._summaries()
        if summaries is None:
            return PokeReturnValue(is_done=False)
        done = [s for s in summaries if s["processing_status"] == "ended"]
        self.log.info("%d/%d batches ended", len(done), len(summaries))
        ready = len(done) == len(summaries)
        return PokeReturnValue(
            is_done=ready, xcom_value=self._manifest(summaries, "worker") if ready else None
        )

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        ids = normalise_batch_ids(self.batch_ids)
        if not ids:
            self.log.info("No batches to wait for (the submit task found nothing to send)")
            return self._manifest([], "worker")
        summaries = self._summaries()
        if summaries is not None and all(s["processing_status"] == "ended" for s in summaries):
            self.log.info("All %d batches already ended; not deferring", len(ids))
            return self._manifest(summaries, "worker")
        self.log.info(
            "Deferring: waiting for %d batches in the triggerer (poll every %ss)",
            len(ids),
            self.poll_interval,
        )
        self.defer(
            trigger=FableBatchTrigger(
                batch_ids=ids,
                fable_conn_id=self.fable_conn_id,
                poll_interval=self.poll_interval,
                max_consecutive_errors=self.max_consecutive_errors,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "success":
            raise FableError(f"waiting for batches {event.get('batch_ids')} failed: {event.get('message')}")
        for summary in event["batches"]:
            self.log.info("Batch %s ended: %s", summary["id"], summary["request_counts"])
        manifest = self._manifest(event["batches"], "trigger")
        manifest["polls"] = event.get("polls")
        return manifest

    @staticmethod
    def _manifest(summaries: list[dict[str, Any]], waited_in: str) -> dict[str, Any]:
        return {"batch_ids": [s["id"] for s in summaries], "batches": summaries, "waited_in": waited_in}

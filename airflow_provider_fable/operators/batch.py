"""FableBatchOperator: submit the records and wait for their batches in one task.

For users who prefer one task to three (like the official provider's ``AnthropicBatchOperator``):
it runs :class:`FableBatchSubmitOperator`'s own execute path, then hands the wait to the
triggerer exactly as :class:`FableBatchSensor` does (same trigger, same terminal policy, same
deadline and cancel-on-kill), and returns the submit manifest with the batches' final summaries.
Loading stays a separate :class:`FableValidateLoadOperator` task, which takes this manifest.

Retries: the submit half goes through the job ledger like the three-task form, so a retry after
the batches were created re-attaches to them and waits again; it creates no new batch and pays
nothing twice (tests/test_waiting.py). Batches that ended canceled or expired stay attached: send
their records again with ``rerun="failed"`` after the load, or ``resubmit=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_fable.links import FableBatchLink
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator

if TYPE_CHECKING:  # imported where used (parse time stays cheap)
    from airflow.sdk import Context

    from airflow_provider_fable.sensors.batch import FableBatchSensor


class FableBatchOperator(FableBatchSubmitOperator):
    """Submit one request per record as Message Batches, then wait (deferred) for them to end.

    Takes every :class:`FableBatchSubmitOperator` parameter, plus the waiting ones of
    :class:`FableBatchSensor`: ``poll_interval``, ``deferrable`` (default True; False waits in
    this worker slot, polling), ``timeout``, ``deadline_margin``, ``fail_on_partial``,
    ``accept_incomplete``, ``max_consecutive_errors``.

    :return: the submit manifest plus ``batches`` (final summaries), ``outcome`` and ``waited_in``.
    """

    operator_extra_links = (FableBatchLink(),)

    def __init__(
        self,
        *,
        poll_interval: float = 60.0,
        deferrable: bool = True,
        timeout: float | None = None,
        deadline_margin: float = 30 * 60.0,  # core.terminal.DEFAULT_DEADLINE_MARGIN (tested equal)
        fail_on_partial: bool = False,
        accept_incomplete: bool = False,
        max_consecutive_errors: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.wait_timeout = timeout
        self.deadline_margin = deadline_margin
        self.fail_on_partial = fail_on_partial
        self.accept_incomplete = accept_incomplete
        self.max_consecutive_errors = max_consecutive_errors
        self.link_batch_ids: list[str] | None = None

    def _waiter(self, manifest: dict[str, Any]) -> FableBatchSensor:
        """The sensor logic, not added to any DAG: one code path for every way of waiting."""
        from airflow_provider_fable.sensors.batch import FableBatchSensor

        waiter = FableBatchSensor(
            task_id=f"{self.task_id}__wait",
            batch_ids=manifest,
            fable_conn_id=self.fable_conn_id,
            poll_interval=self.poll_interval,
            deferrable=self.deferrable,
            timeout=self.wait_timeout,
            deadline_margin=self.deadline_margin,
            fail_on_partial=self.fail_on_partial,
            accept_incomplete=self.accept_incomplete,
            max_consecutive_errors=self.max_consecutive_errors,
            mode="poke",  # a reschedule would re-run this task's submit
        )
        waiter.defer_kwargs = {"manifest": manifest}
        # The deferral is raised from the waiter but resumes this task's execute_complete.
        waiter.defer = self.defer  # type: ignore[method-assign]
        return waiter

    def execute(self, context: Context) -> dict[str, Any]:
        manifest = super().execute(context)
        self.link_batch_ids = list(manifest["batch_ids"])
        waited = self._waiter(manifest).execute(context)
        return self._merge(manifest, waited)

    def execute_complete(
        self, context: Any, event: dict[str, Any], manifest: dict[str, Any]
    ) -> dict[str, Any]:
        self.link_batch_ids = list(manifest["batch_ids"])
        return self._merge(manifest, self._waiter(manifest).execute_complete(context, event))

    @staticmethod
    def _merge(manifest: dict[str, Any], waited: dict[str, Any]) -> dict[str, Any]:
        return {**manifest, **{k: v for k, v in waited.items() if k != "batch_ids"}}

    def on_kill(self) -> None:
        """Killed while submitting or polling in this worker: cancel what was created."""
        if self.link_batch_ids:
            self._waiter({"batch_ids": self.link_batch_ids}).on_kill()

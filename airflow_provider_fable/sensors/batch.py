"""FableBatchSensor: wait for Message Batches to end without holding a worker slot.

A batch can take up to 24 hours. The sensor therefore defers to the triggerer by default,
whatever ``[operators] default_deferrable`` says (Airflow ships it ``false``, and with it two
waiting sensors once starved a whole ``parallelism=2`` deployment). With ``deferrable=False`` it
uses ``mode="reschedule"`` by default, so even then the worker slot is released between checks.
It checks once before deferring, so a batch that already ended (a rerun, the emulator's instant
mode) resumes without a trip through the triggerer.

Every path (deferred, poke, reschedule) applies the same rules to decide what the end of a wait
means: ``core.terminal.TerminalPolicy``. A batch canceled from outside, or one in which no
request succeeded, fails the wait unless ``accept_incomplete=True``; a deadline (the batches'
own ``expires_at`` plus a margin, or ``timeout``) cancels what is still running and fails.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_fable import DEFAULT_CONN_ID
from airflow_provider_fable.links import FableBatchLink

if TYPE_CHECKING:  # imported where used: parsing a DAG file that names the sensor stays cheap
    from airflow.sdk import Context

    from airflow_provider_fable.core.terminal import TerminalPolicy, Verdict
    from airflow_provider_fable.hooks.fable import FableHook

#: Extra time the defer timeout gives the trigger past its own deadline, so the trigger's
#: timeout event (which cancels the batches and says which) wins over Airflow's bare timeout.
DEFER_GRACE = timedelta(minutes=10)
#: Without a readable expiry (never with the real API) the wait is bounded by this.
FALLBACK_TIMEOUT = timedelta(hours=25).total_seconds()
#: Task state store key of the poke/reschedule paths' state (errors in a row, first poke time).
STATE_KEY = "fable_wait"


class FableBatchSensor(BaseSensorOperator):
    """Wait until every batch in ``batch_ids`` has ended, then apply the terminal policy.

    Returns (XCom) ``{"batch_ids": [...], "batches": [summary, ...], "waited_in": "trigger"|"worker",
    "outcome": "ended"|"partial"|"incomplete"}``.

    :param batch_ids: ids, one id, or the submit operator's output manifest. Templated.
    :param fable_conn_id: connection of type ``fable``.
    :param poll_interval: seconds between polls (also ``poke_interval`` when not deferring).
    :param deferrable: wait in the triggerer (default True, independent of
        ``[operators] default_deferrable``); False polls from a worker, by default in
        ``mode="reschedule"`` so no slot is held between polls.
    :param timeout: seconds before the wait gives up, cancels the batches still running and
        fails; None (default) = the batches' latest ``expires_at`` + ``deadline_margin``.
    :param fail_on_partial: fail when some requests errored or expired.
    :param accept_incomplete: succeed even when a batch was canceled or nothing in it succeeded.
    :param max_consecutive_errors: transient API errors in a row tolerated before failing (a
        mistyped or deleted batch id answers 404 forever; it must not wait out the deadline).
        Counted across pokes in reschedule mode (kept in the task state store).
    """

    template_fields: Sequence[str] = ("batch_ids",)
    ui_color = "#d4a27f"
    operator_extra_links = (FableBatchLink(),)

    def __init__(
        self,
        *,
        batch_ids: Any,
        fable_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = 60.0,
        deferrable: bool = True,
        timeout: float | None = None,
        deadline_margin: float = 30 * 60.0,  # core.terminal.DEFAULT_DEADLINE_MARGIN (tested equal)
        fail_on_partial: bool = False,
        accept_incomplete: bool = False,
        max_consecutive_errors: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", poll_interval)
        kwargs.setdefault("mode", "reschedule")
        # Airflow's own sensor timeout is only a backstop: the deadline below fires first and,
        # unlike it, cancels the batches still running.
        backstop = (timeout if timeout is not None else FALLBACK_TIMEOUT) + DEFER_GRACE.total_seconds()
        super().__init__(timeout=backstop, **kwargs)
        self.batch_ids = batch_ids
        self.fable_conn_id = fable_conn_id
        self.poll_interval = poll_interval
        self.deferrable = deferrable
        self.wait_timeout = timeout
        self.deadline_margin = deadline_margin
        self.fail_on_partial = fail_on_partial
        self.accept_incomplete = accept_incomplete
        self.max_consecutive_errors = max_consecutive_errors
        self._state: dict[str, Any] = {}
        self.link_batch_ids: list[str] | None = None
        #: Extra keyword arguments for the resume method (FableBatchOperator passes its manifest).
        self.defer_kwargs: dict[str, Any] | None = None

    @property
    def policy(self) -> TerminalPolicy:
        from airflow_provider_fable.core.terminal import TerminalPolicy

        return TerminalPolicy(
            fail_on_partial=self.fail_on_partial,
            accept_incomplete=self.accept_incomplete,
            known_incomplete=tuple(self._known_incomplete()),
        )

    def _known_incomplete(self) -> list[str]:
        """Batches the submit re-attached after they had ended canceled/expired (its manifest)."""
        value = self.batch_ids
        known = value.get("ended_incomplete") if isinstance(value, dict) else None
        return [b for b in known or () if isinstance(b, str)]

    # ------------------------------------------------------------ state across pokes
    def _load_state(self, context: Any) -> dict[str, Any]:
        """Errors in a row and the first poll time, surviving reschedules.

        In reschedule mode the operator is rebuilt for every poke, so an attribute forgets; the
        task state store (Airflow >= 3.3) keeps it per task instance. Without one (a bare
        ``poke({})`` call) the instance keeps it, which is right for poke mode.
        """
        store = _store(context)
        if store is not None:
            try:
                return dict(store.get(STATE_KEY) or {})
            except Exception as exc:  # noqa: BLE001 - the wait must not fail on bookkeeping
                self.log.warning("Could not read the task state store (%s); counting in memory", exc)
        return self._state

    def _save_state(self, context: Any, state: dict[str, Any]) -> None:
        self._state = state
        store = _store(context)
        if store is not None:
            try:
                store.set(STATE_KEY, state)
            except Exception as exc:  # noqa: BLE001
                self.log.warning("Could not write the task state store: %s", exc)

    # ------------------------------------------------------------ polling from a worker
    def _summaries(self, hook: FableHook, context: Any, state: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Current summaries, or None after a transient hiccup (poll again later).

        A 404 right after create (eventual consistency) or a 5xx must not fail a wait that the
        trigger would simply have retried; ``max_consecutive_errors`` in a row do.
        """
        from airflow_provider_fable.core.errors import FableError
        from airflow_provider_fable.triggers.batch import batch_summary, is_transient

        try:
            summaries = [batch_summary(hook.retrieve_batch(b)) for b in self._ids()]
        except FableError as exc:
            state["errors"] = int(state.get("errors", 0)) + 1
            self._save_state(context, state)
            if not is_transient(exc) or state["errors"] >= self.max_consecutive_errors:
                raise FableError(f"{exc} ({state['errors']} failed check(s) in a row)") from None
            self.log.warning(
                "Could not read batch status (%d in a row, will check again): %s", state["errors"], exc
            )
            return None
        if state.get("errors"):
            state["errors"] = 0
            self._save_state(context, state)
        return summaries

    def _ids(self) -> list[str]:
        from airflow_provider_fable.core.manifest import normalise_batch_ids

        ids = normalise_batch_ids(self.batch_ids)
        self.link_batch_ids = ids
        return ids

    def _deadline(self, state: dict[str, Any], summaries: list[dict[str, Any]]) -> float | None:
        from airflow_provider_fable.core.terminal import default_deadline

        if self.wait_timeout is not None:
            return float(state["first_poll"]) + self.wait_timeout
        return default_deadline(summaries, self.deadline_margin)

    def poke(self, context: Context) -> PokeReturnValue:
        from airflow_provider_fable.core.terminal import Progress
        from airflow_provider_fable.hooks.fable import FableHook

        state = self._load_state(context)
        if "first_poll" not in state:
            state["first_poll"] = time.time()
            self._save_state(context, state)
        hook = FableHook(self.fable_conn_id)
        try:
            summaries = self._summaries(hook, context, state)
            if summaries is None:
                return PokeReturnValue(is_done=False)
            verdict = self.policy.decide(
                summaries, now=time.time(), deadline=self._deadline(state, summaries)
            )
            if verdict is None:
                self.log.info("Waiting: %s", Progress().line(summaries, time.time()))
                return PokeReturnValue(is_done=False)
            if verdict.to_cancel:
                self._cancel(hook, verdict.to_cancel)
        finally:
            hook.close()
        return PokeReturnValue(is_done=True, xcom_value=self._finish(verdict, summaries, "worker"))

    def _finish(self, verdict: Verdict, summaries: list[dict[str, Any]], waited_in: str) -> dict[str, Any]:
        """Log the batches, then return the manifest or raise the verdict's failure."""
        from airflow_provider_fable.core.errors import FableError
        from airflow_provider_fable.retries import not_retried

        for s in summaries:
            self.log.info("Batch %s %s: %s", s["id"], s["processing_status"], s["request_counts"])
        if not verdict.ok:
            # The batches have ended (or were canceled at the deadline): a retry of this wait
            # would find them the same and fail the same, after retry_delay each time.
            raise not_retried(FableError(f"waiting for batches failed: {verdict.message}"))
        (self.log.warning if verdict.reason == "partial" else self.log.info)(verdict.message)
        manifest = self._manifest(summaries, waited_in)
        manifest["outcome"] = verdict.reason
        return manifest

    def _cancel(self, hook: FableHook, batch_ids: Sequence[str]) -> None:
        from airflow_provider_fable.core.errors import FableError

        for batch_id in batch_ids:
            try:
                hook.cancel_batch(batch_id)
            except FableError as exc:
                self.log.warning("Could not cancel batch %s (it may still be running): %s", batch_id, exc)

    # ------------------------------------------------------------ deferring
    def execute(self, context: Context) -> Any:
        from airflow_provider_fable.hooks.fable import FableHook

        ids = self._ids()
        self.log.info("Waiting for %d batch(es): %s", len(ids), ", ".join(ids))
        if not ids:
            self.log.info("No batches to wait for (the submit task found nothing to send)")
            return self._manifest([], "worker")
        if not self.deferrable:
            return super().execute(context)
        state: dict[str, Any] = {"first_poll": time.time()}
        hook = FableHook(self.fable_conn_id)
        try:
            summaries = self._summaries(hook, context, state)
        finally:
            hook.close()
        deadline = None
        if summaries is not None:
            deadline = self._deadline(state, summaries)
            verdict = self.policy.decide(summaries, now=time.time(), deadline=None)
            if verdict is not None:
                self.log.info("All %d batches already ended; not deferring", len(ids))
                return self._finish(verdict, summaries, "worker")
        elif self.wait_timeout is not None:
            deadline = state["first_poll"] + self.wait_timeout
        self.defer_wait(ids, deadline)

    def defer_wait(
        self, ids: list[str], deadline: float | None, method_name: str = "execute_complete"
    ) -> None:
        """Hand the wait to the triggerer (shared with :class:`FableBatchOperator`)."""
        from airflow_provider_fable.triggers.batch import FableBatchTrigger

        if deadline is None:
            timeout = timedelta(seconds=FALLBACK_TIMEOUT) + DEFER_GRACE
        else:
            timeout = timedelta(seconds=max(deadline - time.time(), 0.0)) + DEFER_GRACE
        self.log.info(
            "Deferring: %d batch(es) wait in the triggerer (poll every ~%ss; no worker slot held)",
            len(ids),
            self.poll_interval,
        )
        self.defer(
            trigger=FableBatchTrigger(
                batch_ids=ids,
                fable_conn_id=self.fable_conn_id,
                poll_interval=self.poll_interval,
                max_consecutive_errors=self.max_consecutive_errors,
                deadline=deadline,
                deadline_margin=self.deadline_margin,
                fail_on_partial=self.fail_on_partial,
                accept_incomplete=self.accept_incomplete,
                known_incomplete=self._known_incomplete() or None,
            ),
            method_name=method_name,
            kwargs=self.defer_kwargs,
            timeout=timeout,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        from airflow_provider_fable.core.errors import FableError
        from airflow_provider_fable.core.terminal import Verdict

        status = event.get("status")
        if status not in ("success", "failed"):
            raise FableError(f"waiting for batches {event.get('batch_ids')} failed: {event.get('message')}")
        verdict = Verdict(
            ok=status == "success", reason=event.get("reason", "ended"), message=event["message"]
        )
        manifest = self._finish(verdict, event["batches"], "trigger")
        manifest["polls"] = event.get("polls")
        return manifest

    def on_kill(self) -> None:
        """Killed while poking from a worker: cancel the batches (the trigger does it when deferred)."""
        from airflow_provider_fable.core.manifest import normalise_batch_ids
        from airflow_provider_fable.hooks.fable import FableHook

        try:
            ids = self.link_batch_ids or normalise_batch_ids(self.batch_ids)
        except ValueError:
            return
        self.log.info("Task killed: canceling batches %s", ", ".join(ids))
        hook = FableHook(self.fable_conn_id)
        try:
            self._cancel(hook, ids)
        finally:
            hook.close()

    @staticmethod
    def _manifest(summaries: list[dict[str, Any]], waited_in: str) -> dict[str, Any]:
        return {"batch_ids": [s["id"] for s in summaries], "batches": summaries, "waited_in": waited_in}


def _store(context: Any) -> Any:
    try:
        return context.get("task_state_store")
    except AttributeError:
        return None

"""What the load operator tells the outside world besides its rows: the report log and lineage.

Kept apart from ``operators/load.py`` as a mixin so the load's own logic stays where it is; the
load calls :meth:`ObservedLoadMixin._fable_report_load` once its rows are committed. Nothing here
is imported at module level beyond typing: DAG parsing stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ObservedLoadMixin:
    """Records each load in the ledger's ``fable_job_loads`` (cost, reasons, distributions)."""

    log: Any
    qa_size: int
    qa_table: str | None
    table: str | None

    def _fable_report_load(
        self, ledger: Any, batch_ids: Sequence[str], summary: Mapping[str, Any], context: Any
    ) -> None:
        """One row per load, under the job of its batches (the Backlogs page and ``airflow fable``).

        A load of batches from several jobs is recorded under the job owning most of them (cost and
        counts are the load's totals). Batches the ledger does not know record nothing. A failure
        here never fails the load: the rows are committed and the ledger's verdicts are written.
        """
        if ledger is None:
            return
        try:
            from collections import Counter

            from airflow_provider_fable.core.report import Report

            jobs = Counter()
            for batch_id in batch_ids:
                sub = ledger.submission_for_batch(batch_id)
                if sub is not None:
                    jobs[sub.job_id] += 1
            if not jobs:
                return
            job_id = jobs.most_common(1)[0][0]
            manifest = self._submit_manifest() if hasattr(self, "_submit_manifest") else {}
            estimate = (manifest or {}).get("estimate") or {}
            ti = context.get("ti") if isinstance(context, Mapping) else None
            run_key = None
            if ti is not None:
                run_key = f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{getattr(ti, 'map_index', -1)}"
            qa_table = None
            if self.qa_size and summary.get("table"):
                qa_table = self.qa_table or f"{summary['table']}_qa"
            Report(ledger).record_load(
                job_id,
                run_key=run_key,
                summary=summary,
                batch_ids=list(batch_ids),
                estimated_cost_usd=estimate.get("cost_usd"),
                qa_table=qa_table,
            )
        except Exception as exc:  # noqa: BLE001 - reporting is information, never a failed load
            self.log.warning("Could not record this load in the ledger's report table: %s", exc)

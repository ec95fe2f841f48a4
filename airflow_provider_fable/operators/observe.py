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

    def _fable_after_load(
        self, ledger: Any, batch_ids: Sequence[str], summary: Mapping[str, Any], context: Any
    ) -> None:
        """After the rows are committed: the report row, then the tables' Asset events."""
        self._fable_report_load(ledger, batch_ids, summary, context)
        emit = getattr(self, "_fable_emit_assets", None)
        if emit is not None:
            emit(context, summary)

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

            jobs: Counter[str] = Counter()
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
            report = Report(ledger)
            report.record_load(
                job_id,
                run_key=run_key,
                summary=summary,
                batch_ids=list(batch_ids),
                estimated_cost_usd=estimate.get("cost_usd"),
                qa_table=qa_table,
                destination_conn_id=getattr(self, "destination_conn_id", None),
            )
            # Counts as of now for the page, of this job and of the job whose rejects it may supersede.
            parent = (ledger.job(job_id) or {}).get("parent_job")
            report.snapshot_counts([job_id, parent])  # type: ignore[list-item]  # None is skipped
        except Exception as exc:  # noqa: BLE001 - reporting is information, never a failed load
            self.log.warning("Could not record this load in the ledger's report table: %s", exc)


def _static(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "{{" not in value and "{%" not in value


class LineageLoadMixin:
    """Assets (an AssetAlias resolved at run time) and OpenLineage facets of the load operator."""

    log: Any
    outlets: Any
    destination_conn_id: str | None
    table: str | None
    rejects_table: str | None
    id_column: str
    id_column_type: str | None
    output_model: Any

    def _fable_default_outlets(self) -> None:
        """Declare ``AssetAlias(fable_table_alias_name(conn, table))`` unless outlets were given.

        Called from ``__init__``: only names, no connection read (DAG parse time). A templated table
        or connection has no stable name at parse time, so it declares nothing.
        """
        if self.outlets or not (_static(self.destination_conn_id) and _static(self.table)):
            return
        from airflow.sdk import AssetAlias

        from airflow_provider_fable.lineage import fable_table_alias_name

        self.outlets = [
            AssetAlias(name=fable_table_alias_name(str(self.destination_conn_id), str(self.table)))
        ]

    def _fable_tables(self, table: str, rejects_table: str | None) -> tuple[Any, Any]:
        """(destination, rejects) ``core.lineage.TableName`` from the destination connection."""
        from airflow.sdk import BaseHook

        from airflow_provider_fable.core.lineage import table_name_from_connection

        conn = BaseHook.get_connection(str(self.destination_conn_id))
        return (
            table_name_from_connection(conn, table),
            table_name_from_connection(conn, rejects_table or f"{table}_rejects"),
        )

    def _fable_emit_assets(self, context: Any, summary: Mapping[str, Any]) -> None:
        """Attach the destination and rejects Assets to the declared alias (after the rows are in)."""
        if not self.destination_conn_id or not summary.get("table"):
            return
        from airflow.sdk import Asset, AssetAlias

        from airflow_provider_fable.lineage import fable_table_alias_name

        wanted = fable_table_alias_name(str(self.destination_conn_id), str(self.table))
        aliases = [o for o in (self.outlets or []) if isinstance(o, AssetAlias) and o.name == wanted]
        events = context.get("outlet_events") if isinstance(context, Mapping) else None
        if not aliases or events is None:
            return
        dest, rejects = self._fable_tables(summary["table"], summary.get("rejects_table"))
        counts = {k: summary.get(k) for k in ("accepted", "rejected")}
        for alias in aliases:
            events[alias].add(Asset(uri=dest.uri), extra={"table": "destination", **counts})
            events[alias].add(Asset(uri=rejects.uri), extra={"table": "rejects", **counts})
        self.log.info("Lineage: emitted %s and %s", dest.uri, rejects.uri)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: outputs = the destination and rejects tables with their schema."""
        from airflow.providers.openlineage.extractors import OperatorLineage

        if not self.destination_conn_id or not self.table:
            return OperatorLineage()
        from airflow_provider_fable.core.job import import_output_model
        from airflow_provider_fable.core.lineage import REJECTS_SCHEMA, destination_schema

        dest, rejects = self._fable_tables(str(self.table), self.rejects_table)
        model = import_output_model(self.output_model)
        schema = destination_schema(model, id_column=self.id_column, id_type=self.id_column_type or "text")
        return OperatorLineage(
            outputs=[_ol_dataset(dest, schema), _ol_dataset(rejects, REJECTS_SCHEMA)],
        )


class LineageSubmitMixin:
    """OpenLineage facets of the submit operator: the SQL source's tables in, the destination out."""

    sql: Any
    sql_conn_id: str | None
    destination_conn_id: str | None
    destination_table: str | None
    output_model: Any

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        from airflow.providers.openlineage.extractors import OperatorLineage

        inputs, outputs = [], []
        if self.sql and self.sql_conn_id:
            from airflow.sdk import BaseHook
            from openlineage_sql import parse

            from airflow_provider_fable.core.lineage import table_name_from_connection

            conn = BaseHook.get_connection(self.sql_conn_id)
            dialect = "postgres" if conn.conn_type in ("postgres", "postgresql") else "sqlite"
            meta = parse([str(self.sql)], dialect=dialect)
            for t in meta.in_tables if meta else []:
                name = f"{t.schema}.{t.name}" if t.schema else t.name
                inputs.append(_ol_dataset(table_name_from_connection(conn, name), None))
        if self.destination_conn_id and self.destination_table:
            from airflow.sdk import BaseHook

            from airflow_provider_fable.core.job import import_output_model
            from airflow_provider_fable.core.lineage import destination_schema, table_name_from_connection

            conn = BaseHook.get_connection(self.destination_conn_id)
            schema = destination_schema(
                import_output_model(self.output_model), id_column=getattr(self, "destination_id_column", "id")
            )
            outputs.append(_ol_dataset(table_name_from_connection(conn, self.destination_table), schema))
        return OperatorLineage(inputs=inputs, outputs=outputs)


def _ol_dataset(table: Any, schema: list[tuple[str, str]] | None) -> Any:
    from airflow.providers.common.compat.openlineage.facet import (
        Dataset,
        SchemaDatasetFacet,
        SchemaDatasetFacetFields,
    )

    facets: dict[str, Any] = {}
    if schema:
        facets["schema"] = SchemaDatasetFacet(
            fields=[SchemaDatasetFacetFields(name=n, type=t) for n, t in schema]
        )
    return Dataset(namespace=table.namespace, name=table.name, facets=facets)

"""``airflow fable estimate <dag_id> [--conf JSON]``: projected cost per stage, nothing paid.

For every ``FableBatchSubmitOperator`` of the DAG (in task order) the command does what the task
does before its first create, and stops there: templates rendered as for a manual run with the
given conf (params), the source read, every record turned into its request and spooled into
shards (so bad records fail here, naming the record), then the estimate the task would log
(``count_tokens`` on a seeded sample, which the API does not bill; output from the latest pilot
or ``max_tokens``). No ledger intent, no batch: nothing is paid and nothing is recorded.

A DAG built on the backlog unit (``airflow_provider_fable.backlog.Backlog``) is estimated by the
unit's own estimate-only run instead: the DAG runs once in this process (``dag.test``) with the
given conf plus ``estimate_only: true``: the unit selects the run's records and projects every
stage (measured cost per request of earlier answers, else an upper bound; later stages at the
escalation rate of the last pilot, else every record), then stops before any submit. It pays
nothing and records one DAG run with that conf, so the figure is exactly what the run would select.

Limits of the plain-operator path, stated plainly: a stage whose source is written by an upstream
task of the same run (a work table keyed by ``run_id``) sees no records here; ``rerun=``/``skip_done`` selections, which
the ledger decides at run time, are not applied (the figure is for every record the source
yields); ``max_cost_usd`` is reported against the estimate instead of refusing.
"""

from __future__ import annotations

import json
import sys
import tempfile
from types import SimpleNamespace
from typing import Any


def _context(dag: Any, conf: dict[str, Any]) -> dict[str, Any]:
    params = {k: dag.params[k] for k in dag.params}
    params.update(conf)
    run = SimpleNamespace(run_type="manual", conf=conf, run_id="fable_estimate", logical_date=None)
    return {
        "dag": dag, "params": params, "dag_run": run, "run_id": run.run_id, "conf": conf,
        "data_interval_start": None, "data_interval_end": None, "logical_date": None, "ds": None,
        "ds_nodash": None, "ti": None, "task_instance": None,
    }  # fmt: skip


def estimate_task(op: Any, context: dict[str, Any]) -> dict[str, Any]:
    """The estimate of one submit task (rendered, spooled, counted); nothing is created."""
    from airflow_provider_fable.core.requests import build_requests
    from airflow_provider_fable.core.sharding import MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH
    from airflow_provider_fable.core.spool import spool_requests
    from airflow_provider_fable.hooks.fable import FableHook
    from airflow_provider_fable.hooks.sql import sqlalchemy_engine
    from airflow_provider_fable.operators.guarded import opt_float

    op.render_template_fields(context)
    cap = opt_float(op.max_cost_usd, "max_cost_usd")
    op.max_cost_usd = None  # report against the cap; never refuse (nothing would be paid anyway)
    hook = FableHook(op.fable_conn_id)
    engine = sqlalchemy_engine(op.sql_conn_id) if op.sql is not None else None
    try:
        job = op.build_job(hook)
        skipped: list[Any] = []
        op.skipped = skipped
        with tempfile.TemporaryFile(prefix="fable-estimate-") as spool:
            requests = build_requests(job, op.iter_source(engine), skipped=skipped)
            shards = spool_requests(
                requests,
                spool,
                max_requests=op.max_requests_per_batch or MAX_REQUESTS_PER_BATCH,
                max_bytes=op.max_bytes_per_batch or MAX_BATCH_BYTES,
            )
            guarded = op._estimate_before_submit(hook, job, spool, [(s.offset, s.count) for s in shards])
        est = guarded.get("estimate") or {}
        return {
            "task_id": op.task_id,
            "model": job.model,
            "records": sum(s.count for s in shards),
            "batches": len(shards),
            "input_tokens": est.get("input_tokens"),
            "output_tokens": est.get("output_tokens"),
            "output_basis": est.get("output_basis"),
            "cost_usd": est.get("cost_usd"),
            "max_cost_usd": cap,
            "within_budget": None
            if cap is None or est.get("cost_usd") is None
            else est["cost_usd"] <= float(cap),
        }
    finally:
        hook.close()
        if engine is not None:
            engine.dispose()


def run_estimate(args: Any) -> None:
    """Estimate every stage; the task's own log lines go to stderr, the result alone to stdout."""
    import os

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # whatever logs to stdout during the work (DagBag, the task logger) lands on stderr
    try:
        text = _estimate(args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    sys.stdout.write(text)


def _estimate(args: Any) -> str:
    from airflow_provider_fable._compat import dagbag_class
    from airflow_provider_fable.core import report as rp
    from airflow_provider_fable.operators.submit import FableBatchSubmitOperator

    conf = json.loads(args.conf) if args.conf else {}
    if not isinstance(conf, dict):
        raise SystemExit("error: --conf must be a JSON object")
    from airflow import settings

    bag = dagbag_class()(dag_folder=settings.DAGS_FOLDER)
    dag = bag.get_dag(args.dag_id)
    if dag is None:
        raise SystemExit(
            f"error: no DAG {args.dag_id!r} in the dags folder (import errors: {bag.import_errors})"
        )
    submits = [t for t in dag.topological_sort() if isinstance(t, FableBatchSubmitOperator)]
    if not submits:
        raise SystemExit(f"error: DAG {args.dag_id!r} has no FableBatchSubmitOperator")
    units = {op.spec["backlog_id"]: op.spec for op in submits if _is_unit_stage(op)}  # type: ignore[attr-defined]
    rows = [row for backlog_id in units for row in _estimate_unit(dag, backlog_id, conf)]
    for op in submits:
        if _is_unit_stage(op):
            continue
        try:
            rows.append(estimate_task(op, _context(dag, conf)))
        except Exception as exc:  # noqa: BLE001 - one stage's failure is reported, the others still run
            rows.append({"task_id": op.task_id, "error": f"{type(exc).__name__}: {exc}"})
    total = sum(r.get("cost_usd") or 0.0 for r in rows)
    columns = ("task_id", "model", "records", "batches", "input_tokens", "output_tokens", "output_basis",
               "cost_usd", "max_cost_usd", "within_budget", "error")  # fmt: skip
    if args.output == "json":
        return rp.as_json({"dag_id": args.dag_id, "stages": rows, "total_cost_usd": total}) + "\n"
    if args.output == "csv":
        return rp.as_csv(rows, columns)
    return rp.as_table(rows, columns) + f"\nprojected total: ${total:,.4f} (nothing was submitted)\n"


def _is_unit_stage(op: Any) -> bool:
    from airflow_provider_fable.backlog.unit import BacklogStageSubmit

    return isinstance(op, BacklogStageSubmit) and isinstance(getattr(op, "spec", None), dict)


def _estimate_unit(dag: Any, backlog_id: str, conf: dict[str, Any]) -> list[dict[str, Any]]:
    """The backlog unit's estimate-only run: its projection per stage (``<backlog>.project``)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    run = dag.test(run_conf={**conf, "estimate_only": True})

    def output(task_id: str) -> Any:
        with create_session() as session:
            row = (
                session.query(XComModel)
                .filter_by(dag_id=dag.dag_id, run_id=run.run_id, task_id=task_id, key="return_value")
                .one_or_none()
            )
            return XComModel.deserialize_value(row) if row is not None else None

    # A unit with a pilot projects in its ``project`` task; without one, ``select`` does.
    task_id = f"{backlog_id}.project"
    projected = output(task_id) or (output(f"{backlog_id}.select") or {}).get("projection")
    if not projected:
        return [{"task_id": task_id, "error": f"the estimate-only run {run.run_id} ended {run.state} without a projection"}]
    return [
        {
            "task_id": f"{backlog_id}.{stage['stage']}",
            "model": stage["model"],
            "records": stage["requests"],
            "batches": None,
            "output_basis": stage["basis"],
            "cost_usd": stage["projected_cost_usd"],
            "max_cost_usd": conf.get("budget_usd", dag.params.get("budget_usd")),
            "within_budget": None,
        }
        for stage in projected["stages"]
    ]


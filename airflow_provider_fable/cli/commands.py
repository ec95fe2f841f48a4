"""The bodies of ``airflow fable ...`` (imported only when a fable command runs)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from airflow_provider_fable.core import report as rp

_JOB_COLUMNS = (
    "job_id", "dag_id", "stage", "model", *rp.STATUSES, "superseded", "total", "estimated_cost_usd",
    "cost_usd", "last_activity",
)  # fmt: skip
_RECORD_COLUMNS = ("record_id", "status", "reason", "retryable", "attempts", "batch_id", "updated_at")

def _stderr_logger() -> logging.Logger:
    """The commands' own notes ("Job ledger: connection ...") on stderr, never on stdout.

    Why: stdout carries the report (``-o json`` piped into ``jq``), and Airflow 3.2's CLI logging
    sends records that reach the root logger to stdout, which broke the JSON.
    """
    logger = logging.getLogger("airflow_provider_fable.cli")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


_quiet = _stderr_logger()


def _report(args: Any) -> rp.Report:
    from airflow_provider_fable.hooks.ledger import open_ledger

    return rp.Report(open_ledger(args.ledger_conn_id, args.fable_conn_id, _quiet))


def _emit(rows: list[dict[str, Any]], columns: tuple[str, ...], output: str, whole: Any = None) -> None:
    if output == "json":
        text = rp.as_json(rows if whole is None else whole)
    elif output == "csv":
        text = rp.as_csv(rows, columns)
    else:
        text = rp.as_table(rows, columns)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _run(fn: Any) -> None:
    try:
        fn()
    except rp.ReportError as exc:
        raise SystemExit(f"error: {exc}") from None


def jobs(args: Any) -> None:
    def go() -> None:
        r = _report(args)
        try:
            rows = r.jobs(dag_id=args.dag_id, limit=args.limit)
        finally:
            r.engine.dispose()
        _emit([rp.flat_job(x) for x in rows], _JOB_COLUMNS, args.output, whole=rows)

    _run(go)


def status(args: Any) -> None:
    def go() -> None:
        r = _report(args)
        try:
            st = r.status(args.job)
        finally:
            r.engine.dispose()
        if args.output == "json":
            _emit([], (), "json", whole=st)
            return
        if args.output == "csv":
            rows = [{"batch_id": b["batch_id"], "state": b["state"], "stage": b["stage"],
                     "request_count": b["request_count"], **b["counts"]} for b in st["batches"]]  # fmt: skip
            _emit(rows, ("batch_id", "state", "stage", "request_count", *rp.STATUSES), "csv")
            return
        out = sys.stdout
        out.write(f"job {st['job_id']}  model {st['model']}  dag {st['dag_id']}  stage {st['stage']}\n")
        out.write(
            "records: "
            + "  ".join(f"{k}={st['counts'].get(k, 0)}" for k in (*rp.STATUSES, "superseded", "total"))
            + "\n"
        )
        out.write(f"cost: estimated {_money(st['estimated_cost_usd'])}  actual {_money(st['cost_usd'])}\n\n")
        rows = [{"batch_id": b["batch_id"], "state": b["state"], "stage": b["stage"],
                 "request_count": b["request_count"], **b["counts"]} for b in st["batches"]]  # fmt: skip
        _emit(rows, ("batch_id", "state", "stage", "request_count", *rp.STATUSES), "table")
        if st["reject_reasons"]:
            out.write("\ntop reject reasons:\n")
            _emit(st["reject_reasons"][:10], ("reason", "count"), "table")

    _run(go)


def _money(v: Any) -> str:
    return "-" if v is None else f"${v:.4f}"


def failed(args: Any) -> None:
    def go() -> None:
        r = _report(args)
        try:
            rows = r.failed(args.job, retryable_only=args.retryable)
        finally:
            r.engine.dispose()
        _emit(rows, _RECORD_COLUMNS, args.output)

    _run(go)


def review(args: Any) -> None:
    def go() -> None:
        r = _report(args)
        try:
            rows = r.review(args.job, limit=args.limit)
        finally:
            r.engine.dispose()
        _emit(rows, _RECORD_COLUMNS, args.output)

    _run(go)


def estimate(args: Any) -> None:
    from airflow_provider_fable.cli.estimate import run_estimate

    run_estimate(args)

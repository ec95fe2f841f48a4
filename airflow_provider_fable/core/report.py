"""What a backlog looks like from the ledger: the queries behind ``airflow fable ...`` and the
Backlogs page.

Why a module of its own: the CLI, the web page and tests all ask the same questions (which jobs
exist, where each stands, what failed and why, what it cost against the estimate), and the
answers must agree. Everything here is SQLAlchemy Core over :class:`~core.ledger.Ledger`'s tables
plus one table of its own, ``fable_job_loads`` (one row per load of a job: counts, cost, estimate,
reject reasons, value distributions, destination tables), written by the load operator after its
rows are committed. The ledger's own tables are not changed, so its schema version stays.

No Airflow import: the CLI and the plugin are thin shells that find the ledger's engine.
Queries are grouped aggregates (one ``GROUP BY`` per question) so a ledger of millions of records
answers a page in one scan of the records' ``job_id`` index.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from airflow_provider_fable.core.ledger import Ledger, _ts, utcnow

#: Record statuses a report counts, in display order. ``needs_review`` is written by the load
#: when an answer is stored but flagged for a human (a status the ledger accepts as any string).
STATUSES = ("pending", "submitted", "accepted", "rejected", "needs_review")
NEEDS_REVIEW = "needs_review"

LOADS_TABLE = "fable_job_loads"
SNAPSHOTS_TABLE = "fable_job_counts"


from airflow_provider_fable.exceptions import ReportError as ReportError  # noqa: E402  (moved there)


def _loads_table(meta: sa.MetaData) -> sa.Table:
    text = sa.Text
    return sa.Table(
        LOADS_TABLE,
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False, index=True),
        sa.Column("run_key", text),  # dag_id/run_id/task_id/map_index of the load task
        sa.Column("at", text, nullable=False),
        sa.Column("batch_ids", text),  # JSON list
        sa.Column("accepted", sa.Integer),
        sa.Column("rejected", sa.Integer),
        sa.Column("cost_usd", sa.Float),
        sa.Column("estimated_cost_usd", sa.Float),
        sa.Column("destination", text),  # table name (or Parquet path)
        sa.Column("destination_conn_id", text),  # where the page reads reject details and the QA sample
        sa.Column("rejects_table", text),
        sa.Column("qa_table", text),
        sa.Column("reject_reasons", text),  # JSON {reason: count}
        sa.Column("distribution", text),  # JSON {field: {value: count}}
    )


def _snapshots_table(meta: sa.MetaData) -> sa.Table:
    return sa.Table(
        SNAPSHOTS_TABLE,
        meta,
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("counts", sa.Text, nullable=False),  # JSON {status: n, "superseded": n, "total": n}
        sa.Column("at", sa.Text, nullable=False),
    )


class Report:
    """Read-only questions over a ledger (plus the load log and count snapshots this module writes)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.engine = ledger.engine
        self.loads = _loads_table(ledger.metadata)
        self.snapshots = _snapshots_table(ledger.metadata)
        self._ready = False

    def ensure_schema(self) -> Report:
        if not self._ready:
            self.ledger.ensure_schema()
            self.loads.create(self.engine, checkfirst=True)
            self.snapshots.create(self.engine, checkfirst=True)
            self._ready = True
        return self

    def snapshot_counts(self, job_ids: Iterable[str]) -> None:
        """Store the jobs' current counts (the load calls it for its job and that job's parent).

        Counting a job reads its records through the primary key's ``job_id`` prefix; the Backlogs
        page then reads 200 jobs' counts from 200 rows instead of aggregating every record.
        """
        self.ensure_schema()
        ids = [j for j in dict.fromkeys(job_ids) if j]
        if not ids:
            return
        counts = self._counts(ids)
        now = _ts(utcnow())
        with self.engine.begin() as conn:
            for job_id in ids:
                row = {"job_id": job_id, "counts": json.dumps(counts.get(job_id, _zero_counts())), "at": now}
                conn.execute(
                    self.ledger._insert(self.snapshots)
                    .values(**row)
                    .on_conflict_do_update(
                        index_elements=["job_id"], set_={"counts": row["counts"], "at": now}
                    )
                )

    # ------------------------------------------------------------------ writing
    def record_load(self, job_id: str, *, run_key: str | None, summary: Mapping[str, Any],
                    batch_ids: Sequence[str], estimated_cost_usd: float | None,
                    qa_table: str | None, destination_conn_id: str | None = None) -> None:  # fmt: skip
        """Remember one load of a job: what the page shows as cost, reasons and distributions."""
        self.ensure_schema()
        row = {
            "job_id": job_id,
            "run_key": run_key,
            "at": _ts(utcnow()),
            "batch_ids": json.dumps(list(batch_ids)),
            "accepted": int(summary.get("accepted") or 0),
            "rejected": int(summary.get("rejected") or 0),
            "cost_usd": _float(summary.get("cost_usd")),
            "estimated_cost_usd": _float(estimated_cost_usd),
            "destination": summary.get("table") or summary.get("parquet_path"),
            "rejects_table": summary.get("rejects_table"),
            "qa_table": qa_table,
            "destination_conn_id": destination_conn_id,
            "reject_reasons": json.dumps(summary.get("reject_reasons") or {}, default=str),
            "distribution": json.dumps(summary.get("distribution") or {}, default=str),
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.loads).values(**row))

    # ------------------------------------------------------------------ jobs
    def resolve_job(self, job: str) -> str:
        """A full job id from a full id or a unique prefix (fingerprints are long to type)."""
        self.ensure_schema()
        j = self.ledger.jobs.c
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(sa.select(j.job_id).where(j.job_id.startswith(job, autoescape=True)).limit(3))
                .scalars()
            )  # fmt: skip
        if job in ids:
            return job
        if not ids:
            raise ReportError(f"no job {job!r} in the ledger (see `airflow fable jobs`)")
        if len(ids) > 1:
            raise ReportError(f"job prefix {job!r} is ambiguous: {', '.join(ids)}, ...")
        return str(ids[0])

    def _counts(
        self, job_ids: Sequence[str] | None = None, last_update: dict[str, str] | None = None
    ) -> dict[str, dict[str, int]]:
        """Record counts per job and status; superseded rejects (a rerun accepted them) apart.

        One scan of the records (the jobs page's one expensive query); ``last_update`` is filled
        with each job's latest record change from the same scan.
        """
        c = self.ledger.records.c
        sup = c.superseded_by.is_not(None)
        q = sa.select(
            c.job_id, c.status, sup.label("sup"), sa.func.count(), sa.func.max(c.updated_at)
        ).group_by(c.job_id, c.status, sup)
        if job_ids is not None:
            q = q.where(c.job_id.in_(list(job_ids)))
        out: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for job_id, status, superseded, n, updated in conn.execute(q):
                key = "superseded" if superseded else status
                d = out.setdefault(job_id, _zero_counts())
                d[key] = d.get(key, 0) + int(n)
                if last_update is not None and updated and updated > last_update.get(job_id, ""):
                    last_update[job_id] = updated
        for d in out.values():
            d["total"] = sum(v for k, v in d.items() if k != "total")
        return out

    def _stages(self, job_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """DAG, stage (task id, with its task group prefix) and last submission of each job."""
        s = self.ledger.submissions.c
        q = sa.select(
            s.job_id, sa.func.max(s.run_key), sa.func.max(s.intent_at), sa.func.max(s.batch_at),
            sa.func.count(s.batch_id),
        ).group_by(s.job_id)  # fmt: skip
        if job_ids is not None:
            q = q.where(s.job_id.in_(list(job_ids)))
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for job_id, run_key, intent_at, batch_at, batches in conn.execute(q):
                dag_id, run_id, task_id = _split_run_key(run_key)
                out[job_id] = {
                    "dag_id": dag_id,
                    "stage": task_id,
                    "last_run_id": run_id,
                    "batches": int(batches or 0),
                    "last_submission_at": max(x for x in (intent_at, batch_at) if x) if intent_at else None,
                }
        return out

    def _costs(self, job_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        lo = self.loads.c
        q = sa.select(
            lo.job_id, sa.func.sum(lo.cost_usd), sa.func.max(lo.estimated_cost_usd), sa.func.max(lo.at),
            sa.func.count(),
        ).group_by(lo.job_id)  # fmt: skip
        if job_ids is not None:
            q = q.where(lo.job_id.in_(list(job_ids)))
        with self.engine.connect() as conn:
            return {
                job_id: {
                    "cost_usd": _round(cost),
                    "estimated_cost_usd": _round(est),
                    "last_load_at": at,
                    "loads": int(n),
                }
                for job_id, cost, est, at, n in conn.execute(q)
            }

    def jobs(
        self, *, dag_id: str | None = None, limit: int | None = None, fast: bool = False
    ) -> list[dict[str, Any]]:
        """Every job, newest activity first: DAG, stage, model, counts by status, cost vs estimate.

        ``fast=False`` (the CLI) counts every record. ``fast=True`` (the Backlogs page) takes a job's
        counts from its last snapshot (written at the end of each load) when that snapshot is still
        true, i.e. it holds nothing in flight (no pending or submitted record) and no submission of
        the job is newer; other jobs are counted live, through the ``job_id`` index.
        """
        self.ensure_schema()
        j = self.ledger.jobs.c
        with self.engine.connect() as conn:
            jobs = [
                dict(r)
                for r in conn.execute(sa.select(j.job_id, j.model, j.parent_job, j.created_at)).mappings()
            ]
        stages, costs = self._stages(), self._costs()
        last_update: dict[str, str] = {}
        if fast:
            counts, snapped_at = self._snapshot_counts(stages)
            stale = [job["job_id"] for job in jobs if job["job_id"] not in counts]
            if stale:
                counts.update(
                    self._counts(stale if len(stale) < len(jobs) else None, last_update=last_update)
                )
            last_update.update({k: v for k, v in snapped_at.items() if k not in last_update})
        else:
            counts = self._counts(last_update=last_update)
        out = []
        for job in jobs:
            jid = job["job_id"]
            stage = stages.get(jid, {})
            if dag_id is not None and stage.get("dag_id") != dag_id:
                continue
            cost = costs.get(jid, {})
            activity = [
                x for x in (job["created_at"], stage.get("last_submission_at"), cost.get("last_load_at"),
                            last_update.get(jid)) if x
            ]  # fmt: skip
            out.append(
                {
                    **job,
                    "dag_id": stage.get("dag_id"),
                    "stage": stage.get("stage"),
                    "batches": stage.get("batches", 0),
                    "counts": counts.get(jid, _zero_counts()),
                    "cost_usd": cost.get("cost_usd"),
                    "estimated_cost_usd": cost.get("estimated_cost_usd"),
                    "last_activity": max(activity),
                }
            )
        out.sort(key=lambda r: r["last_activity"], reverse=True)
        return out[:limit] if limit else out

    def _snapshot_counts(
        self, stages: Mapping[str, Mapping[str, Any]]
    ) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        """The snapshots still true (nothing in flight, no newer submission), and when each was taken."""
        sn = self.snapshots.c
        fresh: dict[str, dict[str, int]] = {}
        at: dict[str, str] = {}
        with self.engine.connect() as conn:
            for job_id, counts_json, taken in conn.execute(sa.select(sn.job_id, sn.counts, sn.at)):
                counts = json.loads(counts_json)
                last_sub = (stages.get(job_id) or {}).get("last_submission_at")
                if counts.get("pending") or counts.get("submitted") or (last_sub and last_sub > taken):
                    continue
                fresh[job_id], at[job_id] = counts, taken
        return fresh, at

    # ------------------------------------------------------------------ one job
    def status(self, job: str) -> dict[str, Any]:
        """One job: its counts, each batch's progress, reject reasons, cost, loads."""
        job_id = self.resolve_job(job)
        base = self.ledger.job(job_id) or {}
        c, s = self.ledger.records.c, self.ledger.submissions.c
        with self.engine.connect() as conn:
            per_batch: dict[str | None, dict[str, int]] = {}
            for batch_id, status, n in conn.execute(
                sa.select(c.batch_id, c.status, sa.func.count())
                .where(c.job_id == job_id, c.superseded_by.is_(None))
                .group_by(c.batch_id, c.status)
            ):
                per_batch.setdefault(batch_id, {})[status] = int(n)
            subs = conn.execute(
                sa.select(s.id, s.run_key, s.shard, s.state, s.batch_id, s.request_count, s.intent_at,
                          s.batch_at).where(s.job_id == job_id).order_by(s.id)
            ).mappings().all()  # fmt: skip
        batches = []
        for sub in subs:
            dag_id, run_id, task_id = _split_run_key(sub["run_key"])
            batches.append(
                {
                    "batch_id": sub["batch_id"],
                    "state": sub["state"],
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "stage": task_id,
                    "shard": sub["shard"],
                    "request_count": sub["request_count"],
                    "intent_at": sub["intent_at"],
                    "counts": per_batch.get(sub["batch_id"], {}) if sub["batch_id"] else {},
                }
            )
        counts = self._counts([job_id]).get(job_id, _zero_counts())
        cost = self._costs([job_id]).get(job_id, {})
        stage = self._stages([job_id]).get(job_id, {})
        spec = base.get("spec")
        return {
            "job_id": job_id,
            "model": base.get("model"),
            "parent_job": base.get("parent_job"),
            "created_at": base.get("created_at"),
            "spec": json.loads(spec) if isinstance(spec, str) and spec else {},
            "dag_id": stage.get("dag_id"),
            "stage": stage.get("stage"),
            "counts": counts,
            "batches": batches,
            "reject_reasons": self.reject_reasons(job_id),
            "cost_usd": cost.get("cost_usd"),
            "estimated_cost_usd": cost.get("estimated_cost_usd"),
            "loads": self.loads_of(job_id),
        }

    def reject_reasons(self, job_id: str, *, examples: int = 0) -> list[dict[str, Any]]:
        """Current (not superseded) rejects of a job by reason, most frequent first."""
        c = self.ledger.records.c
        q = (
            sa.select(c.reason, sa.func.count().label("n"))
            .where(c.job_id == job_id, c.status == "rejected", c.superseded_by.is_(None))
            .group_by(c.reason)
            .order_by(sa.desc("n"), c.reason)
        )
        with self.engine.connect() as conn:
            rows = [{"reason": r or "", "count": int(n)} for r, n in conn.execute(q)]
            if examples:
                for row in rows[:10]:
                    row["examples"] = list(
                        conn.execute(
                            sa.select(c.record_id)
                            .where(c.job_id == job_id, c.status == "rejected", c.superseded_by.is_(None),
                                   c.reason == row["reason"] if row["reason"] else c.reason.is_(None))
                            .order_by(c.record_id)
                            .limit(examples)
                        ).scalars()
                    )  # fmt: skip
        return rows

    def loads_of(self, job_id: str) -> list[dict[str, Any]]:
        """Every recorded load of a job, oldest first (the cost-over-time series)."""
        self.ensure_schema()
        lo = self.loads.c
        with self.engine.connect() as conn:
            rows = (
                conn.execute(sa.select(self.loads).where(lo.job_id == job_id).order_by(lo.id))
                .mappings()
                .all()
            )
        out = []
        for r in rows:
            d = dict(r)
            for key in ("batch_ids", "reject_reasons", "distribution"):
                d[key] = json.loads(d[key]) if d.get(key) else ({} if key != "batch_ids" else [])
            out.append(d)
        return out

    def distribution(self, job_id: str) -> dict[str, dict[str, int]]:
        """Enum/bool value counts of a job's accepted answers, summed over its loads."""
        total: dict[str, dict[str, int]] = {}
        for load in self.loads_of(job_id):
            for field, values in (load.get("distribution") or {}).items():
                d = total.setdefault(field, {})
                for value, n in values.items():
                    d[str(value)] = d.get(str(value), 0) + int(n)
        return total

    def records(self, job: str, *, statuses: Iterable[str], retryable_only: bool = False,
                limit: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Current rows of a job's records with the given statuses (superseded ones left out)."""
        job_id = self.resolve_job(job)
        c = self.ledger.records.c
        q = (
            sa.select(c.record_id, c.status, c.reason, c.retryable, c.attempts, c.batch_id, c.custom_id,
                      c.updated_at)
            .where(c.job_id == job_id, c.status.in_(list(statuses)), c.superseded_by.is_(None))
            .order_by(c.record_id)
        )  # fmt: skip
        if retryable_only:
            q = q.where(c.retryable.is_(True))
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def failed(self, job: str, *, retryable_only: bool = False) -> list[dict[str, Any]]:
        """What a ``rerun="failed"`` (or ``"retryable"``) run of this job would send."""
        return self.records(job, statuses=["rejected"], retryable_only=retryable_only)

    def review(self, job: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Records the load stored but flagged for a human (status ``needs_review``)."""
        return self.records(job, statuses=[NEEDS_REVIEW], limit=limit)


def _zero_counts() -> dict[str, int]:
    return {**dict.fromkeys(STATUSES, 0), "superseded": 0, "total": 0}


def _split_run_key(run_key: str | None) -> tuple[str | None, str | None, str | None]:
    """``dag_id/run_id/task_id/map_index`` -> (dag_id, run_id, task_id).

    Run ids may hold ``/`` only in odd manual cases; the dag id and the task id cannot, so they
    are taken from both ends.
    """
    if not run_key:
        return None, None, None
    parts = run_key.split("/")
    if len(parts) < 4:
        return parts[0], None, None
    return parts[0], "/".join(parts[1:-2]), parts[-2]


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


# ---------------------------------------------------------------------- rendering (CLI)
def as_json(rows: Any) -> str:
    return json.dumps(rows, indent=2, sort_keys=True, default=str)


def as_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k in columns])
    return buf.getvalue()


def as_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table (no dependency; the CLI's default output)."""
    cells = [[str(c) for c in columns]] + [
        ["" if r.get(k) is None else str(r.get(k)) for k in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def flat_job(row: Mapping[str, Any]) -> dict[str, Any]:
    """A jobs row with its counts as top-level columns (for CSV and the text table)."""
    out = {k: v for k, v in row.items() if k != "counts"}
    out.update(row.get("counts") or {})
    return out

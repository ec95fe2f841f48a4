"""Server time of the Backlogs pages on a big ledger (PostgreSQL): 1,000,000 records, 200 jobs.

What is timed is what the API server does for one page once the user is authorised: the ledger
queries (``core.report``) and the HTML (``plugins.app``), with a warm connection pool as on a
running server. The jobs page aggregates every record (one ``GROUP BY job_id, status`` scan); a
job page reads one job's records through the primary key's ``job_id`` prefix. The baseline is the
plainest question one can ask the same table: ``SELECT status, count(*) FROM fable_records GROUP BY
status`` (one scan, no join, no HTML). Target: each page under 300 ms.

5 % of the jobs are in flight (records still ``submitted``: counted live), the others finished
(their counts come from the snapshot their last load wrote). The ledger is built server-side (``generate_series``) in a throwaway database, dropped at the end.
Options: ``--records 1000000 --jobs 200 --repeat 5``; ``FABLE_BENCH_PG_URL`` names the server.
Last line: ``bench ui: records=... jobs=... jobs_page_ms=... job_page_ms=... baseline_ms=...
vs_baseline=<jobs page / baseline>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

import sqlalchemy as sa

PG_URL = os.environ.get("FABLE_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def build(engine: sa.Engine, records: int, jobs: int) -> None:
    from airflow_provider_fable.core.ledger import Ledger
    from airflow_provider_fable.core.report import Report

    Report(Ledger(engine)).ensure_schema()
    per_job = records // jobs
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO fable_jobs (job_id, model, spec, created_at) "
                "SELECT md5('job' || j), 'claude-fable-5', '{}', '2026-12-01T00:00:00.000000Z' "
                "FROM generate_series(1, :jobs) j"
            ),
            {"jobs": jobs},
        )
        conn.execute(
            sa.text(
                "INSERT INTO fable_submissions (job_id, run_key, api, shard, request_count, byte_size, state, "
                "batch_id, intent_at, batch_at) "
                "SELECT md5('job' || j), 'backlog_' || (j % 20) || '/scheduled__' || j || '/submit/-1', "
                "'https://api', s, :half, 1000, 'created', 'msgbatch_' || j || '_' || s, "
                "'2026-12-01T00:00:00.000000Z', '2026-12-01T00:00:01.000000Z' "
                "FROM generate_series(1, :jobs) j, generate_series(1, 2) s"
            ),
            {"jobs": jobs, "half": per_job // 2},
        )
        conn.execute(
            sa.text(
                "INSERT INTO fable_records (job_id, record_id, custom_id, status, batch_id, submission_id, "
                "reason, retryable, attempts, model, created_at, updated_at) "
                "SELECT md5('job' || j), 'r' || i, 'r' || i, "
                "CASE WHEN i % 10 < 7 THEN 'accepted' WHEN i % 10 < 9 THEN 'rejected' "
                "     WHEN i % 20 = 9 THEN 'needs_review' WHEN j <= :in_flight THEN 'submitted' ELSE 'accepted' END, "
                "'msgbatch_' || j || '_' || (1 + i % 2), NULL, "
                "CASE WHEN i % 10 BETWEEN 7 AND 8 THEN (ARRAY['schema','invalid_json','errored'])[1 + i % 3] END, "
                "i % 10 = 7, 1, 'claude-fable-5', '2026-12-01T00:00:00.000000Z', "
                "'2026-12-01T00:00:02.000000Z' "
                "FROM generate_series(1, :jobs) j, generate_series(1, :per_job) i"
            ),
            {"jobs": jobs, "per_job": per_job, "in_flight": max(1, jobs // 20)},
        )
        dist = json.dumps({"category": {"billing": 300, "bug": 200, "other": 100}, "urgent": {"True": 50}})
        conn.execute(
            sa.text(
                "INSERT INTO fable_job_loads (job_id, run_key, at, batch_ids, accepted, rejected, cost_usd, "
                "estimated_cost_usd, destination, rejects_table, reject_reasons, distribution) "
                "SELECT md5('job' || j), 'backlog/run/load/-1', '2026-12-01T00:0' || k || '\\:00.000000Z', '[]', "
                ":acc, :rej, 1.25, 3.5, 'triage', 'triage_rejects', '{\"schema\": 10}', :dist "
                "FROM generate_series(1, :jobs) j, generate_series(1, 3) k"
            ),
            {"jobs": jobs, "acc": per_job * 7 // 30, "rej": per_job // 15, "dist": dist},
        )
    with engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
    # What each job's last load leaves behind (operators/observe.py): its counts as of then.
    report = Report(Ledger(engine))
    with engine.connect() as conn:
        job_ids = list(conn.execute(sa.text("SELECT job_id FROM fable_jobs")).scalars())
    report.snapshot_counts(job_ids)


def timed(fn, repeat: int) -> float:
    fn()  # warm: pool, plans, caches (a running server has them)
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from airflow_provider_fable.core.ledger import Ledger
    from airflow_provider_fable.core.report import Report
    from airflow_provider_fable.plugins import app as ui

    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"fable_bench_ui_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine = sa.create_engine(sa.engine.make_url(PG_URL).set(database=name))
    try:
        t = time.perf_counter()
        build(engine, args.records, args.jobs)
        print(
            f"built {args.records:,} records in {args.jobs} jobs in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        report = Report(Ledger(engine)).ensure_schema()
        ui._reports["bench"] = report  # what the server caches per ledger connection
        one_job = report.jobs()[len(report.jobs()) // 2]

        def jobs_page() -> str:
            return ui._jobs_html(report.jobs(fast=True), "bench")

        def job_page() -> str:
            return ui._job_html(ui._job_data("bench", one_job["dag_id"], one_job["job_id"]))

        def baseline() -> list:
            with engine.connect() as conn:
                return conn.execute(
                    sa.text("SELECT status, count(*) FROM fable_records GROUP BY status")
                ).all()

        assert f"{one_job['counts']['accepted']:,}" in job_page()
        jobs_ms = timed(jobs_page, args.repeat)
        live_ms = timed(lambda: ui._jobs_html(report.jobs(fast=False), "bench"), args.repeat)
        job_ms = timed(job_page, args.repeat)
        base_ms = timed(baseline, args.repeat)
        print(
            f"bench ui: records={args.records} jobs={args.jobs} jobs_page_ms={jobs_ms:.0f} "
            f"job_page_ms={job_ms:.0f} jobs_page_all_live_ms={live_ms:.0f} baseline_ms={base_ms:.0f} target_ms=300 "
            f"vs_baseline={jobs_ms / base_ms:.2f}",
            flush=True,
        )
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    main()

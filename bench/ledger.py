"""Benchmark: the job ledger's cost for a big backlog (100,000 and 1,000,000 records).

The ledger writes one row per record at submit (intent, then batch id) and one verdict per record
at load, and a retry reads every record's state to decide send/attach. This measures what that
costs against the cheapest way to put the same rows in the same tables.

Each (backend, records, path) runs in its own process, on a fresh ledger:

- ours, the calls the operators make for one job of N records: ``register_job``; per shard of
  100,000 requests (the API's limit) ``write_intent`` then ``write_batch``; a retry's look-up
  (``record_states`` over every id, 1,000 at a time, as ``_Submission._selected`` does); then the
  load's verdicts, ``record_outcomes`` per chunk of 10,000 (the load's chunk size), ~5 % rejects;
  then (timed apart, not in the rate) the id set a retry of a ``rerun=`` builds: the job's failed
  ids plus every id its run key sent. Peak RSS covers all of it.
- baseline: the same final rows of ``fable_records`` and ``fable_record_outcomes`` inserted with
  one plain DBAPI ``executemany`` each (no upsert, no status updates, no look-up), one
  transaction: the floor for "a row per record".

Peak RSS is the child's ``ru_maxrss``. Each pair prints ``bench ledger: backend=... records=...
ours_records_s=... baseline_records_s=... submit_s=... lookup_s=... outcomes_s=...
rerun_set_s=... ours_rss_mb=... baseline_rss_mb=... vs_baseline=...`` (vs_baseline = ours records/s over the
baseline's; < 1 means slower).

Run: ``.venv/bin/python bench/ledger.py`` (default 100,000 and 1,000,000 records on sqlite and
postgres). Options: ``--records 100000 --backends sqlite --pg-url URL``. PostgreSQL is skipped
with a note when no server answers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("FABLE_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
SHARD = 100_000
LOOKUP_CHUNK = 5_000  # the submit operator's _LEDGER_CHUNK
LOAD_CHUNK = 10_000
BASELINE_CHUNK = 100_000
JOB = "job-" + "0" * 60
RUN_KEY = "bench/run/submit/-1"
PHASES = ("submit", "lookup", "outcomes", "rerun")


def _engine(backend: str, where: str):
    import sqlalchemy as sa

    if backend == "sqlite":
        return sa.create_engine(f"sqlite:///{where}"), None
    schema = f"fable_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = sa.create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    return engine, drop


def _ids(start: int, stop: int) -> list[str]:
    """Ids of records ``start..stop-1``: made per chunk, so the bench holds no list of all N."""
    return [f"rec-{i:08d}" for i in range(start, stop)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(backend: str, n: int, where: str) -> dict:
    from airflow_provider_fable.core.ledger import Ledger, Outcome

    engine, drop = _engine(backend, where)
    try:
        ledger = Ledger(engine).ensure_schema()
        out: dict = {}
        t0 = time.perf_counter()
        ledger.register_job(JOB, model="claude-fable-5")
        batches = []
        for s, start in enumerate(range(0, n, SHARD), 1):
            rows = [(rid, rid, "d" * 64) for rid in _ids(start, min(n, start + SHARD))]
            sub = ledger.write_intent(
                JOB, run_key=RUN_KEY, shard=s, records=rows, byte_size=len(rows) * 900,
                model="claude-fable-5", api="http://bench", digest=f"{s:064d}",
            )  # fmt: skip
            del rows
            batch_id = f"msgbatch_bench_{s:06d}"
            ledger.write_batch(sub.id, batch_id)
            batches.append((batch_id, start))
        t1 = time.perf_counter()
        out["rss_submit_mb"] = _rss_mb()
        # A retry's look-up: every record's state, LOOKUP_CHUNK ids per call (as _Submission._selected).
        attached = 0
        for start in range(0, n, LOOKUP_CHUNK):
            states = ledger.record_states(JOB, _ids(start, min(n, start + LOOKUP_CHUNK)))
            attached += sum(1 for st in states.values() if st.batch_id)
        assert attached == n, attached
        t2 = time.perf_counter()
        out["rss_lookup_mb"] = _rss_mb()
        for batch_id, start in batches:
            stop = min(n, start + SHARD)
            for c in range(start, stop, LOAD_CHUNK):
                outcomes = [
                    Outcome(rid, rid, "rejected", "invalid_answer", False, batch_id)
                    if (c + k) % 20 == 0
                    else Outcome(rid, rid, "accepted", None, False, batch_id)
                    for k, rid in enumerate(_ids(c, min(stop, c + LOAD_CHUNK)))
                ]
                ledger.record_outcomes(JOB, batch_id, outcomes)
        t3 = time.perf_counter()
        out["rss_outcomes_mb"] = _rss_mb()
        # A retry of a rerun: which ids it selects (the failed ids plus every id its run key sent),
        # asked per chunk as _Submission._rerun_ids does (no set of all ids is built).
        selected = 0
        for start in range(0, n, LOOKUP_CHUNK):
            selected += len(
                ledger.rerun_selected(
                    JOB, _ids(start, min(n, start + LOOKUP_CHUNK)), job_id=JOB, run_key=RUN_KEY
                )
            )
        assert selected == n, selected
        t4 = time.perf_counter()
        out["rss_rerun_mb"] = _rss_mb()
        summary = ledger.summary(JOB)
        assert summary == {"accepted": n - len(range(0, n, 20)), "rejected": len(range(0, n, 20))}, summary
        out.update(
            {
                "submit_s": t1 - t0,
                "lookup_s": t2 - t1,
                "outcomes_s": t3 - t2,
                "rerun_s": t4 - t3,
                "total_s": t3 - t0,
            }
        )
        return out
    finally:
        engine.dispose()
        if drop:
            drop()


def run_baseline(backend: str, n: int, where: str) -> dict:
    """The same final rows with plain DBAPI bulk inserts, ``BASELINE_CHUNK`` rows per call, one
    transaction: ``executemany`` on sqlite3, ``psycopg2.extras.execute_values`` (multi-row
    INSERT, the usual bulk idiom; psycopg2's ``executemany`` is a statement per row) on PostgreSQL."""
    from airflow_provider_fable.core.ledger import Ledger

    engine, drop = _engine(backend, where)
    try:
        Ledger(engine).ensure_schema()  # the same tables, indexes and keys
        t0 = time.perf_counter()
        now = "2026-01-01T00:00:00.000000Z"
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            records_sql = (
                "INSERT INTO fable_records (job_id, record_id, custom_id, status, batch_id, submission_id, "
                "request_digest, attempts, model, created_at, updated_at) VALUES "
            )
            outcomes_sql = (
                "INSERT INTO fable_record_outcomes (job_id, record_id, batch_id, status, reason, retryable, "
                "superseded, at) VALUES "
            )
            if backend == "sqlite":

                def bulk(sql: str, width: int, rows: list) -> None:
                    cur.executemany(sql + f"({', '.join(['?'] * width)})", rows)
            else:
                from psycopg2.extras import execute_values

                def bulk(sql: str, width: int, rows: list) -> None:
                    execute_values(cur, sql + "%s", rows, page_size=1000)

            for start in range(0, n, BASELINE_CHUNK):
                ids = _ids(start, min(n, start + BASELINE_CHUNK))
                bulk(records_sql, 11, [
                    (JOB, rid, rid, "accepted", f"msgbatch_bench_{(start + i) // SHARD + 1:06d}",
                     (start + i) // SHARD + 1, "d" * 64, 1, "claude-fable-5", now, now)
                    for i, rid in enumerate(ids)
                ])  # fmt: skip
                bulk(outcomes_sql, 8, [
                    (JOB, rid, f"msgbatch_bench_{(start + i) // SHARD + 1:06d}", "accepted", None, False, False, now)
                    for i, rid in enumerate(ids)
                ])  # fmt: skip
            raw.commit()
        finally:
            raw.close()
        return {"total_s": time.perf_counter() - t0}
    finally:
        engine.dispose()
        if drop:
            drop()


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fable-bench-ledger-") as tmp:
        where = str(Path(tmp) / "ledger.db")
        fn = run_ours if args.path == "ours" else run_baseline
        out = fn(args.backend, args.n, where)
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def measure(path: str, backend: str, n: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", path, "--backend", backend, "--n", str(n)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{path} {backend} {n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pg_available() -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except Exception as exc:  # noqa: BLE001
        print(f"note: PostgreSQL skipped, no server at {PG_URL} ({type(exc).__name__})")
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", default="100000,1000000")
    p.add_argument("--backends", default="sqlite,postgres")
    p.add_argument("--pg-url", default=None)
    p.add_argument(
        "--baseline-max", type=int, default=1_000_000,
        help="run the baseline only up to this many records (it alone takes ~10 min at 10M on PostgreSQL)",
    )  # fmt: skip
    p.add_argument("--child", choices=["ours", "baseline"], dest="path")
    p.add_argument("--backend")
    p.add_argument("--n", type=int)
    args = p.parse_args()
    global PG_URL
    if args.pg_url:
        PG_URL = os.environ["FABLE_BENCH_PG_URL"] = args.pg_url
    if args.path:
        child(args)
        return
    backends = [b for b in args.backends.split(",") if b]
    if "postgres" in backends and not pg_available():
        backends.remove("postgres")
    for backend in backends:
        for n in (int(x) for x in args.records.split(",")):
            ours = measure("ours", backend, n)
            base = measure("baseline", backend, n) if n <= args.baseline_max else None
            ours_rate = n / ours["total_s"]
            phases = " ".join(
                f"{p}_s={ours[p + '_s']:.1f} {p}_records_s={n / ours[p + '_s']:,.0f}" for p in PHASES
            )
            rss = " ".join(f"rss_after_{p}_mb={ours['rss_' + p + '_mb']:.0f}" for p in PHASES)
            if base is None:
                tail = "baseline_records_s=skipped vs_baseline=nan"
            else:
                base_rate = n / base["total_s"]
                tail = (
                    f"baseline_records_s={base_rate:,.0f} baseline_rss_mb={base['rss_mb']:.0f} "
                    f"vs_baseline={ours_rate / base_rate:.2f}"
                )
            print(
                f"bench ledger: backend={backend} records={n} ours_records_s={ours_rate:,.0f} {phases} "
                f"ours_rss_mb={ours['rss_mb']:.0f} {rss} {tail}",
                flush=True,
            )


if __name__ == "__main__":
    main()

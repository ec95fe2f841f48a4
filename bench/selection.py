"""bench: the backlog unit's run-mode selection vs the example DAGs' hand-written NOT EXISTS query.

What is measured
----------------
A source table of N records (an id, a creation date over 30 days, ~200 characters of text) and a
backlog half done: 50 % of the records have a final row, 5 % a final reject (half of them
retryable), 0.5 % are under review. For each run mode, the time to put the run's selection into
a work table keyed by run, and the peak RSS of the process doing it (the database server's
memory is not counted: on PostgreSQL the work is the server's either way):

- **provider** (``airflow_provider_fable.backlog.selection``): the mode's generated anti-joins,
  run by the database as one ``INSERT INTO <work> SELECT ...`` (no row crosses the wire);
- **baseline**: what today's example DAGs do (``crm_lead_enrichment.select_leads``): the
  hand-written ``NOT EXISTS`` query fetched into the task, then the ids inserted into the work
  table with ``executemany``. The examples add ``LIMIT :pilot``; a full run has no limit, so
  neither side has one here.

Modes: ``backlog`` (no final row, no reject, not under review), ``interval`` (the same within one
day), ``failed`` (retryable rejects without a final row), ``all`` (every record not under review).
Each measurement runs in a fresh child process (so peak RSS is its own), alternating provider and
baseline; the best of ``--rounds`` is kept. ``vs_baseline`` is the worst provider/baseline time
ratio over the modes, databases and sizes measured (below 1: the provider is faster).

Run: ``.venv/bin/python bench/selection.py [--sizes 100000 1000000] [--rounds 2] [--pg URL]``
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
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_fable.backlog import selection as sel  # noqa: E402

PG_URL = os.environ.get("FABLE_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
MODES = ("backlog", "interval", "failed", "all")
T = sel.UnitTables(
    final="final", rejects="final_rejects", review="final_review", work="final__work", id_column="id"
)
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
SOURCE_SQL = "SELECT id, created_at, body FROM src"


# ------------------------------------------------------------------ data
def build(url: str, n: int, schema: str | None) -> None:
    """Create and fill the source and the unit's state tables (idempotent per URL/schema)."""
    engine = _engine(url, schema)
    meta = sa.MetaData()
    src = sa.Table("src", meta, sa.Column("id", sa.Text, primary_key=True), sa.Column("created_at", sa.Text),
                   sa.Column("body", sa.Text))  # fmt: skip
    sa.Table("final", meta, sa.Column("id", sa.Text, primary_key=True), sa.Column("label", sa.Text))
    sel.ensure_state_tables(engine, T)
    # The baseline's rejects: one table per stage, keyed (record_id, batch_id) as the load writes them.
    for name in ("stage1_rejects", "stage2_rejects"):
        sa.Table(name, meta, sa.Column("record_id", sa.Text, primary_key=True), sa.Column("batch_id", sa.Text, primary_key=True),
                 sa.Column("reason", sa.Text))  # fmt: skip
    sa.Table("lead_work", meta, sa.Column("run_id", sa.Text, primary_key=True), sa.Column("lead_id", sa.Text, primary_key=True),
             sa.Column("stage", sa.Text, primary_key=True), sa.Column("reason", sa.Text))  # fmt: skip
    meta.create_all(engine)
    body = "The lid broke after a week and support never answered my two emails about it. " * 2
    day = 86400 / n * 30
    chunk = 50_000
    with engine.begin() as conn:
        for start in range(0, n, chunk):
            rows = [
                {"id": f"r{i:08d}", "created_at": (START + timedelta(seconds=int(i * day))).strftime("%Y-%m-%dT%H:%M:%SZ"), "body": body}
                for i in range(start, min(n, start + chunk))
            ]  # fmt: skip
            conn.execute(src.insert(), rows)
            finals = [{"id": r["id"], "label": "ok"} for k, r in enumerate(rows, start) if k % 2 == 0]
            conn.execute(meta.tables["final"].insert(), finals)
            rej = [r["id"] for k, r in enumerate(rows, start) if k % 20 == 1]
            conn.execute(sa.text(f'INSERT INTO "{T.rejects}" (id, reason, retryable) VALUES (:id, :r, :rt)'),
                         [{"id": x, "r": "schema", "rt": k % 2 == 0} for k, x in enumerate(rej)])  # fmt: skip
            conn.execute(
                meta.tables["stage2_rejects"].insert(),
                [{"record_id": x, "batch_id": "b1", "reason": "schema"} for x in rej],
            )
            rev = [r["id"] for k, r in enumerate(rows, start) if k % 200 == 3]
            conn.execute(
                sa.text(f'INSERT INTO "{T.review}" (id, reason) VALUES (:id, :r)'),
                [{"id": x, "r": "schema"} for x in rev],
            )
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE INDEX IF NOT EXISTS src_created ON src (created_at)"))
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ANALYZE"))
        else:
            conn.execute(sa.text("ANALYZE"))
    engine.dispose()


def _engine(url: str, schema: str | None) -> sa.engine.Engine:
    if schema:
        return sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    return sa.create_engine(url)


WINDOW = (START + timedelta(days=10), START + timedelta(days=11))


# ------------------------------------------------------------------ the two sides (child process)
def provider(engine: sa.engine.Engine, mode: str, run_id: str) -> int:
    windowed = mode == "interval"
    sql = sel.selection_sql(SOURCE_SQL, mode, T, id_field="id", date_field="created_at", windowed=windowed)
    binds = sel.window_binds(engine, WINDOW) if windowed else {}
    if engine.dialect.name == "postgresql" and windowed:  # text dates in this source table
        binds = {"w_start": sel._iso(WINDOW[0]), "w_end": sel._iso(WINDOW[1])}
    return sel.insert_selection(engine, sql, binds, T, run_id=run_id, pass_name="full")


def baseline(engine: sa.engine.Engine, mode: str, run_id: str) -> int:
    """crm_lead_enrichment's select_leads, without its LIMIT (a full run)."""
    rejected = (
        "(EXISTS (SELECT 1 FROM stage1_rejects AS x WHERE x.record_id = l.id) "
        "OR EXISTS (SELECT 1 FROM stage2_rejects AS x WHERE x.record_id = l.id))"
    )
    if mode == "all":
        where = "1 = 1"
    else:
        where = "NOT EXISTS (SELECT 1 FROM final AS e WHERE e.id = l.id) AND " + (
            rejected if mode == "failed" else f"NOT {rejected}"
        )
    binds: dict[str, str] = {}
    if mode == "interval":
        where += " AND l.created_at >= :start AND l.created_at < :end"
        binds = {"start": sel._iso(WINDOW[0]), "end": sel._iso(WINDOW[1])}
    with engine.begin() as conn:
        rows = conn.execute(
            sa.text(f"SELECT l.id FROM src AS l WHERE {where} ORDER BY l.created_at, l.id"), binds
        ).all()
        conn.execute(sa.text("DELETE FROM lead_work WHERE run_id = :r"), {"r": run_id})
        if rows:
            conn.execute(
                sa.text(
                    "INSERT INTO lead_work (run_id, lead_id, stage, reason) VALUES (:r, :l, 'cheap', NULL)"
                ),
                [{"r": run_id, "l": r[0]} for r in rows],
            )
    return len(rows)


def child(args: argparse.Namespace) -> None:
    engine = _engine(args.url, args.schema)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    fn = provider if args.side == "provider" else baseline
    started = time.perf_counter()
    n = fn(engine, args.mode, run_id)
    elapsed = time.perf_counter() - started
    with engine.begin() as conn:  # leave the work tables as they were
        conn.execute(sa.text(f'DELETE FROM "{T.work}" WHERE run_id = :r'), {"r": run_id})
        conn.execute(sa.text("DELETE FROM lead_work WHERE run_id = :r"), {"r": run_id})
    engine.dispose()
    peak_mb = _peak_rss_mb()
    print(json.dumps({"seconds": elapsed, "rows": n, "peak_rss_mb": peak_mb}))


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (per address space, so not inherited across exec like
    ``ru_maxrss``, which would report the parent's peak after building a million rows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(url: str, schema: str | None, side: str, mode: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--url", url, "--side", side, "--mode", mode]
    if schema:
        cmd += ["--schema", schema]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pg", default=PG_URL, help="PostgreSQL URL ('' to skip PostgreSQL)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results: dict[str, dict[str, float]] = {}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fable-bench-selection-") as tmp:
        for n in args.sizes:
            targets = [("sqlite", f"sqlite:///{tmp}/sel_{n}.db", None)]
            if args.pg:
                targets.append(("postgres", args.pg, f"bench_sel_{uuid.uuid4().hex[:8]}"))
            for db, url, schema in targets:
                if schema:
                    admin = sa.create_engine(url)
                    with admin.begin() as conn:
                        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
                try:
                    t0 = time.perf_counter()
                    build(url, n, schema)
                    print(f"# {db} {n:,} records built in {time.perf_counter() - t0:.1f}s", flush=True)
                    for mode in MODES:
                        best: dict[str, dict[str, float]] = {}
                        for _ in range(args.rounds):
                            for side in ("provider", "baseline"):
                                r = run_child(url, schema, side, mode)
                                if side not in best or r["seconds"] < best[side]["seconds"]:
                                    best[side] = r
                        p, b = best["provider"], best["baseline"]
                        # Not always the same rows: the provider also leaves out records under
                        # review, and ``failed`` takes retryable rejects only (the baseline: all).
                        ratio = p["seconds"] / b["seconds"] if b["seconds"] else float("inf")
                        ratios.append(ratio)
                        key = f"{db}_{n // 1000}k_{mode}"
                        results[key] = {"rows": p["rows"], "baseline_rows": b["rows"], "provider_s": round(p["seconds"], 3),
                                        "baseline_s": round(b["seconds"], 3), "provider_rss_mb": round(p["peak_rss_mb"], 1),
                                        "baseline_rss_mb": round(b["peak_rss_mb"], 1), "ratio": round(ratio, 3)}  # fmt: skip
                        print(f"{key:28s} rows={p['rows']:>8,}/{b['rows']:<8,} provider {p['seconds']:7.3f}s {p['peak_rss_mb']:6.1f} MB | "
                              f"baseline {b['seconds']:7.3f}s {b['peak_rss_mb']:6.1f} MB | ratio {ratio:.3f}", flush=True)  # fmt: skip
                finally:
                    if schema:
                        with admin.begin() as conn:
                            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
                        admin.dispose()
    parts = []
    for key, r in results.items():
        if r["rows"] and key.endswith("_backlog"):
            parts.append(f"{key}_s={r['provider_s']} {key}_baseline_s={r['baseline_s']} {key}_rss_mb={r['provider_rss_mb']} "
                         f"{key}_baseline_rss_mb={r['baseline_rss_mb']}")  # fmt: skip
    print(f"bench selection: {' '.join(parts)} vs_baseline={max(ratios):.3f}")


if __name__ == "__main__":
    main()

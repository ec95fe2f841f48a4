"""Benchmark: a batch results file -> validated rows in SQLite and PostgreSQL.

Three paths, each in its own process on the same synthetic results file (realistic ticket-triage
answers, ~5 % bad answers, ~3 % errored/expired), same destination kind, same accepted count
(checked before any figure is printed):

- ours: ``core.results.parse_result_line`` -> ``core.loading.load_batch`` -> ``core.sinks``
  (SQLite: one prepared upsert via executemany, in the writer process that is the default for
  a SQLite file on a multi-core machine, each chunk streamed to it in quarter-chunk pieces;
  PostgreSQL: the chunk rendered as COPY text on the loading thread, COPY into a staging table
  + one INSERT ... ON CONFLICT run by a writer thread), chunks of 10,000 rows per transaction.
- baseline, the path a user of the official SDK writes: ``json.loads`` + the SDK's
  ``construct_type_unchecked(MessageBatchIndividualResponse)`` per line (what
  ``client.messages.batches.results()`` yields), ``model_validate_json`` per answer,
  ``DataFrame.to_sql`` of the accepted rows and of the rejects.
- floor: the same final rows, pre-parsed outside the timing, inserted raw into empty tables
  (SQLite ``executemany`` of plain tuples; PostgreSQL psycopg2 ``execute_values``, its fastest
  executemany-style insert), one transaction.

Peak RSS is the child process's ``ru_maxrss``. Each (backend, rows) pair prints
``bench load: backend=... rows=... ours_rows_s=... baseline_rows_s=... floor_rows_s=...
ours_rss_mb=... baseline_rss_mb=... vs_baseline=... vs_floor=...``.

Run: ``.venv/bin/python bench/load.py`` (default: 100,000 and 1,000,000 lines, sqlite and
postgres). Options: ``--rows 100000,1000000 --backends sqlite,postgres --pg-url URL
--pipeline inline`` (ours on SQLite without the writer process, all in one thread).
PostgreSQL is skipped with a note when no server answers at the URL.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from enum import Enum
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_URL = os.environ.get("FABLE_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
BATCH_ID = "msgbatch_bench_000000000000000000"
TABLE = "ticket_triage"


class Category(str, Enum):
    billing = "billing"
    account_access = "account_access"
    bug = "bug"
    feature_request = "feature_request"
    shipping = "shipping"


class Priority(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"
    urgent = "urgent"


class TicketTriage(BaseModel):
    """The example DAG's output model (enums, a bool, a bounded string, an invariant)."""

    model_config = ConfigDict(extra="forbid")

    category: Category
    priority: Priority
    escalate: bool
    summary: str = Field(min_length=3, max_length=200)

    @model_validator(mode="after")
    def _escalation_needs_priority(self) -> TicketTriage:
        if self.escalate and self.priority not in (Priority.high, Priority.urgent):
            raise ValueError("escalate=true requires priority high or urgent")
        return self


SUMMARIES = [
    "Customer was charged twice for the annual plan and asks for a refund of the duplicate.",
    "Customer cannot log in after a password reset and needs to update an expiring card.",
    "App crashes on opening the reports tab on Android since the latest update.",
    "Parcel marked as shipped ten days ago shows no tracking updates since.",
    "Customer asks for CSV exports to include custom fields, which they do not today.",
    "Two-factor codes never arrive by SMS, so the customer is locked out of the account.",
    "Invoice shows the wrong VAT rate for a business customer in the EU.",
    'Sync between the phone and the "Pro" desktop app silently drops edits made offline.',
    "Kunde fragt nach dem Lieferstatus; das Paket hängt seit Tagen beim Zoll.",
    "Dark mode request for the web dashboard; no rush.",
]


# ----------------------------------------------------------------------------- data
def _line(i: int, rng: random.Random) -> bytes:
    custom_id = f"T-{i:08d}"
    roll = rng.random()
    if roll < 0.02:
        result = {"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error",
                  "message": "Overloaded"}}}  # fmt: skip
        return orjson.dumps({"custom_id": custom_id, "result": result})
    if roll < 0.03:
        return orjson.dumps({"custom_id": custom_id, "result": {"type": "expired"}})
    priority = rng.choice(list(Priority)).value
    answer = {
        "category": rng.choice(list(Category)).value,
        "priority": priority,
        "escalate": priority in ("high", "urgent") and rng.random() < 0.3,
        "summary": rng.choice(SUMMARIES),
    }
    text = json.dumps(answer, ensure_ascii=False)
    stop = "end_turn"
    if roll < 0.08:  # ~5 % bad answers of every kind
        bad = rng.randrange(5)
        if bad == 0:
            text = text[: len(text) // 2]  # invalid JSON
        elif bad == 1:
            text = json.dumps({**answer, "category": "refunds"})  # not in the enum
        elif bad == 2:
            text = json.dumps({**answer, "priority": "low", "escalate": True})  # invariant
        elif bad == 3:
            text, stop = text[:20], "max_tokens"  # truncated
        else:
            text = json.dumps({**answer, "escalate": "yes"})  # strict: not a boolean
    message = {
        "id": f"msg_{i:012d}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": None,
        "usage": {"input_tokens": 310 + i % 200, "output_tokens": 40 + i % 30,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1056,
                  "service_tier": "batch"},
    }  # fmt: skip
    return orjson.dumps({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})


def make_file(path: Path, n: int) -> None:
    rng = random.Random(8)
    with path.open("wb", buffering=1 << 20) as fh:
        for i in range(n):
            fh.write(_line(i, rng) + b"\n")
        # On disk before any path runs: otherwise the kernel writes the fresh file (53 MB per
        # 100k lines) back while the first path (ours) commits, and its fsyncs wait for that.
        fh.flush()
        os.fsync(fh.fileno())


def _lines(path: str, rows: int):
    fh = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed with the process
    return itertools.islice(fh, rows)


# ----------------------------------------------------------------------------- children
def _engine(url: str, schema: str | None):
    import sqlalchemy as sa

    if schema:
        return sa.create_engine(url, connect_args={"options": f"-csearch_path={schema}"})
    return sa.create_engine(url)


def child_ours(path: str, rows: int, url: str, schema: str | None) -> dict:
    """``FABLE_BENCH_PIPELINE=inline|process`` forces ours' pipeline (default: load_batch's choice)."""
    from airflow_provider_fable.core.loading import LoadStats, load_batch
    from airflow_provider_fable.core.results import parse_result_line
    from airflow_provider_fable.core.sinks import ResultSink

    engine = _engine(url, schema)
    sink = ResultSink(engine, table=TABLE, id_column="ticket_id", output_model=TicketTriage)
    sink.ensure_tables()
    stats = LoadStats()
    cpu_start, start = time.process_time(), time.perf_counter()
    load_batch(
        map(parse_result_line, _lines(path, rows)),
        batch_id=BATCH_ID,
        output_model=TicketTriage,
        sink=sink,
        stats=stats,
        pipeline={"process": "process", "inline": False}.get(os.environ.get("FABLE_BENCH_PIPELINE", "")),
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "cpu_start": cpu_start,
    }


def child_baseline(path: str, rows: int, url: str, schema: str | None) -> dict:
    import pandas as pd
    from anthropic._models import construct_type_unchecked
    from anthropic.types.messages import MessageBatchIndividualResponse

    engine = _engine(url, schema)
    cpu_start, start = time.process_time(), time.perf_counter()
    good, bad = [], []
    for line in _lines(path, rows):
        item = construct_type_unchecked(value=json.loads(line), type_=MessageBatchIndividualResponse)
        result = item.result
        if result.type != "succeeded":
            bad.append({"record_id": item.custom_id, "batch_id": BATCH_ID, "reason": result.type})
            continue
        message = result.message
        text = "".join(b.text for b in message.content if b.type == "text")
        if message.stop_reason == "max_tokens":
            bad.append({"record_id": item.custom_id, "batch_id": BATCH_ID, "reason": "truncated"})
            continue
        try:
            answer = TicketTriage.model_validate_json(text, strict=True)
        except ValidationError as exc:
            bad.append({"record_id": item.custom_id, "batch_id": BATCH_ID, "reason": str(exc)[:200]})
            continue
        good.append(
            {
                "ticket_id": item.custom_id,
                **answer.model_dump(mode="json"),
                "_batch_id": BATCH_ID,
                "_model": message.model,
                "_input_tokens": message.usage.input_tokens,
                "_output_tokens": message.usage.output_tokens,
            }
        )
    pd.DataFrame(good).to_sql(TABLE, engine, if_exists="append", index=False)
    pd.DataFrame(bad).to_sql(f"{TABLE}_rejects", engine, if_exists="append", index=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "accepted": len(good), "rejected": len(bad), "cpu_start": cpu_start}


def child_floor(path: str, rows: int, url: str, schema: str | None) -> dict:
    """The same final rows as ours, built outside the timing, then inserted raw."""
    from airflow_provider_fable.core.results import parse_result_line
    from airflow_provider_fable.core.sinks import REJECT_COLUMNS, ResultSink
    from airflow_provider_fable.core.validation import Accepted, validate_result

    engine = _engine(url, schema)
    sink = ResultSink(engine, table=TABLE, id_column="ticket_id", output_model=TicketTriage)
    sink.ensure_tables()
    now = sink._now()
    accepted, rejected = [], []
    for line in _lines(path, rows):
        outcome = validate_result(parse_result_line(line), TicketTriage)
        (accepted if isinstance(outcome, Accepted) else rejected).append(outcome)
    good, _, _ = sink._accepted_rows(accepted, BATCH_ID, "claude-sonnet-4-5", now)
    bad = sink._reject_rows(rejected, BATCH_ID, now)
    cols = [c.name for c in sink.table.columns]
    raw = engine.raw_connection()
    conn = raw.driver_connection
    cur = conn.cursor()
    cpu_start, start = time.process_time(), time.perf_counter()
    if engine.dialect.name == "sqlite":
        cur.executemany(f"INSERT INTO {TABLE} VALUES ({', '.join('?' * len(cols))})", good)
        cur.executemany(f"INSERT INTO {TABLE}_rejects VALUES ({', '.join('?' * len(REJECT_COLUMNS))})", bad)
    else:
        from psycopg2.extras import execute_values

        execute_values(cur, f"INSERT INTO {TABLE} ({', '.join(cols)}) VALUES %s", good, page_size=10_000)
        execute_values(
            cur, f"INSERT INTO {TABLE}_rejects ({', '.join(REJECT_COLUMNS)}) VALUES %s", bad, page_size=10_000
        )
    conn.commit()
    seconds = time.perf_counter() - start
    raw.close()
    return {"seconds": seconds, "accepted": len(good), "rejected": len(bad), "cpu_start": cpu_start}


CHILDREN = {"ours": child_ours, "baseline": child_baseline, "floor": child_floor}


def run_child(kind: str, path: Path, rows: int, backend: str, workdir: Path, pg_url: str) -> dict:
    """Run one path in a fresh process on a fresh destination; returns its figures."""
    import sqlalchemy as sa

    schema = None
    if backend == "sqlite":
        db = workdir / f"{kind}-{rows}.db"
        db.unlink(missing_ok=True)
        url = f"sqlite:///{db}"
    else:
        url, schema = pg_url, f"bench_load_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(pg_url)
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--file", str(path), "--rows", str(rows),
             "--url", url, "--schema", schema or ""],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{kind} on {backend} failed:\n{exc.stderr}") from None
    finally:
        if backend == "sqlite":
            db.unlink(missing_ok=True)
        else:
            with admin.begin() as conn:
                conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pg_available(url: str) -> bool:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "no server"
        return False
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument(
        "--pipeline", choices=["default", "inline", "process"], default="default",
        help="ours on SQLite: load_batch's default (a writer process on a multi-core machine), "
        "inline (one thread) or process",
    )  # fmt: skip
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--file")
    parser.add_argument("--url")
    parser.add_argument("--schema")
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](args.file, int(args.rows), args.url, args.schema or None)
        result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["cpu"] = time.process_time() - result.pop("cpu_start")
        print(json.dumps(result))
        return
    sizes = [int(x) for x in args.rows.split(",")]
    if args.pipeline != "default":
        os.environ["FABLE_BENCH_PIPELINE"] = args.pipeline
    backends = args.backends.split(",")
    if "postgres" in backends and not _pg_available(args.pg_url):
        print(f"note: no PostgreSQL at {args.pg_url}; postgres skipped")
        backends.remove("postgres")
    with tempfile.TemporaryDirectory(prefix="fable-bench-load-") as tmp:
        workdir = Path(tmp)
        path = workdir / "results.jsonl"
        start = time.perf_counter()
        make_file(path, max(sizes))
        print(f"generated {max(sizes)} result lines ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - start:.1f}s")  # fmt: skip
        lines = []
        for backend in backends:
            for rows in sizes:
                figures = {k: run_child(k, path, rows, backend, workdir, args.pg_url) for k in CHILDREN}
                split = {(f["accepted"], f["rejected"]) for f in figures.values()}
                if len(split) != 1:
                    raise SystemExit(f"paths disagree on {backend}/{rows}: {figures}")
                ours, base, floor = (rows / figures[k]["seconds"] for k in ("ours", "baseline", "floor"))
                print(f"  {backend} rows={rows} accepted/rejected={split.pop()} "
                      + " ".join(f"{k}={v['seconds']:.2f}s(cpu {v['cpu']:.2f}s)/{v['rss_mb']:.0f}MB"
                               for k, v in figures.items()),
                      flush=True)  # fmt: skip
                tag = (
                    "" if args.pipeline == "default" or backend != "sqlite" else f" pipeline={args.pipeline}"
                )
                lines.append(
                    f"bench load: backend={backend}{tag} rows={rows} ours_rows_s={ours:.0f} "
                    f"baseline_rows_s={base:.0f} floor_rows_s={floor:.0f} "
                    f"ours_rss_mb={figures['ours']['rss_mb']:.0f} "
                    f"baseline_rss_mb={figures['baseline']['rss_mb']:.0f} "
                    f"vs_baseline={ours / base:.2f} vs_floor={ours / floor:.2f}"
                )
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()

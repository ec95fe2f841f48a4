"""Benchmark: records -> shards -> create bodies through FableHook to the emulator; speed and peak RSS.

Ours = the submit task's path (``build_requests`` -> ``core.spool.spool_requests`` into a temp
file -> ``FableHook.create_batch_from_body`` streaming each shard's ``{"requests":[...]}`` from the
spool). Baseline = the previous path, which kept a whole shard (up to 100,000 requests) in memory
as Python dicts twice: once in ``core.sharding.shard_requests`` while spooling, then again rebuilt
with ``json.loads`` from the spool and handed to ``client.messages.batches.create(requests=...)``.

Each variant runs in its own child process (peak RSS is per process, read with ``os.wait4``)
against one emulator in yet another process, so the emulator's memory is never counted. The same
synthetic records (a ticket-like text of ~300 characters) are used by both.

``--operator`` adds a third child running the whole ``FableBatchSubmitOperator`` (ledger included).

The operator child also reports where its time went: before the first create (records ->
requests -> spool, ledger look-ups), inside the creates (bodies streamed to the emulator), and
the overhead (everything but the creates: the provider's own cost). ``--ledger-url`` puts its
ledger in a fresh PostgreSQL database (the production setup) instead of the embedded SQLite;
``--operator-only`` skips the two hook-level variants; ``--profile FILE`` writes cProfile stats.

``--encoded-ids`` gives the records ids that need encoding (``t#N``: custom_ids ``enc-...``).

Run: ``.venv/bin/python bench/submit.py [--records 100000 1000000] [--operator]``
(e.g. ``--records 100000 --operator-only --ledger-url postgresql+psycopg2://postgres@127.0.0.1/postgres``)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"


class Label(str, Enum):
    billing = "billing"
    bug = "bug"
    shipping = "shipping"


class Answer(BaseModel):
    label: Label
    urgent: bool
    summary: str = Field(max_length=200)


WORDS = "refund invoice crash login parcel late broken charge twice error screen courier address".split()


def records(n: int) -> Iterator[dict]:
    # --encoded-ids: ids like "t#123", which the API's custom_id rule refuses (encoded "enc-...").
    prefix = os.environ.get("FABLE_BENCH_ID_PREFIX", "t")
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(40))
        yield {"id": f"{prefix}{i}", "subject": f"Ticket {i}", "body": f"Customer writes: {words}."}


def child(variant: str, n: int) -> None:
    from airflow_provider_fable.core.job import BatchJob
    from airflow_provider_fable.core.requests import build_requests
    from airflow_provider_fable.core.sharding import shard_requests
    from airflow_provider_fable.core.spool import iter_body, spool_requests
    from airflow_provider_fable.hooks.fable import FableHook

    job = BatchJob(
        prompt_template="Subject: {subject}\n\n{body}",
        output_model=Answer,
        system_prompt="Triage the support ticket: label, urgency and a one-line summary.",
    )
    hook = FableHook()
    start = time.perf_counter()
    ids = []
    if variant == "operator":
        # The whole submit task as Airflow runs it (ledger in an embedded SQLite under AIRFLOW_HOME).
        from airflow_provider_fable.operators.submit import FableBatchSubmitOperator

        # Where the time goes: before the first create (spool + ledger look-ups), inside the
        # creates (bodies streamed to the emulator), and the rest (intents, batch ids: the ledger).
        creates: list[tuple[float, float]] = []
        create = FableHook.create_batch_from_body

        def timed_create(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return create(self, *args, **kwargs)
            finally:
                creates.append((t, time.perf_counter()))

        FableHook.create_batch_from_body = timed_create
        op = FableBatchSubmitOperator(
            task_id="bench_submit",
            prompt_template=job.prompt_template,
            system_prompt=job.system_prompt,
            output_model=Answer,
            records=lambda: records(n),
            ledger_conn_id="fable_bench_ledger"
            if os.environ.get("AIRFLOW_CONN_FABLE_BENCH_LEDGER")
            else None,
        )
        profile = os.environ.get("FABLE_BENCH_PROFILE")
        if profile:
            import cProfile

            prof = cProfile.Profile()
            ids = prof.runcall(op.execute, {})["batch_ids"]
            prof.dump_stats(profile)
        else:
            ids = op.execute({})["batch_ids"]
        elapsed = time.perf_counter() - start
        total = sum(hook.retrieve_batch(b).request_counts.processing for b in ids)
        assert total == n, f"{variant}: the emulator holds {total} of {n} requests"
        in_creates = sum(b - a for a, b in creates)
        first = creates[0][0] - start if creates else elapsed
        print(
            json.dumps(
                {
                    "seconds": elapsed, "batches": len(ids), "before_first_create_s": first,
                    "creates_s": in_creates, "overhead_s": elapsed - in_creates,
                }
            ),
            flush=True,
        )  # fmt: skip
        return
    with tempfile.TemporaryFile(prefix="bench-spool-") as spool:
        if variant == "stream":
            for shard in spool_requests(build_requests(job, records(n)), spool):
                batch = hook.create_batch_from_body(
                    lambda shard=shard: iter_body(spool, shard), count=shard.count, size=shard.body_bytes
                )
                ids.append(batch.id)
        else:
            offsets = []
            for shard in shard_requests(build_requests(job, records(n))):
                offsets.append((spool.tell(), len(shard)))
                for request in shard:
                    spool.write(json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode())
                    spool.write(b"\n")
            for offset, count in offsets:
                spool.seek(offset)
                requests = [json.loads(spool.readline()) for _ in range(count)]
                ids.append(hook.create_batch(requests).id)
                del requests
    elapsed = time.perf_counter() - start
    total = sum(hook.retrieve_batch(b).request_counts.processing for b in ids)
    assert total == n, f"{variant}: the emulator holds {total} of {n} requests"
    print(json.dumps({"seconds": elapsed, "batches": len(ids)}), flush=True)


def run_child(variant: str, n: int, env: dict[str, str]) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", variant, "--records", str(n)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{variant} child failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["rps"] = n / result["seconds"]
    return result


@contextlib.contextmanager
def _ledger_database(url: str | None) -> Iterator[str | None]:
    """A fresh PostgreSQL database for the operator's ledger, as an Airflow connection (JSON)."""
    if not url:
        yield None
        return
    import uuid

    import sqlalchemy as sa

    name = f"fable_bench_submit_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    where = sa.engine.make_url(url)
    try:
        yield json.dumps(
            {
                "conn_type": "postgres", "host": where.host, "port": where.port or 5432,
                "login": where.username, "password": where.password, "schema": name,
            }
        )  # fmt: skip
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def start_emulator() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_fable.emulator",
            "--port",
            "0",
            "--processing-seconds",
            "86400",
            "--api-key",
            KEY,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    match = re.search(r"https?://[\d.]+:\d+", line)
    if not match:
        proc.kill()
        raise SystemExit(f"emulator did not start: {line!r}")
    return proc, match.group(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", choices=["stream", "baseline", "operator"])
    parser.add_argument(
        "--operator", action="store_true", help="also run the whole submit operator (with its ledger)"
    )
    parser.add_argument("--operator-only", action="store_true", help="run only the whole submit operator")
    parser.add_argument(
        "--ledger-url",
        help="PostgreSQL server URL (SQLAlchemy): the operator's ledger goes in a fresh database there "
        "(dropped after) instead of the embedded SQLite",
    )
    parser.add_argument("--profile", help="write the operator child's cProfile stats to this file")
    parser.add_argument(
        "--sink",
        action="store_true",
        help="creates go to bench/sink.py (reads and drops every body) instead of the emulator, which "
        "keeps every request in memory: for the submit's peak RSS at 10M records",
    )
    parser.add_argument(
        "--encoded-ids",
        action="store_true",
        help="record ids the API's custom_id rule refuses (t#N): the encoded-id path (core.id_map)",
    )
    args = parser.parse_args()
    if args.encoded_ids:
        os.environ["FABLE_BENCH_ID_PREFIX"] = "t#"
    if args.profile:
        os.environ["FABLE_BENCH_PROFILE"] = str(Path(args.profile).resolve())
    if args.child:
        child(args.child, args.records[0])
        return
    home = tempfile.mkdtemp(prefix="bench-airflow-")
    last = ""
    for n in args.records:
        if args.sink:
            from sink import serve

            server, url = serve()
            emulator = None
        else:
            emulator, url = start_emulator()  # a fresh one per size: it keeps every batch in memory
        try:
            env = {
                **os.environ,
                "AIRFLOW_HOME": home,
                "AIRFLOW_CONN_FABLE_DEFAULT": json.dumps(
                    {"conn_type": "fable", "host": url, "password": KEY}
                ),
            }
            ours = run_child("stream", n, env) if not args.operator_only else None
            base = run_child("baseline", n, env) if not args.operator_only else None
            whole = None
            if args.operator or args.operator_only:
                with _ledger_database(args.ledger_url) as conn:
                    if conn:
                        env["AIRFLOW_CONN_FABLE_BENCH_LEDGER"] = conn
                    whole = run_child("operator", n, env)
                    env.pop("AIRFLOW_CONN_FABLE_BENCH_LEDGER", None)
        finally:
            if emulator is not None:
                emulator.terminate()
                emulator.wait()
            else:
                server.shutdown()
        for name, r in (("stream", ours), ("baseline", base), ("operator", whole)):
            if r is None:
                continue
            extra = (
                f" ledger={'postgresql' if args.ledger_url else 'sqlite'}"
                f" ids={'encoded' if args.encoded_ids else 'native'}"
                f" before_first_create_s={r['before_first_create_s']:.1f} creates_s={r['creates_s']:.1f}"
                f" overhead_s={r['overhead_s']:.1f}"
                if name == "operator"
                else ""
            )
            print(
                f"records={n} path={name} batches={r['batches']} records_per_s={r['rps']:.0f} "
                f"peak_rss_mb={r['peak_mb']:.0f}{extra}",
                flush=True,
            )
        if ours is None or base is None:
            continue
        last = (
            f"bench submit: records={n} peak_rss_mb={ours['peak_mb']:.0f} "
            f"baseline_peak_rss_mb={base['peak_mb']:.0f} records_per_s={ours['rps']:.0f} "
            f"baseline_records_per_s={base['rps']:.0f} speed_vs_baseline={ours['rps'] / base['rps']:.2f} "
            f"vs_baseline={ours['peak_mb'] / base['peak_mb']:.2f}"
        )
        print(last, flush=True)


if __name__ == "__main__":
    main()

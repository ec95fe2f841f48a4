"""`make demo`: run the support_ticket_triage DAG end to end on the local emulator + SQLite.

Starts ``fable-emulator`` on a free port (3 s per batch, so the sensor really defers, and a few
injected faults so the reject path shows). A small share of requests is never processed, as
happens in production: like the real API, the emulator keeps the batch ``in_progress`` until
its 24-hour expiry and then reports them ``expired``, so the demo moves the emulator's clock
forward a day once the rest of the batch is done. It runs the DAG once with the real Airflow
(``dag.test()``, triggers inline) in a private AIRFLOW_HOME under ``.demo/``, stops the emulator
and prints what happened: records submitted, accepted, rejected with top reasons, label
distribution and tokens. Exit status is non-zero when the run fails or nothing was accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_emulator(port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "airflow_provider_fable.emulator",
        "--host", "127.0.0.1", "--port", str(port),
        "--processing-seconds", str(args.processing_seconds),
        "--invalid-answer-rate", "0.03", "--errored-rate", "0.01", "--expired-rate", "0.005",
    ]  # fmt: skip
    log = (WORK / "emulator.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"emulator exited early ({proc.returncode}); see {WORK / 'emulator.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("emulator did not answer within 30 s")


def fast_forward_to_expiry(port: int, processing_seconds: float, done: threading.Event) -> None:
    """Once batches exist and their processing window has passed, move the emulator clock 24 h.

    The requests the emulated backend never got to then expire, exactly as they would after a
    day in production, instead of the demo waiting a day (or the emulator expiring them early).
    """
    base = f"http://127.0.0.1:{port}/_emulator"
    created_at = None
    while not done.wait(0.5):
        try:
            with urllib.request.urlopen(f"{base}/stats", timeout=5) as resp:
                created = json.load(resp).get("batches_created", 0)
        except OSError:
            continue
        if created and created_at is None:
            created_at = time.monotonic()
        if created_at is not None and time.monotonic() - created_at > processing_seconds + 1:
            body = json.dumps({"advance_seconds": 24 * 3600}).encode()
            request = urllib.request.Request(
                f"{base}/clock", data=body, headers={"content-type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=5):
                pass
            print(
                "  (emulator clock moved forward 24 h: unprocessed requests reach their expiry)", flush=True
            )
            return


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def print_summary(result: Any, elapsed: float) -> None:
    manifest = result.xcom("submit") or {}
    wait = result.xcom("wait") or {}
    load = result.xcom("load") or {}
    usage = load.get("usage", {})
    print()
    print("=" * 72)
    print(f"support_ticket_triage: run {result.state} in {elapsed:.1f}s  tasks: {result.task_states}")
    print(f"  submitted : {manifest.get('request_count', 0)} requests in {len(manifest.get('batch_ids', []))} "
          f"batch(es) for model {manifest.get('model')}")  # fmt: skip
    print(f"  waited    : in the {wait.get('waited_in', '?')} ({wait.get('polls') or 0} polls)")
    print(f"  accepted  : {load.get('accepted', 0)}  -> table {load.get('table')}")
    print(f"  rejected  : {load.get('rejected', 0)}  -> table {load.get('rejects_table')}")
    for reason, n in list(load.get("reject_reasons", {}).items())[:5]:
        print(f"      {n:5d}  {reason}")
    for field, counts in load.get("distribution", {}).items():
        shown = ", ".join(f"{k}={v}" for k, v in counts.items())
        print(f"  {field:<10}: {shown}")
    print(
        f"  tokens    : input={usage.get('input_tokens', 0)} output={usage.get('output_tokens', 0)} "
        f"cache_write={usage.get('cache_creation_input_tokens', 0)} "
        f"cache_read={usage.get('cache_read_input_tokens', 0)}"
    )
    print(f"  cost      : ${load.get('cost_usd')} at batch prices (emulated usage)")
    print("=" * 72)


def ground_truth_agreement(db: Path) -> str:
    """Share of accepted rows whose category matches the dataset's hidden expected_category.

    With the emulator this measures its keyword "model", not Claude; with a real key it is a
    quick QA signal for the prompt.
    """
    import csv
    import sqlite3

    with (ROOT / "dags" / "data" / "support_tickets.csv").open(newline="", encoding="utf-8") as fh:
        truth = {row["ticket_id"]: row["expected_category"] for row in csv.DictReader(fh)}
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT ticket_id, category FROM ticket_triage").fetchall()
    if not rows:
        return "n/a"
    hits = sum(1 for ticket_id, category in rows if truth.get(ticket_id) == category)
    return f"{hits}/{len(rows)} = {hits / len(rows):.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2000, help="tickets to triage in this run")
    parser.add_argument("--processing-seconds", type=float, default=3.0, help="emulated batch duration")
    parser.add_argument("--verbose", action="store_true", help="show Airflow's INFO logs")
    args = parser.parse_args(argv)

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO" if args.verbose else "WARNING")
    from airflow_provider_fable.testing.airflow_env import isolate_airflow, set_connection

    isolate_airflow(WORK / "airflow", dags_folder=ROOT / "dags")
    os.environ["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = "True"
    os.environ["FABLE_POLL_SECONDS"] = "1"

    port = free_port()
    print(
        f"Starting fable-emulator on 127.0.0.1:{port} ({args.processing_seconds}s per batch) ...", flush=True
    )
    emulator = start_emulator(port, args)
    done = threading.Event()
    keeper = threading.Thread(
        target=fast_forward_to_expiry, args=(port, args.processing_seconds, done), daemon=True
    )
    keeper.start()
    try:
        set_connection(
            "fable_default", conn_type="fable", host=f"http://127.0.0.1:{port}", password="demo-key"
        )
        set_connection("fable_backlog_db", conn_type="sqlite", host=str(WORK / "backlog.db"))
        print(
            "Running support_ticket_triage with dag.test() (first run in a process warms up) ...", flush=True
        )
        from airflow_provider_fable.testing.airflow_env import load_dag, run_dag

        started = time.monotonic()
        result = run_dag(load_dag("support_ticket_triage"), conf={"limit": args.limit})
        elapsed = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/stats", timeout=5) as resp:
            stats = json.load(resp)
    finally:
        done.set()
        stop(emulator)
    print_summary(result, elapsed)
    print(
        f"  category agreement with the dataset's ground truth: {ground_truth_agreement(WORK / 'backlog.db')}"
    )
    calls = stats.get("calls", {})
    print(
        f"  emulator  : calls {json.dumps(calls, sort_keys=True)}; faults {json.dumps(stats.get('faults', {}))[:200]}"
    )
    print(f"  inspect   : sqlite3 {WORK / 'backlog.db'} 'select * from ticket_triage limit 5'")
    load = result.xcom("load") or {}
    if result.state != "success" or not load.get("accepted"):
        print("demo FAILED: the run did not succeed or accepted nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

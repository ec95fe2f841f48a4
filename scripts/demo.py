"""`make demo [DAG=<id>]`: run an example DAG end to end on the local emulator + SQLite.

Without ``DAG`` it runs ``support_ticket_triage``; ``DAG=crm_lead_enrichment``,
``DAG=document_summaries`` or ``DAG=cancellation_reason_cleanup`` run the pattern DAGs and print
what their technique did (escalations and stage costs; sections and combined summaries;
label distribution and flagged inconsistencies).

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
    """Each time new batches exist and their processing window has passed, move the emulator clock 24 h.

    The requests the emulated backend never got to then expire, exactly as they would after a
    day in production, instead of the demo waiting a day (or the emulator expiring them early).
    The pattern DAGs create a second batch later in the same run, so this repeats per new batch.
    """
    base = f"http://127.0.0.1:{port}/_emulator"
    seen = advanced_for = 0
    created_at = 0.0
    while not done.wait(0.5):
        try:
            with urllib.request.urlopen(f"{base}/stats", timeout=5) as resp:
                created = json.load(resp).get("batches_created", 0)
        except OSError:
            continue
        if created > seen:
            seen, created_at = created, time.monotonic()
        if seen > advanced_for and time.monotonic() - created_at > processing_seconds + 1:
            body = json.dumps({"advance_seconds": 24 * 3600}).encode()
            request = urllib.request.Request(
                f"{base}/clock", data=body, headers={"content-type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=5):
                    pass
            except OSError:
                continue
            advanced_for = seen
            print(
                "  (emulator clock moved forward 24 h: unprocessed requests reach their expiry)", flush=True
            )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def print_summary(result: Any, elapsed: float) -> None:
    manifest = result.xcom("tickets.s1_submit") or {}
    wait = result.xcom("tickets.s1_wait") or {}
    load = result.xcom("tickets.s1_load") or {}
    usage = load.get("usage", {})
    print()
    print("=" * 72)
    print(f"support_ticket_triage: run {result.state} in {elapsed:.1f}s  tasks: {result.task_states}")
    print(f"  submitted : {manifest.get('request_count', 0)} requests in {len(manifest.get('batch_ids', []))} "
          f"batch(es) for model {manifest.get('model')}")  # fmt: skip
    project = result.xcom("tickets.project") or {}
    if project.get("pilot"):
        print(f"  pilot     : {project['pilot']['records'][0]} sampled tickets first, cost ${project.get('pilot_cost_usd')}; "
              f"the rest projected at ${project.get('projected_cost_usd')}")  # fmt: skip
    print(f"  waited    : in the {wait.get('waited_in', '?')} ({wait.get('polls') or 0} polls)")
    final = result.xcom("tickets.finalize") or {}
    print(
        f"  accepted  : {load.get('accepted', 0)}  -> final table ticket_triage ({final.get('accepted', 0)} rows)"
    )
    print(f"  rejected  : {load.get('rejected', 0)}  -> table ticket_triage_rejects (last reason per ticket)")
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
    estimate = (manifest.get("estimate") or {}).get("cost_usd")
    print(f"  cost      : ${load.get('cost_usd')} at batch prices (emulated usage); estimated before "
          f"submit: ${estimate} (output basis: {(manifest.get('estimate') or {}).get('output_basis')})")  # fmt: skip
    print(f"  QA sample : {final.get('qa_rows')} rows in {final.get('qa_table')}")
    print("=" * 72)


def print_crm(result: Any, elapsed: float) -> None:
    r = result.xcom("report") or {}
    cheap, strong = result.xcom("leads.s1_load") or {}, result.xcom("leads.s2_load") or {}
    costs = r.get("stage_cost_usd", {})
    print(f"  leads      : {r.get('records', 0)} on claude-haiku-4-5 -> {cheap.get('accepted', 0)} accepted, "
          f"{cheap.get('rejected', 0)} rejected; cost ${costs.get('s1')}")  # fmt: skip
    print(f"  escalated  : {r.get('escalated', 0)} to claude-fable-5 {r.get('escalated_by_reason', {})} "
          f"(over budget, not escalated: {r.get('not_escalated_over_budget', 0)})")  # fmt: skip
    print(
        f"  stage 2    : {strong.get('accepted', 0)} accepted, {strong.get('rejected', 0)} rejected; cost ${costs.get('s2')}"
    )
    print(f"  cascade    : ${r.get('cost_usd')} vs ${r.get('all_on_claude_fable_5_usd')} all on claude-fable-5 "
          f"(ratio {r.get('cost_vs_all_on_compare_model')})")  # fmt: skip
    print(
        f"  final rows : {r.get('final', {})} by stage, {r.get('unresolved', 0)} unresolved -> table lead_enrichment"
    )
    print(f"  accuracy   : {r.get('agreement', {})} on {r.get('labelled_rows', 0)} labelled leads")


def print_docs(result: Any, elapsed: float) -> None:
    plan = result.xcom("documents.combine_plan") or {}
    sections = result.xcom("documents.sections_load") or {}
    final = result.xcom("documents.finalize") or {}
    print(f"  documents  : {plan.get('records', 0)} ({plan.get('direct', 0)} short -> straight to combine, "
          f"{plan.get('chunked', 0)} chunked into {plan.get('sections', 0)} sections)")  # fmt: skip
    print(f"  sections   : {sections.get('accepted', 0)} summarised, {sections.get('rejected', 0)} rejected")
    print(f"  combined   : {final.get('accepted', 0)} summaries of {plan.get('to_combine', 0)} combine requests "
          f"-> table document_summaries")  # fmt: skip
    docs = [i["record_id"] for i in plan.get("incomplete_records", [])]
    print(f"  incomplete : {plan.get('incomplete', 0)} documents not combined (a section failed): "
          f"{', '.join(docs[:8])} -> table document_summaries_incomplete")  # fmt: skip
    print(f"  stage cost : {final.get('cost_usd_by_stage', {})}")


def print_cancellations(result: Any, elapsed: float) -> None:
    r = result.xcom("report") or {}
    print(f"  rows       : {sum(r.get('final', {}).values())} labelled, {r.get('unresolved', 0)} rejected "
          f"-> table cancellation_reasons_clean")  # fmt: skip
    print(f"  labels     : {r.get('distribution', {}).get('label', {})}")
    print(f"  other share: {(result.xcom('other_share') or {}).get('share')}")
    print(f"  review     : {r.get('inconsistent_texts', 0)} normalised texts mapped to more than one label "
          f"-> table cancellation_reason_review")  # fmt: skip
    print(f"  agreement  : {r.get('agreement', {}).get('label')} with the dataset's hidden labels "
          f"(emulator's generic model, not Claude)")  # fmt: skip
    print(f"  cost       : ${r.get('cost_usd')}")


#: dag_id -> (conf for the demo run, pattern summary printer, result table for `inspect`)
PATTERNS: dict[str, tuple[dict[str, Any], Any, str]] = {
    "crm_lead_enrichment": ({"limit": 500}, print_crm, "lead_enrichment"),
    "document_summaries": ({"limit": 40}, print_docs, "document_summaries"),
    # The emulator's generic model answers 'other' for most foreign or sarcastic text, far above
    # the 15% the DAG allows a real model; the demo raises the cap so the run shows everything.
    "cancellation_reason_cleanup": ({"limit": 2000, "max_other_share": 0.5}, print_cancellations,
                                    "cancellation_reason_review"),
}  # fmt: skip


def print_pattern(result: Any, elapsed: float, printer: Any) -> None:
    print()
    print("=" * 72)
    print(f"{result.dag_id}: run {result.state} in {elapsed:.1f}s")
    failed = {t: s for t, s in result.task_states.items() if s != "success"}
    if failed:
        print(f"  tasks not successful: {failed}")
    printer(result, elapsed)
    print("=" * 72)


def ground_truth_agreement(db: Path) -> str:
    """Share of accepted rows whose category matches the dataset's hidden expected_category.

    With the emulator this measures its keyword "model", not Claude; with a real key it is a
    quick QA signal for the prompt.
    """
    import sqlite3

    from airflow_provider_fable.example_data import iter_dataset

    truth = {row["ticket_id"]: row["expected_category"] for row in iter_dataset("support_tickets")}
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT ticket_id, category FROM ticket_triage").fetchall()
    if not rows:
        return "n/a"
    hits = sum(1 for ticket_id, category in rows if truth.get(ticket_id) == category)
    return f"{hits}/{len(rows)} = {hits / len(rows):.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dag",
        default="support_ticket_triage",
        choices=["support_ticket_triage", *PATTERNS],
        help="DAG to run",
    )
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
        print(f"Running {args.dag} with dag.test() (first run in a process warms up) ...", flush=True)
        from airflow_provider_fable.testing.airflow_env import load_dag, run_dag

        conf = PATTERNS[args.dag][0] if args.dag in PATTERNS else {"limit": args.limit}
        started = time.monotonic()
        result = run_dag(load_dag(args.dag), conf=conf)
        elapsed = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_emulator/stats", timeout=5) as resp:
            stats = json.load(resp)
    finally:
        done.set()
        stop(emulator)
    if args.dag in PATTERNS:
        _, printer, table = PATTERNS[args.dag]
        print_pattern(result, elapsed, printer)
        print(f"  inspect    : sqlite3 {WORK / 'backlog.db'} 'select * from {table} limit 5'")
        if result.state != "success":
            print("demo FAILED: the run did not succeed", file=sys.stderr)
            return 1
        return 0
    print_summary(result, elapsed)
    print(
        f"  category agreement with the dataset's ground truth: {ground_truth_agreement(WORK / 'backlog.db')}"
    )
    calls = stats.get("calls", {})
    print(
        f"  emulator  : calls {json.dumps(calls, sort_keys=True)}; faults {json.dumps(stats.get('faults', {}))[:200]}"
    )
    print(f"  inspect   : sqlite3 {WORK / 'backlog.db'} 'select * from ticket_triage limit 5'")
    load = result.xcom("tickets.s1_load") or {}
    if result.state != "success" or not load.get("accepted"):
        print("demo FAILED: the run did not succeed or accepted nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

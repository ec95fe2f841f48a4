"""Benchmark: results streamed through FableHook from the emulator over HTTP -> SQLite rows.

Shows that the load path keeps its speed when the results come over HTTP (streamed, never the
whole file in memory). The emulator runs in its own process; batches of ticket-triage requests
(built by ``core.requests`` from the bundled tickets, ids made unique) are created through the
hook and answered by the emulator's model. Then, each in its own process:

- hook: ``FableHook.iter_results`` -> ``core.loading.load_batch`` -> SQLite (this provider's
  load task without Airflow's scheduler around it);
- file: the same lines, downloaded beforehand to a local file, through the same load path
  (what the HTTP stream is compared with: ``vs_file`` near 1 means HTTP costs nothing extra);
- baseline: the SDK's ``client.messages.batches.results(id)`` over HTTP (typed objects per
  line), ``model_validate_json`` per answer, ``DataFrame.to_sql``.

Prints ``bench load_hook: rows=... hook_rows_s=... file_rows_s=... baseline_rows_s=...
hook_rss_mb=... baseline_rss_mb=... vs_file=... vs_baseline=...``.

Run: ``.venv/bin/python bench/load_hook.py [--rows 10000]`` (rounded up to whole batches of
at most 100,000 requests). The default is small because the emulator's model answering the
requests (not the load) dominates the setup time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KEY = "bench-key-not-secret"
TABLE = "ticket_triage"


def _env(base_url: str, home: str) -> dict[str, str]:
    conn = {"conn_type": "fable", "host": base_url, "password": KEY}
    return {
        **os.environ,
        "AIRFLOW_HOME": home,
        "AIRFLOW_CONN_FABLE_DEFAULT": json.dumps(conn),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


def child(kind: str, batch_ids: list[str], db: str, file: str | None) -> dict:
    import sqlalchemy as sa
    from load import TicketTriage

    engine = sa.create_engine(f"sqlite:///{db}")
    accepted = rejected = 0
    if kind in ("hook", "file"):
        from airflow_provider_fable.core.loading import LoadStats, load_batch
        from airflow_provider_fable.core.results import parse_result_line
        from airflow_provider_fable.core.sinks import ResultSink
        from airflow_provider_fable.hooks.fable import FableHook

        sink = ResultSink(engine, table=TABLE, id_column="ticket_id", output_model=TicketTriage)
        sink.ensure_tables()
        stats = LoadStats()
        hook = FableHook()
        hook.client  # noqa: B018 - connection read and SDK imported before the clock starts
        start = time.perf_counter()
        for batch_id in batch_ids:
            if kind == "hook":
                results = hook.iter_results(batch_id)
            else:
                results = map(parse_result_line, open(f"{file}.{batch_id}", "rb"))  # noqa: SIM115
            load_batch(results, batch_id=batch_id, output_model=TicketTriage, sink=sink, stats=stats)
        accepted, rejected = stats.accepted, stats.rejected
    else:
        import anthropic
        import pandas as pd
        from pydantic import ValidationError

        client = anthropic.Anthropic(
            api_key=KEY, base_url=json.loads(os.environ["AIRFLOW_CONN_FABLE_DEFAULT"])["host"]
        )
        start = time.perf_counter()
        good, bad = [], []
        for batch_id in batch_ids:
            for item in client.messages.batches.results(batch_id):
                result = item.result
                if result.type != "succeeded" or result.message.stop_reason == "max_tokens":
                    bad.append({"record_id": item.custom_id, "batch_id": batch_id, "reason": result.type})
                    continue
                text = "".join(b.text for b in result.message.content if b.type == "text")
                try:
                    answer = TicketTriage.model_validate_json(text, strict=True)
                except ValidationError as exc:
                    bad.append({"record_id": item.custom_id, "batch_id": batch_id, "reason": str(exc)[:200]})
                    continue
                good.append(
                    {"ticket_id": item.custom_id, **answer.model_dump(mode="json"), "_batch_id": batch_id}
                )
        pd.DataFrame(good).to_sql(TABLE, engine, if_exists="append", index=False)
        pd.DataFrame(bad).to_sql(f"{TABLE}_rejects", engine, if_exists="append", index=False)
        accepted, rejected = len(good), len(bad)
    return {"seconds": time.perf_counter() - start, "accepted": accepted, "rejected": rejected}


def create_batches(rows: int, env: dict[str, str]) -> list[str]:
    """Create the batches through the hook (in a child with the connection set)."""
    code = f"""
import csv, json, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / "bench")!r})
from load import TicketTriage
from airflow_provider_fable.core.job import BatchJob
from airflow_provider_fable.core.requests import build_requests
from airflow_provider_fable.hooks.fable import FableHook
tickets = list(csv.DictReader(open({str(ROOT / "dags/data/support_tickets.csv")!r}, encoding="utf-8")))
job = BatchJob(prompt_template="Ticket via {{channel}}\\nSubject: {{subject}}\\n\\n{{body}}",
               output_model=TicketTriage, id_field="id", max_tokens=400)
hook, ids, rows = FableHook(), [], {rows}
for start in range(0, rows, 100_000):
    records = ({{**tickets[i % len(tickets)], "id": f"T-{{i:08d}}"}} for i in range(start, min(rows, start + 100_000)))
    ids.append(hook.create_batch(list(build_requests(job, records))).id)
for batch_id in ids:
    hook.retrieve_batch(batch_id)
print(json.dumps(ids))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def download(batch_ids: list[str], env: dict[str, str], file: str) -> None:
    code = f"""
import sys
from airflow_provider_fable.hooks.fable import FableHook
hook = FableHook()
for batch_id in {batch_ids!r}:
    with open({file!r} + "." + batch_id, "wb") as fh:
        for line in hook.iter_result_lines(batch_id):
            fh.write(line + b"\\n")
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)


def run_child(kind: str, batch_ids: list[str], env: dict[str, str], workdir: Path, file: str) -> dict:
    db = workdir / f"{kind}.db"
    db.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--batch-ids",
        ",".join(batch_ids),
        "--db",
        str(db),
        "--file",
        file,
    ]
    try:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{kind} failed:\n{exc.stderr}") from None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--child")
    parser.add_argument("--batch-ids")
    parser.add_argument("--db")
    parser.add_argument("--file")
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.batch_ids.split(","), args.db, args.file)
        result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="fable-bench-hook-") as tmp:
        workdir = Path(tmp)
        emulator = subprocess.Popen(
            [sys.executable, "-m", "airflow_provider_fable.emulator", "--port", "0", "--api-key", KEY],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert emulator.stdout is not None
            base_url = re.search(r"listening on (\S+)", emulator.stdout.readline()).group(1)  # type: ignore[union-attr]
            env = _env(base_url, str(workdir / "airflow"))
            start = time.perf_counter()
            batch_ids = create_batches(args.rows, env)
            print(
                f"created {len(batch_ids)} batch(es) for {args.rows} requests in {time.perf_counter() - start:.1f}s"
            )
            file = str(workdir / "results.jsonl")
            download(batch_ids, env, file)
            figures = {k: run_child(k, batch_ids, env, workdir, file) for k in ("hook", "file", "baseline")}
        finally:
            emulator.terminate()
            emulator.wait()
    split = {(f["accepted"], f["rejected"]) for f in figures.values()}
    if len(split) != 1:
        raise SystemExit(f"paths disagree: {figures}")
    rows = sum(split.pop())
    hook, file_, base = (rows / figures[k]["seconds"] for k in ("hook", "file", "baseline"))
    print("  " + " ".join(f"{k}={v['seconds']:.2f}s/{v['rss_mb']:.0f}MB" for k, v in figures.items()))
    print(
        f"bench load_hook: rows={rows} hook_rows_s={hook:.0f} file_rows_s={file_:.0f} "
        f"baseline_rows_s={base:.0f} hook_rss_mb={figures['hook']['rss_mb']:.0f} "
        f"baseline_rss_mb={figures['baseline']['rss_mb']:.0f} vs_file={hook / file_:.2f} "
        f"vs_baseline={hook / base:.2f}"
    )


if __name__ == "__main__":
    main()

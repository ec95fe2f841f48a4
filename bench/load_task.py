"""Benchmark: the real load task (``FableValidateLoadOperator.execute``) against the emulator,
with the job ledger and the destination on PostgreSQL (or SQLite), vs a plain-SDK script.

What issue #19 measured as "load: 1M results -> PostgreSQL rows + ledger verdicts": the whole
task, not only ``core.loading`` (``bench/load.py``): the results download through the SDK's
HTTP client, completeness by custom_id (``ResultScreen``), the verdicts in the ledger
(``record_outcomes``), usage counting, the report tables (``fable_job_loads``,
``fable_job_counts``), the QA sample and the guardrails.

Setup (cached in ``--state``, reused by later runs of the same size): the emulator (its own
process, ``--state`` file, so the answers are generated once), N ticket-triage records
submitted by the real ``FableBatchSubmitOperator`` with a ledger, the batches ended and their
results generated. The ledger as the submit left it is kept as a template (a PostgreSQL
template database, or a copied SQLite file); every timed run starts from a fresh copy of it
and an empty destination, so each is a first load.

Then, each in its own process (wall, CPU, peak RSS of that process):

- task: ``FableValidateLoadOperator(...).execute(context)`` with ``ledger_conn_id`` and
  ``destination_conn_id`` (this provider's load task without Airflow's scheduler around it);
- baseline: what a user writes with the plain SDK: ``client.messages.batches.results(id)``,
  ``json.loads`` of each answer's text, rows into a list, ``DataFrame.to_sql`` (no ledger, no
  validation beyond JSON, no upsert, no rejects table).

Prints ``bench load_task: backend=... records=... task_s=... task_cpu_s=... task_server_cpu_s=...
task_rss_mb=... baseline_s=... baseline_cpu_s=... baseline_server_cpu_s=... baseline_rss_mb=...
overhead_s=... overhead_per_1m_s=... work_overhead_per_1m_s=... load_avg=... vs_baseline=...``:
``overhead_s`` = task - baseline wall time; ``work_overhead_per_1m_s`` the same in CPU seconds
of the process plus its PostgreSQL backends (per million records), the figure a shared machine
disturbs least; ``vs_baseline`` = baseline_s / task_s (>= 1: the task is at least as fast as the
plain script). Both clocks include the imports (the SDK's costs seconds).

Run: ``.venv/bin/python bench/load_task.py --records 100000 --backend postgres``.
``--profile FILE`` writes a cProfile of the task process; ``--runs N`` repeats the timed pair.
The setup of 100,000 records takes the emulator's answer generation (~1 ms per answer today);
``--records 1000000 --clone-from 100000`` builds the 1M setup from the 100k one (PostgreSQL or
SQLite; ``--clone-state`` when the 100k one is not in the default ``--state``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KEY = "bench-key-not-secret"
TABLE = "ticket_triage"
PG = os.environ.get("FABLE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
TICKETS = ROOT / "airflow_provider_fable/example_data/support_tickets.csv"


def _pg_url(db: str) -> str:
    return f"{PG}/{db}"


def _conn(backend: str, name: str) -> dict[str, Any]:
    """An Airflow connection (as JSON) for database ``name`` (a db name, or a SQLite file path)."""
    if backend == "postgres":
        return {
            "conn_type": "postgres",
            "host": "127.0.0.1",
            "port": 5432,
            "login": "postgres",
            "schema": name,
        }
    return {"conn_type": "sqlite", "host": name}


def _env(base_url: str, home: Path, backend: str, ledger: str, dest: str) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_FABLE_DEFAULT": json.dumps({"conn_type": "fable", "host": base_url, "password": KEY}),
        "AIRFLOW_CONN_LEDGER_DB": json.dumps(_conn(backend, ledger)),
        "AIRFLOW_CONN_DEST_DB": json.dumps(_conn(backend, dest)),
    }


def _psql(sql: str) -> None:
    subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", sql], check=True,
                   capture_output=True)  # fmt: skip


def _context(task_id: str) -> dict[str, Any]:
    """What the operators read from a task context: the task instance's identity."""
    from types import SimpleNamespace

    return {"ti": SimpleNamespace(dag_id="bench", run_id="manual__1", task_id=task_id, map_index=-1)}


# ------------------------------------------------------------------------------------ children
def child_submit(records: int, out: str) -> None:
    """Submit ``records`` tickets through the real submit operator, then end the batches."""
    import csv

    from load import TicketTriage

    from airflow_provider_fable.hooks.fable import FableHook
    from airflow_provider_fable.operators.submit import FableBatchSubmitOperator

    tickets = list(csv.DictReader(TICKETS.open(encoding="utf-8")))
    rows = [{**tickets[i % len(tickets)], "id": f"T-{i:08d}"} for i in range(records)]
    op = FableBatchSubmitOperator(
        task_id="submit",
        prompt_template="Ticket via {channel}\nSubject: {subject}\n\n{body}",
        output_model=TicketTriage,
        records=rows,
        max_tokens=400,
        ledger_conn_id="ledger_db",
        destination_conn_id="dest_db",
        destination_table=TABLE,
    )
    manifest = op.execute(_context("submit"))
    hook = FableHook()
    for batch_id in manifest["batch_ids"]:
        while hook.retrieve_batch(batch_id).processing_status != "ended":
            time.sleep(1)
    Path(out).write_text(json.dumps(manifest, default=str))


def _cpu() -> float:
    """CPU seconds of this process and of its ended children (the SQLite writer process)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_task(manifest_file: str, profile: str | None) -> dict[str, Any]:
    from load import TicketTriage

    from airflow_provider_fable.operators.load import FableValidateLoadOperator

    manifest = json.loads(Path(manifest_file).read_text())
    op = FableValidateLoadOperator(
        task_id="load",
        batch_ids=manifest,
        submit_manifest=manifest,
        output_model=TicketTriage,
        destination_conn_id="dest_db",
        table=TABLE,
        id_column="ticket_id",
        ledger_conn_id="ledger_db",
        fail_when_all_rejected=False,
    )
    cpu0, start = _cpu(), time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        summary = prof.runcall(op.execute, _context("load"))
        prof.dump_stats(profile)
    else:
        summary = op.execute(_context("load"))
    return {
        "seconds": time.perf_counter() - start, "cpu": _cpu() - cpu0,
        "accepted": summary["accepted"], "rejected": summary["rejected"],
    }  # fmt: skip


def child_baseline(manifest_file: str, backend: str, dest: str) -> dict[str, Any]:
    cpu0, start = _cpu(), time.perf_counter()  # its imports count, as the task's do
    import anthropic
    import pandas as pd
    import sqlalchemy as sa

    manifest = json.loads(Path(manifest_file).read_text())
    url = (
        _pg_url(dest).replace("postgresql://", "postgresql+psycopg2://")
        if backend == "postgres"
        else f"sqlite:///{dest}"
    )
    engine = sa.create_engine(url)
    client = anthropic.Anthropic(
        api_key=KEY, base_url=json.loads(os.environ["AIRFLOW_CONN_FABLE_DEFAULT"])["host"]
    )
    good, bad = [], []
    for batch_id in manifest["batch_ids"]:
        for item in client.messages.batches.results(batch_id):
            result = item.result
            if result.type != "succeeded":
                bad.append({"ticket_id": item.custom_id, "reason": result.type})
                continue
            text = "".join(b.text for b in result.message.content if b.type == "text")
            try:
                answer = json.loads(text)
            except ValueError:
                bad.append({"ticket_id": item.custom_id, "reason": "invalid_json"})
                continue
            good.append({"ticket_id": item.custom_id, **answer, "_batch_id": batch_id})
    pd.DataFrame(good).to_sql(TABLE, engine, if_exists="append", index=False, chunksize=10_000)
    if bad:
        pd.DataFrame(bad).to_sql(f"{TABLE}_rejects", engine, if_exists="append", index=False)
    return {"seconds": time.perf_counter() - start, "cpu": _cpu() - cpu0,
            "accepted": len(good), "rejected": len(bad)}  # fmt: skip


# ------------------------------------------------------------------------------------ driver
class _ServerCPU:
    """CPU seconds the PostgreSQL server spent for the child: its backends on ``databases``.

    The machine is shared, so wall time says as much about the neighbours as about the load;
    the child's CPU plus its server backends' CPU is the work the load itself caused. Sampled
    every 0.2 s from ``pg_stat_activity`` and ``/proc/<pid>/stat`` (the server is local).
    """

    def __init__(self, databases: list[str]) -> None:
        import threading

        self.databases, self.seen, self.done = databases, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        names = ",".join(f"'{d}'" for d in self.databases)
        ticks = os.sysconf("SC_CLK_TCK")
        while not self.done.wait(0.2):
            out = subprocess.run(
                ["psql", "-Atq", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c",
                 f"SELECT pid FROM pg_stat_activity WHERE datname IN ({names})"],
                capture_output=True, text=True,
            )  # fmt: skip
            for pid in out.stdout.split():
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                self.seen[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return sum(self.seen.values())


def _run(args: list[str], env: dict[str, str], databases: list[str] | None = None) -> dict[str, Any]:
    server = _ServerCPU(databases) if databases else None
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{args[:2]} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if server is not None:
        result["server_cpu"] = server.stop()
    return result


def _template_exists(backend: str, template: str) -> bool:
    """Whether the cached setup's ledger template is still there (a dropped one: set up again)."""
    if backend != "postgres":
        return Path(template).exists()
    out = subprocess.run(
        ["psql", "-Atq", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c",
         f"SELECT 1 FROM pg_database WHERE datname = '{template}'"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip() == "1"


def _fresh(backend: str, state: Path, template: str, name: str) -> str:
    """A fresh copy of ``template`` (the ledger) or an empty database (``template=''``)."""
    if backend == "postgres":
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        _psql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return name
    path = state / f"{name}.db"
    path.unlink(missing_ok=True)
    if template:
        shutil.copyfile(template, path)
    return str(path)


def clone_setup(source: Path, state: Path, backend: str, copies: int, source_tpl: str, tpl: str) -> None:
    """An N x 100k setup from a 100k one, without the emulator answering N x 100k requests again.

    The source's batch is copied ``copies - 1`` times: in the emulator's state file (result lines
    and metadata with the custom_ids ``T-000xxxxx`` renamed ``T-0jjxxxxx`` and a new batch id),
    in the ledger (its submission and records, renamed the same way) and in the manifest. The
    load then meets N distinct records in N / 100k batches, as after a real submit. The ledger
    is copied with SQL: a PostgreSQL template database, or a SQLite template file.
    """
    import sqlite3

    shutil.copyfile(source / "emulator.db", state / "emulator.db")
    manifest = json.loads((source / f"manifest-{backend}.json").read_text())
    [batch] = manifest["batch_ids"]
    db = sqlite3.connect(state / "emulator.db")
    (seq, meta, requests, lines), = db.execute(
        "SELECT seq, meta, requests, lines FROM batches WHERE id = ?", (batch,)
    )  # fmt: skip
    if backend == "postgres":
        _psql(f"DROP DATABASE IF EXISTS {tpl} WITH (FORCE)")
        _psql(f"CREATE DATABASE {tpl} TEMPLATE {source_tpl}")
    else:
        shutil.copyfile(source_tpl, tpl)
    sql = []
    for j in range(1, copies):
        new = f"{batch[:-4]}{j:04d}"
        old_prefix, new_prefix = "T-000", f"T-0{j:02d}"
        db.execute(
            "INSERT INTO batches (id, seq, meta, requests, lines, deleted) VALUES (?, ?, ?, ?, ?, 0)",
            (new, seq + j, meta.replace(f'"{old_prefix}', f'"{new_prefix}'), requests,
             bytes(lines).replace(f'"custom_id":"{old_prefix}'.encode(), f'"custom_id":"{new_prefix}'.encode())),
        )  # fmt: skip
        sql.append(
            f"INSERT INTO fable_submissions (id, job_id, run_key, api, digest, shard, request_count, byte_size, "
            f"state, batch_id, intent_at, batch_at, note) SELECT id + {j}, job_id, run_key, api, digest, shard + {j}, "
            f"request_count, byte_size, state, '{new}', intent_at, batch_at, note FROM fable_submissions "
            f"WHERE batch_id = '{batch}';"
            f"INSERT INTO fable_records SELECT job_id, '{new_prefix}' || substr(record_id, 6), "
            f"'{new_prefix}' || substr(custom_id, 6), status, '{new}', submission_id + {j}, request_digest, reason, "
            f"retryable, attempts, model, superseded_by, created_at, updated_at FROM fable_records "
            f"WHERE batch_id = '{batch}';"
        )
        manifest["batch_ids"].append(new)
        manifest["shards"].append({**manifest["shards"][0], "batch_id": new})
    db.commit()
    db.close()
    if backend == "postgres":
        subprocess.run(
            ["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", tpl, "-c", "".join(sql)], check=True
        )
    else:
        ledger = sqlite3.connect(tpl)
        ledger.executescript("BEGIN;" + "".join(sql) + "COMMIT;")
        ledger.close()
    for key in ("request_count", "submitted"):
        manifest[key] = manifest[key] * copies
    (state / f"manifest-{backend}.json").write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--state", help="setup cache directory (default /tmp/fable-load-task-<records>)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--clone-from", type=int, help="build the setup from the one of this size (x copies)")
    parser.add_argument(
        "--clone-state", help="the --state of the --clone-from setup (default /tmp/fable-load-task-<n>)"
    )
    parser.add_argument("--tag", default="fable_lt", help="prefix of the databases (PostgreSQL) and files")
    parser.add_argument("--child")
    parser.add_argument("--manifest")
    parser.add_argument("--dest")
    args = parser.parse_args()
    if args.child:
        if args.child == "submit":
            child_submit(args.records, args.manifest)
            result: dict[str, Any] = {}
        elif args.child == "task":
            result = child_task(args.manifest, args.profile)
        else:
            result = child_baseline(args.manifest, args.backend, args.dest)
        result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    n, backend = args.records, args.backend
    state = Path(args.state or f"/tmp/fable-load-task-{n}")
    state.mkdir(parents=True, exist_ok=True)
    tag = f"{args.tag}_{n}"
    template = f"{tag}_tpl" if backend == "postgres" else str(state / f"{tag}_tpl.db")
    if args.clone_from and not (
        (state / f"manifest-{backend}.json").exists() and _template_exists(backend, template)
    ):
        source = Path(args.clone_state or f"/tmp/fable-load-task-{args.clone_from}")
        source_tpl = (
            f"{args.tag}_{args.clone_from}_tpl" if backend == "postgres"
            else str(source / f"{args.tag}_{args.clone_from}_tpl.db")
        )  # fmt: skip
        clone_setup(source, state, backend, n // args.clone_from, source_tpl, template)
    emulator = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_fable.emulator", "--port", "0", "--api-key", KEY,
         "--state", str(state / "emulator.db")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout is not None
        base_url = re.search(r"listening on (\S+)", emulator.stdout.readline()).group(1)  # type: ignore[union-attr]
        home = state / "airflow"
        manifest = state / f"manifest-{backend}.json"
        if not manifest.exists() or not _template_exists(backend, template):
            start = time.perf_counter()
            ledger = _fresh(backend, state, "", f"{tag}_tpl")
            dest = _fresh(backend, state, "", f"{tag}_dest")
            _run(["--child", "submit", "--records", str(n), "--manifest", str(manifest)],
                 _env(base_url, home, backend, ledger, dest))  # fmt: skip
            print(f"setup: {n} records submitted and answered in {time.perf_counter() - start:.0f}s")
        for _ in range(args.runs):
            ledger = _fresh(backend, state, template, f"{tag}_ledger")
            dest = _fresh(backend, state, "", f"{tag}_dest")
            env = _env(base_url, home, backend, ledger, dest)
            dbs = [ledger, dest] if backend == "postgres" else None
            profile = ["--profile", args.profile] if args.profile else []
            task = _run(["--child", "task", "--manifest", str(manifest), *profile], env, dbs)
            work = task["cpu"] + task.get("server_cpu", 0.0)
            line = (
                f"bench load_task: backend={backend} records={n} task_s={task['seconds']:.2f} "
                f"task_cpu_s={task['cpu']:.2f} task_server_cpu_s={task.get('server_cpu', 0.0):.2f} "
                f"task_rss_mb={task['rss_mb']:.0f} accepted={task['accepted']} rejected={task['rejected']}"
            )
            if not args.no_baseline:
                dest = _fresh(backend, state, "", f"{tag}_dest")
                env = _env(base_url, home, backend, ledger, dest)
                dbs = [dest] if backend == "postgres" else None
                base = _run(["--child", "baseline", "--manifest", str(manifest), "--backend", backend,
                             "--dest", dest], env, dbs)  # fmt: skip
                base_work = base["cpu"] + base.get("server_cpu", 0.0)
                overhead = task["seconds"] - base["seconds"]
                line += (
                    f" baseline_s={base['seconds']:.2f} baseline_cpu_s={base['cpu']:.2f} "
                    f"baseline_server_cpu_s={base.get('server_cpu', 0.0):.2f} baseline_rss_mb={base['rss_mb']:.0f} "
                    f"overhead_s={overhead:.2f} overhead_per_1m_s={overhead * 1_000_000 / n:.1f} "
                    f"work_overhead_per_1m_s={(work - base_work) * 1_000_000 / n:.1f} "
                    f"load_avg={os.getloadavg()[0]:.1f} vs_baseline={base['seconds'] / task['seconds']:.2f}"
                )
            print(line, flush=True)
    finally:
        emulator.terminate()
        emulator.wait()


if __name__ == "__main__":
    main()

"""Benchmark: one job of N short records end to end through real Airflow, against a plain-SDK script.

Ours: ``airflow dags test`` (a subprocess with its own AIRFLOW_HOME in a temp dir) of a generated
DAG ``FableBatchSubmitOperator -> FableBatchSensor (deferrable) -> FableValidateLoadOperator``
over a ``.jsonl`` file of N synthetic ticket-like records (``bench/submit.py``'s records and answer
model), against an emulator started here (``--processing-seconds 1``, its own process). Ledger
and destination are one private PostgreSQL database (``postgres``: the documented setup for
Celery and Kubernetes) or SQLite files (``sqlite``: the embedded ledger under AIRFLOW_HOME and a
SQLite destination).

Baseline: the script a user would write with the plain SDK (this file's ``--baseline`` child):
read the same ``.jsonl``, build the same requests (template, system prompt, structured output
from ``anthropic.transform_schema``), ``client.messages.batches.create`` per 100,000-request
shard, poll ``retrieve`` every second until each batch has ended, iterate ``results()``,
``json.loads`` each answer, ``pandas.DataFrame(rows).to_sql`` into the same backend. No ledger,
no validation, no upsert, no rejects table.

Per task, measured inside the ``dags test`` process by a thin subclass of each operator in the
generated DAG (tasks run in-process there, one after the other): wall time; CPU (user+sys of
the process, ``getrusage`` self + waited children, so the SQLite load's writer process counts);
peak RSS of the process during the task (the kernel's high-water mark is reset with
``/proc/self/clear_refs`` = 5 when the task starts and ``VmHWM`` is read when it ends); and the
time spent inside the API calls (``FableHook.create_batch_from_body``, ``count_tokens``,
``iter_result_lines``), timed by wrappers the DAG file installs on the hook class. The sensor's
numbers run from its ``execute`` to its ``execute_complete`` (the in-process trigger in between).

Provider overhead (what this bench is about): task time minus time spent waiting on the emulator.
Waiting = wall time inside a create call or inside the results download iterator minus the CPU
the calling thread spends in it (``time.thread_time``: serialising, streaming, parsing are the
client's work, not the emulator's), plus a wait's wall minus its CPU. So
  ours     = submit wall + load wall - waiting in creates and downloads + sensor CPU
  baseline = script wall - waiting in creates and results() - (poll-loop wall - its CPU)
``count_tokens`` (the submit's cost estimate, 50 calls) is counted as overhead (the baseline
makes none). ``vs_baseline`` = baseline overhead / ours (>= 1: ours at least as fast).

Prints one line per task and per baseline, a ``result:`` line per (backend, records), and last
``bench end_to_end: ...`` for the run with the lowest vs_baseline.

Run: ``.venv/bin/python bench/end_to_end.py`` (100,000 records, postgres and sqlite);
``--records 100000 1000000 --backends postgres sqlite``. PostgreSQL: ``--pg-admin-url`` (default
``postgresql://root@127.0.0.1:5432/postgres``) creates and drops the database ``--pg-db``
(default ``h4_e2e``) around each run.
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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
KEY = "bench-key"
DAG_ID = "fable_e2e_bench"
PROMPT = "Subject: {subject}\n\n{body}"
SYSTEM = "Triage the support ticket: label, urgency and a one-line summary."
MODEL = "claude-fable-5"
MAX_TOKENS = 1024
SHARD = 100_000
POLL_SECONDS = 1.0
TABLE = "e2e_answers"

# The generated DAG. The subclasses only time the public operators' own methods; the API-call
# timers wrap FableHook methods in this (bench) process, never in the package.
DAG_FILE = """
from __future__ import annotations

import json
import os
import resource
import sys
import time
from datetime import datetime

sys.path.insert(0, {bench!r})

from airflow.sdk import DAG
from submit import Answer

from airflow_provider_fable.hooks.fable import FableHook
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.sensors.batch import FableBatchSensor

EVENTS = os.environ["FABLE_E2E_EVENTS"]
TIMERS = FableHook.__dict__.get("_e2e_timers", {{}})


def _add(name, start, cpu0):
    # Wall time inside the call, and the calling thread's own CPU in it (serialising, parsing):
    # the difference is the time spent waiting on the emulator.
    TIMERS[name] = TIMERS.get(name, 0.0) + time.perf_counter() - start
    TIMERS[name + "_cpu"] = TIMERS.get(name + "_cpu", 0.0) + time.thread_time() - cpu0


def _timed(name, method, generator=False):
    if generator:
        def wrapper(self, *args, **kwargs):
            inner = method(self, *args, **kwargs)
            while True:
                start, cpu0 = time.perf_counter(), time.thread_time()
                try:
                    item = next(inner)
                except StopIteration:
                    _add(name, start, cpu0)
                    return
                _add(name, start, cpu0)
                yield item
    else:
        def wrapper(self, *args, **kwargs):
            start, cpu0 = time.perf_counter(), time.thread_time()
            try:
                return method(self, *args, **kwargs)
            finally:
                _add(name, start, cpu0)
    return wrapper


if "_e2e_timers" not in FableHook.__dict__:
    FableHook._e2e_timers = TIMERS
    FableHook.create_batch_from_body = _timed("create", FableHook.create_batch_from_body)
    FableHook.create_batch = _timed("create", FableHook.create_batch)
    FableHook.count_tokens = _timed("count_tokens", FableHook.count_tokens)
    FableHook.iter_result_lines = _timed("download", FableHook.iter_result_lines, generator=True)


def _mark(task_id, event):
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    hwm = 0
    if event == "begin":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS high-water mark: this task's peak from here
        except OSError:
            pass
    else:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    row = {{"task": task_id, "event": event, "t": time.time(),
           "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
           "hwm_kb": hwm, "kids_maxrss_kb": kids.ru_maxrss, "timers": dict(TIMERS)}}
    with open(EVENTS, "a") as f:
        f.write(json.dumps(row) + "\\n")


PROFILE_DIR = os.environ.get("FABLE_E2E_PROFILE_DIR")


class Measured:
    def execute(self, context):
        _mark(self.task_id, "begin")
        done = False
        profiler = None
        if PROFILE_DIR and self.task_id != "wait":
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            result = super().execute(context)
            done = True
            return result
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(os.path.join(PROFILE_DIR, self.task_id + ".prof"))
            if done or not getattr(self, "_e2e_deferring", False):
                _mark(self.task_id, "end")

    def defer(self, *args, **kwargs):
        self._e2e_deferring = True
        return super().defer(*args, **kwargs)

    def execute_complete(self, context, event):
        try:
            return super().execute_complete(context, event)
        finally:
            _mark(self.task_id, "end")


class Submit(Measured, FableBatchSubmitOperator):
    pass


class Wait(Measured, FableBatchSensor):
    pass


class Load(Measured, FableValidateLoadOperator):
    pass


LEDGER = os.environ.get("FABLE_E2E_LEDGER_CONN") or None
DEST = os.environ["FABLE_E2E_DEST_CONN"]

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    submit = Submit(
        task_id="submit",
        records=os.environ["FABLE_E2E_RECORDS"],
        prompt_template={prompt!r},
        system_prompt={system!r},
        output_model=Answer,
        model={model!r},
        max_tokens={max_tokens!r},
        ledger_conn_id=LEDGER,
    )
    wait = Wait(task_id="wait", batch_ids=submit.output, poll_interval={poll!r})
    load = Load(
        task_id="load",
        batch_ids=wait.output,
        output_model=Answer,
        destination_conn_id=DEST,
        table={table!r},
        submit_manifest=submit.output,
        ledger_conn_id=LEDGER,
    )
    submit >> wait >> load
"""


def records(n: int) -> Iterator[dict[str, str]]:
    """The synthetic tickets of ``bench/submit.py`` (same text, same ids)."""
    sys.path.insert(0, str(BENCH))
    from submit import records as submit_records

    return submit_records(n)


def write_records(path: Path, n: int) -> None:
    with path.open("w") as f:
        for rec in records(n):
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")


# ---------------------------------------------------------------------------------------- emulator
class Emulator:
    """The emulator in its own process (its CPU read from /proc, never counted as ours)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "airflow_provider_fable.emulator", "--port", "0",
                "--processing-seconds", "1", "--api-key", KEY,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"https?://[\d.]+:\d+", line)
        if not match:
            self.proc.kill()
            raise SystemExit(f"emulator did not start: {line!r}")
        self.url = match.group(0)
        self.cpu0 = self.cpu()

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> tuple[float, float]:
        used, peak = self.cpu() - self.cpu0, self.rss_mb()
        self.proc.terminate()
        self.proc.wait()
        return used, peak


# ---------------------------------------------------------------------------------------- backends
def pg(admin_url: str, sql: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(sql))
    engine.dispose()


class Backend:
    """A fresh ledger + destination for one run: a private PostgreSQL database or SQLite files."""

    def __init__(self, kind: str, run_dir: Path, args: argparse.Namespace) -> None:
        self.kind, self.args = kind, args
        if kind == "postgres":
            pg(args.pg_admin_url, f"DROP DATABASE IF EXISTS {args.pg_db} WITH (FORCE)")
            pg(args.pg_admin_url, f"CREATE DATABASE {args.pg_db}")
            base = args.pg_admin_url.rsplit("/", 1)[0]
            self.sqlalchemy_url = f"{base}/{args.pg_db}".replace("postgresql://", "postgresql+psycopg2://")
            self.airflow_conn = {
                "conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "root",
                "schema": args.pg_db,
            }  # fmt: skip
            host = re.search(r"@([^:/]+):?(\d+)?/", args.pg_admin_url)
            login = re.search(r"//([^@:]+)", args.pg_admin_url)
            if host:
                self.airflow_conn["host"] = host.group(1)
                self.airflow_conn["port"] = int(host.group(2) or 5432)
            if login:
                self.airflow_conn["login"] = login.group(1)
        else:
            path = run_dir / "destination.db"
            self.sqlalchemy_url = f"sqlite:///{path}"
            self.airflow_conn = {"conn_type": "sqlite", "host": str(path)}

    def drop(self) -> None:
        if self.kind == "postgres":
            pg(self.args.pg_admin_url, f"DROP DATABASE IF EXISTS {self.args.pg_db} WITH (FORCE)")


# ---------------------------------------------------------------------------------------- ours
def airflow_env(home: Path, dags: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FABLE_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
    )
    home.mkdir(parents=True, exist_ok=True)
    key = home / "fernet.key"
    if not key.exists():
        from cryptography.fernet import Fernet

        key.write_bytes(Fernet.generate_key())
    env["AIRFLOW__CORE__FERNET_KEY"] = key.read_text().strip()
    return env


def airflow_cli() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def template_home(base: Path) -> Path:
    """One migrated Airflow home; each run gets a copy (a fresh embedded ledger, a fresh DB)."""
    home = base / "airflow-template"
    dags = base / "no-dags"
    dags.mkdir(parents=True, exist_ok=True)
    env = airflow_env(home, dags)
    done = subprocess.run([airflow_cli(), "db", "migrate"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"airflow db migrate failed:\n{done.stderr[-3000:]}")
    return home


def wait4(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float, float]:
    """Run ``cmd``; return (rc, wall s, CPU s user+sys, peak RSS MB) of it and its children."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def run_ours(
    kind: str, n: int, data: Path, base: Path, template: Path, args: argparse.Namespace
) -> dict[str, Any]:
    run_dir = base / f"ours-{kind}-{n}"
    home, dags = run_dir / "airflow", run_dir / "dags"
    dags.mkdir(parents=True)
    shutil.copytree(template, home)
    (dags / f"{DAG_ID}.py").write_text(
        DAG_FILE.format(
            bench=str(BENCH),
            dag_id=DAG_ID,
            prompt=PROMPT,
            system=SYSTEM,
            model=MODEL,
            max_tokens=MAX_TOKENS,
            poll=POLL_SECONDS,
            table=TABLE,
        )  # fmt: skip
    )
    backend = Backend(kind, run_dir, args)
    emulator = Emulator()
    events = run_dir / "events.jsonl"
    try:
        env = airflow_env(home, dags)
        env.update(
            {
                "AIRFLOW_CONN_FABLE_DEFAULT": json.dumps(
                    {"conn_type": "fable", "host": emulator.url, "password": KEY}
                ),
                "AIRFLOW_CONN_E2E_DB": json.dumps(backend.airflow_conn),
                "FABLE_E2E_EVENTS": str(events),
                "FABLE_E2E_RECORDS": str(data),
                "FABLE_E2E_DEST_CONN": "e2e_db",
                "FABLE_E2E_LEDGER_CONN": "e2e_db" if kind == "postgres" else "",
                "FABLE_E2E_PROFILE_DIR": str(run_dir) if args.profile else "",
            }
        )
        rc, wall, cpu, rss = wait4([airflow_cli(), "dags", "test", DAG_ID], env, run_dir / "dags_test.log")
        emu_cpu, emu_rss = emulator.stop()
        if rc:
            raise SystemExit(f"airflow dags test failed (rc {rc}); log: {run_dir / 'dags_test.log'}")
        tasks = task_figures(events)
        rows = count_rows(backend.sqlalchemy_url, TABLE)
    finally:
        if emulator.proc.poll() is None:
            emulator.stop()
        backend.drop()
    missing = [t for t in ("submit", "wait", "load") if t not in tasks]
    if missing:
        raise SystemExit(f"no figures for {missing}; log: {run_dir / 'dags_test.log'}")
    s, w, ld = tasks["submit"], tasks["wait"], tasks["load"]
    # Waiting on the emulator: wall inside the create / download calls minus this thread's CPU in
    # them; the sensor's wall minus its CPU. Everything else is the provider's overhead.
    api_wait = (s["create"] - s["create_cpu"]) + (ld["download"] - ld["download_cpu"])
    overhead = (s["wall"] + ld["wall"] - api_wait) + w["cpu"]
    return {
        "tasks": tasks, "process_wall": wall, "process_cpu": cpu, "process_rss": rss, "rows": rows,
        "emulator_cpu": emu_cpu, "emulator_rss": emu_rss, "overhead": overhead,
        "api_wait": api_wait + w["wall"] - w["cpu"],
    }  # fmt: skip


def task_figures(events: Path) -> dict[str, dict[str, float]]:
    begin: dict[str, dict[str, Any]] = {}
    out: dict[str, dict[str, float]] = {}
    for line in events.read_text().splitlines():
        row = json.loads(line)
        if row["event"] == "begin":
            begin.setdefault(row["task"], row)
            continue
        b = begin[row["task"]]
        timers = {
            k: row["timers"].get(k, 0.0) - b["timers"].get(k, 0.0)
            for k in ("create", "create_cpu", "count_tokens", "count_tokens_cpu", "download", "download_cpu")
        }
        out[row["task"]] = {
            "wall": row["t"] - b["t"], "cpu": row["cpu"] - b["cpu"], "peak_rss_mb": row["hwm_kb"] / 1024,
            "child_rss_mb": row["kids_maxrss_kb"] / 1024, **timers,
        }  # fmt: skip
    return out


def count_rows(url: str, table: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------- baseline
def baseline_child(n: int, data: Path, url: str, db_url: str) -> None:
    """What a user writes with the plain SDK: no ledger, no validation, no upsert."""
    import anthropic
    import pandas as pd
    import sqlalchemy as sa

    sys.path.insert(0, str(BENCH))
    from submit import Answer

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t0 = time.perf_counter()
    client = anthropic.Anthropic(api_key=KEY, base_url=url)
    schema = anthropic.transform_schema(Answer)
    with data.open() as f:
        recs = [json.loads(line) for line in f]
    requests = [
        {
            "custom_id": r["id"],
            "params": {
                "model": MODEL,
                "max_tokens": MAX_TOKENS,
                "system": SYSTEM,
                "messages": [{"role": "user", "content": PROMPT.format(**r)}],
                "output_config": {"format": {"type": "json_schema", "schema": schema}},
            },
        }
        for r in recs
    ]
    del recs
    t_built = time.perf_counter()
    create = create_cpu = 0.0
    ids = []
    for i in range(0, len(requests), SHARD):
        start, cpu0 = time.perf_counter(), time.thread_time()
        ids.append(client.messages.batches.create(requests=requests[i : i + SHARD]).id)
        create += time.perf_counter() - start
        create_cpu += time.thread_time() - cpu0
    del requests
    t_created = time.perf_counter()
    cpu_wait0 = cpu()
    for batch_id in ids:
        while client.messages.batches.retrieve(batch_id).processing_status != "ended":
            time.sleep(POLL_SECONDS)
    wait_cpu = cpu() - cpu_wait0
    t_waited = time.perf_counter()
    download = download_cpu = 0.0
    rows = []
    bad = 0
    for batch_id in ids:
        it = iter(client.messages.batches.results(batch_id))
        while True:
            start, cpu0 = time.perf_counter(), time.thread_time()
            item = next(it, None)
            download += time.perf_counter() - start
            download_cpu += time.thread_time() - cpu0
            if item is None:
                break
            if item.result.type != "succeeded":
                continue
            try:
                answer = json.loads(item.result.message.content[0].text)
            except (ValueError, AttributeError, IndexError):
                bad += 1
                continue
            answer["id"] = item.custom_id
            rows.append(answer)
    t_parsed = time.perf_counter()
    engine = sa.create_engine(db_url)
    pd.DataFrame(rows).to_sql("baseline_answers", engine, if_exists="append", index=False)
    engine.dispose()
    t_end = time.perf_counter()
    wait = t_waited - t_created
    api_wait = (create - create_cpu) + (wait - wait_cpu) + (download - download_cpu)
    print(
        json.dumps(
            {
                "wall": t_end - t0,
                "build": t_built - t0,
                "create_wall": t_created - t_built,
                "create": create,
                "create_cpu": create_cpu,
                "wait": wait,
                "wait_cpu": wait_cpu,
                "results_wall": t_parsed - t_waited,
                "download": download,
                "download_cpu": download_cpu,
                "to_sql": t_end - t_parsed,
                "rows": len(rows),
                "bad": bad,
                "api_wait": api_wait,
                "overhead": (t_end - t0) - api_wait,
            }
        ),  # fmt: skip
        flush=True,
    )


def run_baseline(kind: str, n: int, data: Path, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = base / f"baseline-{kind}-{n}"
    run_dir.mkdir(parents=True)
    backend = Backend(kind, run_dir, args)
    emulator = Emulator()
    log = run_dir / "baseline.log"
    try:
        cmd = [
            sys.executable,
            __file__,
            "--baseline-child",
            str(data),
            emulator.url,
            backend.sqlalchemy_url,
            "--records",
            str(n),
        ]
        rc, wall, cpu, rss = wait4(cmd, dict(os.environ), log)
        emu_cpu, emu_rss = emulator.stop()
        if rc:
            raise SystemExit(f"baseline failed (rc {rc}); log: {log}")
        result: dict[str, Any] = json.loads(log.read_text().strip().splitlines()[-1])
    finally:
        if emulator.proc.poll() is None:
            emulator.stop()
        backend.drop()
    result.update({"process_cpu": cpu, "process_rss": rss, "emulator_cpu": emu_cpu, "emulator_rss": emu_rss})
    return result


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000])
    parser.add_argument(
        "--backends", nargs="+", choices=["postgres", "sqlite"], default=["postgres", "sqlite"]
    )
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("FABLE_E2E_PG_ADMIN_URL", "postgresql://root@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--pg-db", default="h4_e2e")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DAG, events)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the submit and load tasks' threads into <work dir>/ours-*/<task>.prof (slows them; "
        "for finding hot spots, not for figures; implies --keep, runs no baseline)",
    )
    parser.add_argument(
        "--baseline-child", nargs=3, metavar=("DATA", "URL", "DB_URL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    args.keep = args.keep or args.profile
    if args.baseline_child:
        data, url, db_url = args.baseline_child
        baseline_child(args.records[0], Path(data), url, db_url)
        return
    sys.path.insert(0, str(ROOT))
    base = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    print(f"work dir: {base}", flush=True)
    worst: tuple[float, str] | None = None
    try:
        template = template_home(base)
        for n in args.records:
            data = base / f"records-{n}.jsonl"
            write_records(data, n)
            for kind in args.backends:
                ours = run_ours(kind, n, data, base, template, args)
                for name, t in ours["tasks"].items():
                    print(
                        f"records={n} backend={kind} task={name} wall_s={t['wall']:.1f} cpu_s={t['cpu']:.1f} "
                        f"peak_rss_mb={t['peak_rss_mb']:.0f} create_s={t['create']:.1f} "
                        f"create_cpu_s={t['create_cpu']:.1f} count_tokens_s={t['count_tokens']:.1f} "
                        f"download_s={t['download']:.1f} download_cpu_s={t['download_cpu']:.1f}",
                        flush=True,
                    )
                print(
                    f"records={n} backend={kind} ours: dags_test_wall_s={ours['process_wall']:.1f} "
                    f"dags_test_cpu_s={ours['process_cpu']:.1f} dags_test_peak_rss_mb={ours['process_rss']:.0f} "
                    f"rows={ours['rows']} emulator_cpu_s={ours['emulator_cpu']:.1f} "
                    f"emulator_peak_rss_mb={ours['emulator_rss']:.0f} emulator_wait_s={ours['api_wait']:.1f} "
                    f"overhead_s={ours['overhead']:.1f}",
                    flush=True,
                )
                if args.profile:
                    continue  # profiled figures are not comparable: no baseline, no result line
                base_r = run_baseline(kind, n, data, base, args)
                print(
                    f"records={n} backend={kind} baseline: wall_s={base_r['wall']:.1f} cpu_s={base_r['process_cpu']:.1f} "
                    f"peak_rss_mb={base_r['process_rss']:.0f} build_s={base_r['build']:.1f} "
                    f"create_wall_s={base_r['create_wall']:.1f} create_s={base_r['create']:.1f} "
                    f"create_cpu_s={base_r['create_cpu']:.1f} "
                    f"wait_s={base_r['wait']:.1f} wait_cpu_s={base_r['wait_cpu']:.1f} "
                    f"results_wall_s={base_r['results_wall']:.1f} download_s={base_r['download']:.1f} "
                    f"download_cpu_s={base_r['download_cpu']:.1f} "
                    f"to_sql_s={base_r['to_sql']:.1f} rows={base_r['rows']} "
                    f"emulator_cpu_s={base_r['emulator_cpu']:.1f} emulator_wait_s={base_r['api_wait']:.1f} "
                    f"overhead_s={base_r['overhead']:.1f}",
                    flush=True,
                )
                t = ours["tasks"]
                ratio = base_r["overhead"] / ours["overhead"]
                line = (
                    f"backend={kind} records={n} overhead_s={ours['overhead']:.1f} "
                    f"submit_s={t['submit']['wall']:.1f} wait_s={t['wait']['wall']:.1f} load_s={t['load']['wall']:.1f} "
                    f"peak_rss_mb={max(x['peak_rss_mb'] for x in t.values()):.0f} "
                    f"baseline_overhead_s={base_r['overhead']:.1f} baseline_wall_s={base_r['wall']:.1f} "
                    f"baseline_rss_mb={base_r['process_rss']:.0f} vs_baseline={ratio:.2f}"
                )
                print(f"result: {line}", flush=True)
                if worst is None or ratio < worst[0]:
                    worst = (ratio, line)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if worst is not None:
        print(f"bench end_to_end: {worst[1]}", flush=True)


if __name__ == "__main__":
    main()

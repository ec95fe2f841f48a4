"""A real Airflow deployment: separate scheduler, triggerer, dag-processor and api-server processes,
LocalExecutor with ``parallelism=2``, a fresh PostgreSQL metadata database, Airflow's stock
``[operators] default_deferrable = false`` and the emulator.

What it proves (issue #7 item 9):
- three DAG runs' waits are deferred at the same time while the runs' other tasks still run, so
  a wait holds no worker slot (two waiting sensors used to starve such a deployment);
- marking a deferred wait failed through the REST API cancels its batch (the trigger's
  ``on_kill``), asserted on the emulator, and only that batch;
- the triggerer's log shows the trigger;
- a ``mode="reschedule"`` sensor on a batch id that answers 404 gives up after N consecutive
  errors across pokes (each poke a new process and operator), not after the whole timeout.
  (Its poke interval is 10 s: with 1 s, Airflow 3.3.2's scheduler can queue the next poke before
  the executor has reported the previous one, and then fails the task for that race.)

Every service is started by this test and stopped by its PID; every wait is bounded. The
database is created and dropped by the test. Skipped when no PostgreSQL answers (failed in CI).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from airflow_provider_fable.hooks.fable import FableHook
from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at
from tests.conftest import private_pg_database

AIRFLOW = str(Path(sys.executable).with_name("airflow"))

DAG_FILE = """
from airflow.sdk import DAG, task
from airflow_provider_fable.sensors.batch import FableBatchSensor

with DAG("fable_deploy_wait", schedule=None, render_template_as_native_obj=True, max_active_runs=3):
    FableBatchSensor(task_id="wait", batch_ids="{{ dag_run.conf['batch_ids'] }}", poll_interval=2)

    @task
    def other():
        return "ran while the waits were deferred"

    other()

with DAG("fable_deploy_reschedule", schedule=None):
    FableBatchSensor(task_id="wait", batch_ids=["msgbatch_mistyped"], fable_conn_id="fable_other",
                     deferrable=False, poll_interval=10, max_consecutive_errors=3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, timeout: float, check, logs: Path):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log"))
            )
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(1.0)


class Api:
    def __init__(self, base: str) -> None:
        self.base = base
        self.token: str | None = None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {self.token}"} if self.token else {}),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, {"error": exc.read().decode(errors="replace")}
        except OSError as exc:
            return 0, {"error": str(exc)}

    def states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        code, body = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti["state"] for ti in body.get("task_instances", [])} if code == 200 else {}


@pytest.fixture
def metadata_db():
    with private_pg_database("fable_deploy") as url:
        yield url.render_as_string(hide_password=False)


def test_real_deployment_defers_waits_and_cancels_on_kill(metadata_db, fable_emulator_factory, tmp_path):
    server = fable_emulator_factory(processing_seconds=3600, cancel_seconds=0.0)
    other = fable_emulator_factory()
    point_connection_at(server)  # this process's hook, to create and inspect batches
    home, dags, logs = tmp_path / "home", tmp_path / "dags", tmp_path / "logs"
    for d in (home, dags, logs):
        d.mkdir()
    (dags / "fable_deploy.py").write_text(DAG_FILE)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    conn = {"conn_type": "fable", "password": TEST_API_KEY}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "False",  # Airflow's stock value, explicitly
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW_CONN_FABLE_DEFAULT": json.dumps({**conn, "host": server.base_url}),
            "AIRFLOW_CONN_FABLE_OTHER": json.dumps({**conn, "host": other.base_url}),
        }
    )
    migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, args in {
            "api-server": ["api-server", "--port", str(port), "--host", "127.0.0.1"],
            "scheduler": ["scheduler"],
            "triggerer": ["triggerer"],
            "dag-processor": ["dag-processor"],
        }.items():
            out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            procs[name] = subprocess.Popen(
                [AIRFLOW, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        api = Api(base)
        _until("the api-server", 240, lambda: api.call("GET", "/api/v2/monitor/health")[0] == 200, logs)
        code, body = api.call("GET", "/auth/token")
        assert code in (200, 201), body
        api.token = body["access_token"]
        _until(
            "the DAGs to be parsed",
            240,
            lambda: api.call("GET", "/api/v2/dags/fable_deploy_wait")[0] == 200,
            logs,
        )

        batches = [b.id for b in (FableHook().create_batch([{"custom_id": f"r{i}", "params": {
            "model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "red"}]}}])
            for i in range(3))]  # fmt: skip
        runs = []
        for batch_id in batches:
            code, body = api.call(
                "POST",
                "/api/v2/dags/fable_deploy_wait/dagRuns",
                {"logical_date": None, "conf": {"batch_ids": [batch_id]}},
            )
            assert code == 200, body
            runs.append(body["dag_run_id"])
        code, body = api.call("POST", "/api/v2/dags/fable_deploy_reschedule/dagRuns", {"logical_date": None})
        assert code == 200, body
        reschedule_run = body["dag_run_id"]

        # With parallelism=2, three waits holding slots would block every `other` task: all three
        # waits deferred at once while the other tasks have run proves the waits hold no slot.
        def deferred_while_others_ran():
            states = [api.states("fable_deploy_wait", r) for r in runs]
            return all(s.get("wait") == "deferred" and s.get("other") == "success" for s in states)

        _until("three deferred waits while the other tasks succeed", 300, deferred_while_others_ran, logs)

        # A user marks the first wait failed: the triggerer calls on_kill, which cancels its batch.
        code, body = api.call(
            "PATCH",
            f"/api/v2/dags/fable_deploy_wait/dagRuns/{runs[0]}/taskInstances/wait",
            {"new_state": "failed"},
        )
        assert code == 200, body

        def canceled(batch_id: str) -> bool:
            return FableHook().retrieve_batch(batch_id).request_counts.canceled > 0

        _until("the killed wait's batch to be canceled", 120, lambda: canceled(batches[0]), logs)
        assert not canceled(batches[1]) and not canceled(batches[2])
        assert api.states("fable_deploy_wait", runs[1])["wait"] == "deferred"

        # Reschedule mode: three 404s in a row across three pokes (three processes) fail the task.
        _until(
            "the reschedule sensor to give up",
            300,
            lambda: api.states("fable_deploy_reschedule", reschedule_run).get("wait") == "failed",
            logs,
        )
        with urllib.request.urlopen(f"{other.base_url}/_emulator/stats") as resp:
            assert json.load(resp)["calls"]["retrieve"] == 3

        triggerer_log = (logs / "triggerer.log").read_text(errors="replace")
        task_logs = "".join(p.read_text(errors="replace") for p in (home / "logs").rglob("*.log"))
        assert "FableBatchTrigger" in triggerer_log + task_logs
        assert "Task killed by a user: canceling batches" in triggerer_log + task_logs
    finally:
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

"""Machinery shared by the tests that run a real Airflow deployment as subprocesses.

``tests/test_real_retry.py`` (LocalExecutor) and ``tests/test_celery_deployment.py``
(CeleryExecutor, two workers) start an api-server, a scheduler, a dag-processor (and workers)
with a private AIRFLOW_HOME on a throwaway PostgreSQL metadata database, talk to the REST API as
the UI does, and read the emulator's own list and counters to count what was paid. Every service
runs in its own process group and is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from airflow_provider_fable.testing.plugin import TEST_API_KEY

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Deployment:
    """Airflow services as subprocesses in their own process groups, stopped by PID.

    ``env`` is what every service gets; :meth:`start` can add per-process variables (a worker's
    own HOME, TMPDIR, DAGs folder) and a working directory. ``log_roots`` are the AIRFLOW_HOMEs
    whose ``logs/`` hold task logs (the deployment's own, plus each worker's).
    """

    def __init__(self, root: Path, db_url: str, *, executor: str = "LocalExecutor") -> None:
        self.root, self.db_url = root, db_url
        self.home = root / "home"
        self.dags = root / "dags"
        self.logs = root / "service-logs"
        for d in (self.home, self.dags, self.logs):
            d.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_roots: list[Path] = [self.home]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "FABLE_"))}
        port = free_port()
        from cryptography.fernet import Fernet

        self.env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": executor,
                "AIRFLOW__CORE__PARALLELISM": "8",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(port),
                "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
                "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "False",
            }
        )
        self.port = port
        self.airflow = str(Path(sys.executable).with_name("airflow"))

    def connection(self, conn_id: str, **fields: object) -> None:
        self.env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(fields)

    def pg_connection(self, conn_id: str, url: Any) -> None:
        """An Airflow ``postgres`` connection to the database of a SQLAlchemy URL."""
        self.connection(
            conn_id,
            conn_type="postgres",
            host=url.host,
            port=url.port or 5432,
            login=url.username,
            **({"password": url.password} if url.password else {}),
            schema=url.database,
        )

    def cli(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [self.airflow, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(
                f"airflow {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
            )
        return done.stdout

    def token(self) -> str | None:
        """A JWT from the simple auth manager (all users are admins here); None until it answers."""
        try:
            return self.api("GET", "/auth/token", None)["access_token"]
        except OSError:
            return None

    def api(self, method: str, path: str, token: str | None, body: object = None) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:  # say what the API refused, not only the code
            raise AssertionError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from exc

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [self.airflow, *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the finalizer kills the whole tree
        )
        out.close()
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL one service's whole process group (a lost machine) and forget it."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers: task supervisors, gunicorn workers
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def task_logs(self, pattern: str = "*.log") -> list[Path]:
        """Task log files under every log root (``dag_id=.../run_id=.../task_id=...``)."""
        return sorted(
            p for root in self.log_roots for p in (root / "logs").rglob(pattern) if "dag_id=" in str(p)
        )

    def diagnostics(self) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            proc = self.procs.get(log.stem)
            state = "gone" if proc is None else f"exit {proc.poll()}"
            parts.append(f"==== {log.stem} ({state}) ====\n{log.read_text(errors='replace')[-4000:]}")
        for log in self.task_logs():
            parts.append(f"==== {log.relative_to(self.root)} ====\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def poll(what: str, dep: Deployment, check: Callable[[], T], timeout: float, interval: float = 1.0) -> T:
    """``check()`` until it returns something truthy; fail with every log when a service exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in dep.procs.items():
            if proc.poll() is not None:
                pytest.fail(
                    f"{name} exited ({proc.returncode}) while waiting for {what}\n{dep.diagnostics()}"
                )
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{dep.diagnostics()}")


def emulator_batches(server: Any) -> list[dict]:
    """Every batch on the emulator's own list (the API's list endpoint, all pages)."""
    batches, after = [], None
    while True:
        url = f"{server.base_url}/v1/messages/batches?limit=100" + (f"&after_id={after}" if after else "")
        req = urllib.request.Request(
            url, headers={"x-api-key": TEST_API_KEY, "anthropic-version": "2023-06-01"}
        )
        with urllib.request.urlopen(req) as resp:
            page = json.load(resp)
        batches += page["data"]
        if not page.get("has_more"):
            return batches
        after = page["last_id"]


def emulator_stats(server: Any) -> dict:
    """The emulator's own counters (batches created, requests seen, calls per endpoint)."""
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)

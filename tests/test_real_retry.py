"""A SIGKILLed submit retried by a real Airflow deployment pays once per shard.

``tests/test_ledger.py`` kills the first try in a forked process and runs the retry itself. Here
the retry is Airflow's own: an api-server (execution API), a scheduler with the LocalExecutor and
a dag-processor run as subprocesses on a throwaway PostgreSQL metadata database, with a private
AIRFLOW_HOME and a DAGs folder holding one small DAG per kill point (``submit`` with
``retries=2`` then ``load``). The submit's first try SIGKILLs itself at the DAG's point (the
``FABLE_FAULT_KILL_AT`` seam, set by a ``pre_execute`` hook on every try; the seam fires on try 1
only, by Airflow's try number, so "first try" holds across worker processes); the supervisor reports
the kill, the scheduler puts the task up for retry and runs it again in a new process. A fifth
DAG's emulator creates shard 1's batch and drops the connection before answering (the lost create
response). Each DAG has its own emulator, ledger (SQLite, the one-machine setup) and destination,
so the five runs go at once on one set of services.

Checked per case: the submit really ran twice (try 1 in the task history, killed by SIGKILL or
failed on the uncertain create per its log; try 2 succeeded), the emulator's own list holds
exactly one batch per shard (3 shards of 3+3+1 requests, 7 requests seen) and every record is in
the destination once.
"""

from __future__ import annotations

import shutil
import textwrap
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import TEST_API_KEY
from tests.conftest import private_pg_database
from tests.realdeploy import Deployment, emulator_batches, emulator_stats, poll

#: Where the first try dies: a SIGKILL at one of the operator's fault points, or (last case) the
#: emulator creates shard 1's batch and drops the connection before answering.
POINTS = ["after_intent:1", "after_create:1", "after_ledger:2", "between_shards:1"]
LOST_RESPONSE = "lost_response:1"
CASES = [*POINTS, LOST_RESPONSE]
RECORD_IDS = [f"p{i}" for i in range(7)]  # 3 shards of at most 3 requests: 3 + 3 + 1
TIMEOUT = 420.0  # seconds for all the runs; generous for a shared 2-core machine

DAG_FILE = '''
"""One DAG per case: submit (first try killed at the point, or its create answer lost;
retries=2) then load."""

from __future__ import annotations

import os
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from airflow.sdk import DAG
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import KILL_ENV, FableBatchSubmitOperator

CASES = {cases!r}
KILL_POINTS = {points!r}
RECORDS = [{{"id": f"p{{i}}", "text": f"{{['red', 'green', 'blue'][i % 3]}} fence"}} for i in range(7)]


class Paint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: str
    glossy: bool
    coats: int = Field(ge=1, le=5)
    note: str = Field(max_length=80)


def arm(point):
    """Arm the operator's fault seam on every try: the seam itself fires on try 1 only."""

    def hook(context):
        if point in KILL_POINTS:
            os.environ[KILL_ENV] = point

    return hook


for n, point in enumerate(CASES):
    with DAG(dag_id=f"retry_{{point.replace(':', '_')}}", schedule=None, catchup=False) as dag:
        submit = FableBatchSubmitOperator(
            task_id="submit",
            prompt_template="Paint for {{id}}: {{text}}",
            output_model=Paint,
            records=RECORDS,
            max_requests_per_batch=3,
            fable_conn_id=f"fable_{{n}}",
            ledger_conn_id=f"ledger_{{n}}",
            retries=2,
            retry_delay=timedelta(seconds=1),
            pre_execute=arm(point),
        )
        load = FableValidateLoadOperator(
            task_id="load",
            batch_ids=submit.output,
            output_model=Paint,
            destination_conn_id=f"dest_{{n}}",
            table="paint",
            id_column="paint_id",
            fable_conn_id=f"fable_{{n}}",
            ledger_conn_id=f"ledger_{{n}}",
        )
        submit >> load
    globals()[dag.dag_id] = dag
'''


def dag_id(point: str) -> str:
    return "retry_" + point.replace(":", "_")


@pytest.fixture(scope="module")
def metadata_db() -> Iterator[str]:
    """A throwaway PostgreSQL database for Airflow's metadata, dropped at the end."""
    with private_pg_database("fable_airflow") as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def deployment(metadata_db, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Start the services, trigger one run per kill point, wait until every run has finished."""
    from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings

    root = tmp_path_factory.mktemp("real-retry")
    dep = Deployment(root, metadata_db)
    emulators = [
        EmulatorServer(
            EmulatorSettings(
                faults=FaultSettings(lose_create_response_first_n=1, lose_create_response_mode="drop")
            )
            if case == LOST_RESPONSE
            else None
        ).start()
        for case in CASES
    ]
    try:
        for n, server in enumerate(emulators):
            dep.connection(f"fable_{n}", conn_type="fable", host=server.base_url, password=TEST_API_KEY)
            dep.connection(f"ledger_{n}", conn_type="sqlite", host=str(root / f"ledger_{n}.db"))
            dep.connection(f"dest_{n}", conn_type="sqlite", host=str(root / f"dest_{n}.db"))
        (dep.dags / "retry_cases.py").write_text(textwrap.dedent(DAG_FILE.format(cases=CASES, points=POINTS)))
        dep.cli("db", "migrate")
        dep.start("api-server", "api-server", "--workers", "1")
        dep.start("scheduler", "scheduler")
        dep.start("dag-processor", "dag-processor")
        engine = sa.create_engine(metadata_db)
        try:
            runs, token = _trigger_and_wait(dep, engine)
            yield SimpleNamespace(
                dep=dep, engine=engine, runs=runs, token=token, emulators=emulators, root=root
            )
        finally:
            engine.dispose()
    finally:
        dep.stop()
        for server in emulators:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _trigger_and_wait(dep: Deployment, engine: sa.Engine) -> tuple[dict[str, str], str]:
    started = time.monotonic()
    wanted = {dag_id(p) for p in CASES}

    def parsed() -> bool:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT dag_id FROM serialized_dag")).scalars()
            return wanted <= set(rows)

    poll("the dag-processor to serialize the DAGs", dep, parsed, TIMEOUT)
    token = poll("the api-server to answer", dep, dep.token, TIMEOUT)
    runs = {point: f"retry__{uuid.uuid4().hex[:8]}" for point in CASES}
    for point, run_id in runs.items():  # what the UI's trigger button does; no logical date
        dep.api(
            "POST",
            f"/api/v2/dags/{dag_id(point)}/dagRuns",
            token,
            {"dag_run_id": run_id, "logical_date": None},
        )

    def finished() -> bool:
        with engine.connect() as conn:
            states = conn.execute(
                sa.text("SELECT dag_id, state FROM dag_run WHERE run_id LIKE 'retry__%'")
            ).all()
        return len(states) == len(CASES) and all(s in ("success", "failed") for _, s in states)

    poll("the DAG runs to finish", dep, finished, max(60.0, TIMEOUT - (time.monotonic() - started)))
    return runs, token


@pytest.mark.parametrize("point", CASES)
def test_airflow_retries_a_failed_submit_and_pays_once(deployment, point):
    dep, n = deployment.dep, CASES.index(point)
    run_id = deployment.runs[point]
    with deployment.engine.connect() as conn:
        run_state = conn.execute(
            sa.text("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r"),
            {"d": dag_id(point), "r": run_id},
        ).scalar_one()
        tis = dict(
            conn.execute(
                sa.text(
                    "SELECT task_id, state || ':' || try_number FROM task_instance WHERE dag_id = :d AND run_id = :r"
                ),
                {"d": dag_id(point), "r": run_id},
            ).all()
        )
        history = conn.execute(
            sa.text(
                "SELECT try_number, state FROM task_instance_history "
                "WHERE dag_id = :d AND run_id = :r AND task_id = 'submit' ORDER BY try_number"
            ),
            {"d": dag_id(point), "r": run_id},
        ).all()
    assert run_state == "success", f"{point}: run {run_state}, tasks {tis}\n{dep.diagnostics()}"
    # Airflow itself retried the submit: try 1 failed (up for retry), try 2 succeeded.
    assert tis["submit"] == "success:2", tis
    assert tis["load"] == "success:1", tis
    # The killed try is kept in the history: the supervisor saw the signal and failed that try.
    assert [h.try_number for h in history] == [1] and history[0].state in ("failed", "up_for_retry"), history
    first_try = next(
        (dep.home / "logs").rglob(f"dag_id={dag_id(point)}/run_id={run_id}/task_id=submit/attempt=1.log")
    )
    log = first_try.read_text(errors="replace")
    if point == LOST_RESPONSE:
        assert "may or may not have been created" in log, log[-3000:]
    else:
        assert "SIGKILL" in log, f"try 1 was not killed by SIGKILL:\n{log[-3000:]}"

    _assert_paid_once_and_loaded_once(deployment, n)


def _assert_paid_once_and_loaded_once(deployment: SimpleNamespace, n: int) -> None:
    # Exactly one batch per shard on the emulator's own list; every request sent once.
    server = deployment.emulators[n]
    batches = emulator_batches(server)
    sizes = sorted(sum(b["request_counts"].values()) for b in batches)
    assert sizes == [1, 3, 3], batches
    stats = emulator_stats(server)
    assert stats["batches_created"] == 3 and stats["requests_seen"] == len(RECORD_IDS), stats

    # Every record loaded once (accepted into the table or, with a reason, into the rejects).
    dest = sa.create_engine(f"sqlite:///{deployment.root / f'dest_{n}.db'}")
    try:
        with dest.connect() as conn:
            loaded = list(conn.execute(sa.text("SELECT paint_id FROM paint")).scalars())
            names = sa.inspect(dest).get_table_names()
            if "paint_rejects" in names:
                loaded += conn.execute(sa.text("SELECT record_id FROM paint_rejects")).scalars()
    finally:
        dest.dispose()
    assert sorted(loaded) == RECORD_IDS


def test_clearing_the_submit_of_a_finished_run_creates_nothing(deployment):
    """Clear submit (and its load) of a finished run, as from the UI: the scheduler runs both again,
    the submit re-attaches to the run's batches and the load rewrites the same rows."""
    dep, point = deployment.dep, POINTS[1]
    run_id, dag = deployment.runs[point], dag_id(point)
    dep.api(
        "POST",
        f"/api/v2/dags/{dag}/clearTaskInstances",
        deployment.token,
        {"dry_run": False, "dag_run_id": run_id, "task_ids": ["submit"], "include_downstream": True,
         "only_failed": False},
    )  # fmt: skip

    def rerun_done() -> dict[str, tuple[str, int]] | None:
        with deployment.engine.connect() as conn:
            tis = {
                t: (state, tries)
                for t, state, tries in conn.execute(
                    sa.text(
                        "SELECT task_id, state, try_number FROM task_instance WHERE dag_id = :d AND run_id = :r"
                    ),
                    {"d": dag, "r": run_id},
                )
            }
        done = tis["submit"][1] > 2 and all(state in ("success", "failed") for state, _ in tis.values())
        return tis if done else None

    tis = poll("the cleared tasks to run again", dep, rerun_done, TIMEOUT)
    assert tis["submit"][0] == tis["load"][0] == "success", f"{tis}\n{dep.diagnostics()}"
    assert tis["submit"][1] == 3 and tis["load"][1] == 2, tis  # both really ran again
    _assert_paid_once_and_loaded_once(deployment, POINTS.index(point))

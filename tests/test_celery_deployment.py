"""Exactly once on a distributed Airflow: CeleryExecutor, two workers, a lost worker (issue #18).

A real Airflow deployment as teams run it when they outgrow one machine, started and stopped by
this test: an api-server, a scheduler with the CeleryExecutor and a dag-processor; the broker is
the machine's Redis (a private db number and a private queue, flushed at the end), the Celery
result backend, Airflow's metadata, the shared job ledger and the destination are private
PostgreSQL databases. Two Celery workers stand for two machines: each has its own AIRFLOW_HOME,
HOME, TMPDIR and working directory and its own copy of the DAGs folder at a different absolute
path (so a module name Airflow derives from the DAG file's path differs between them, as when
workers mount the DAGs elsewhere or a versioned bundle puts each version under a new path).

Two DAG runs go at once, both on worker A alone:

a) ``celery_lost_worker``: one submit of 7 records in 3 shards (3 + 3 + 1). Its first try is
   SIGKILLed right after shard 1's batch is created, before the ledger records it (the operator's
   ``FABLE_FAULT_KILL_AT=after_create:1`` seam, armed by ``pre_execute``; it fires on try 1 only).
b) ``celery_mapped_fanout``: dynamic task mapping, one job fanned out over 5 record slices (5
   records each, 2 shards of 3 + 2); member 0's first try is killed the same way.

Once every first try has ended (the killed ones reported, the others succeeded), worker A is
SIGKILLed as a whole (the machine is gone) and worker B starts: every retry runs on B, under the
other DAGs path. While the killed tries are being reported the default pool is closed, so no
retry can be queued to worker A before it is gone (the gate is the scheduler's, not a sleep).

The ledger is new: its tables are created by the first submits, six at once on two DAGs (the
first-use race of #18 item 4).

Checked per scenario: the killed member really ran twice (try 1's log on worker A says SIGKILL,
try 2's log is on worker B), the emulator's own list and counters hold exactly one batch per
shard and every request was sent once, and every record is in the destination once.

Skipped when Redis or PostgreSQL do not answer (failed instead under CI=true).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from airflow_provider_fable.testing.plugin import TEST_API_KEY
from tests.conftest import private_pg_database
from tests.realdeploy import Deployment, emulator_batches, emulator_stats, poll

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
TIMEOUT = 300.0  # seconds for any one phase; generous for a shared 2-core machine
LOST = "celery_lost_worker"
FANOUT = "celery_mapped_fanout"
LOST_IDS = [f"a{i}" for i in range(7)]  # 3 shards of at most 3 requests: 3 + 3 + 1
#: 5 members of 2 shards (3 + 2). With the lost-worker submit that is 6 first tries for worker A's
#: 4 slots: two members start while others are mid-way (open intents, a killed member's orphan),
#: which is when a member that settled its siblings' intents went wrong (#18 item 2).
SLICES = [[f"b{m}_{i}" for i in range(5)] for m in range(5)]
FANOUT_IDS = [rid for part in SLICES for rid in part]

DAG_FILE = '''
"""Issue #18's distributed cases: a lost worker after a create, and a mapped fan-out of one job."""

from __future__ import annotations

import os
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from airflow.sdk import DAG, task
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import KILL_ENV, FableBatchSubmitOperator

COLORS = ["red", "green", "blue"]


class Paint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    color: str
    glossy: bool
    coats: int = Field(ge=1, le=5)
    note: str = Field(max_length=80)


def records(ids):
    return [{{"id": rid, "text": f"{{COLORS[n % 3]}} fence"}} for n, rid in enumerate(ids)]


def kill_after_first_create(context):
    """Arm the operator's fault seam (it fires on try 1 only) in map index 0 / the plain task."""
    if context["ti"].map_index in (-1, 0):
        os.environ[KILL_ENV] = "after_create:1"


COMMON = dict(
    output_model=Paint,
    max_requests_per_batch=3,
    ledger_conn_id="ledger",
    retries=2,
    retry_delay=timedelta(seconds=30),  # longer than every first try: all run on worker A
    pre_execute=kill_after_first_create,
)

with DAG(dag_id="{lost}", schedule=None, catchup=False):
    submit = FableBatchSubmitOperator(
        task_id="submit",
        prompt_template="Paint for {{id}}: {{text}}",
        records=records({lost_ids!r}),
        fable_conn_id="fable_lost",
        **COMMON,
    )
    FableValidateLoadOperator(
        task_id="load",
        batch_ids=submit.output,
        output_model=Paint,
        destination_conn_id="dest",
        table="paint_lost",
        id_column="paint_id",
        fable_conn_id="fable_lost",
        ledger_conn_id="ledger",
    )

with DAG(dag_id="{fanout}", schedule=None, catchup=False):
    members = FableBatchSubmitOperator.partial(
        task_id="submit",
        prompt_template="Paint, mapped, for {{id}}: {{text}}",
        fable_conn_id="fable_fanout",
        **COMMON,
    ).expand(records=[records(ids) for ids in {slices!r}])

    @task
    def batch_ids_of(manifests):
        """One load for the whole fan-out: every member's batches."""
        return [batch_id for manifest in manifests for batch_id in manifest["batch_ids"]]

    FableValidateLoadOperator(
        task_id="load",
        batch_ids=batch_ids_of(members.output),
        output_model=Paint,
        destination_conn_id="dest",
        table="paint_fanout",
        id_column="paint_id",
        fable_conn_id="fable_fanout",
        ledger_conn_id="ledger",
    )
'''


@contextmanager
def _redis_db() -> Iterator[int]:
    """A private Redis db number: the first empty one from a pid-derived start, flushed at the end."""
    import redis

    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Redis here"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis must be reachable in CI at {REDIS_HOST}:{REDIS_PORT}: {exc}")
        pytest.skip(f"no Redis answers at {REDIS_HOST}:{REDIS_PORT} ({type(exc).__name__})")
    for step in range(15):
        db = 1 + (os.getpid() + step) % 15  # db 0 is everyone's default: never ours
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        # Claimed with a key, so a concurrent session sees it non-empty and takes another one.
        if client.dbsize() == 0 and client.set("fable_test_broker_owner", os.getpid(), nx=True):
            break
        client.close()
    else:
        pytest.fail("no empty Redis db among 1..15 for the test's broker")
    try:
        yield db
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def celery_deployment(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Start everything, run both scenarios through the lost worker, stop everything."""
    from airflow_provider_fable.emulator import EmulatorServer

    root = tmp_path_factory.mktemp("celery")
    with (
        _redis_db() as db,
        private_pg_database("fable_celery_meta") as meta_url,
        private_pg_database("fable_celery_results") as results_url,
        private_pg_database("fable_celery_ledger") as ledger_url,
        private_pg_database("fable_celery_dest") as dest_url,
        EmulatorServer() as lost_api,
        EmulatorServer() as fanout_api,
    ):
        meta = meta_url.render_as_string(hide_password=False)
        dep = Deployment(root, meta, executor="CeleryExecutor")
        queue = f"fable_{uuid.uuid4().hex[:8]}"
        results = results_url.set(drivername="postgresql").render_as_string(hide_password=False)
        dep.env.update(
            {
                "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{results}",
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,  # a private queue on top of the private db
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
                "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
                "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
            }
        )
        dep.connection("fable_lost", conn_type="fable", host=lost_api.base_url, password=TEST_API_KEY)
        dep.connection("fable_fanout", conn_type="fable", host=fanout_api.base_url, password=TEST_API_KEY)
        dep.pg_connection("ledger", ledger_url)
        dep.pg_connection("dest", dest_url)
        dag_text = textwrap.dedent(
            DAG_FILE.format(lost=LOST, fanout=FANOUT, lost_ids=LOST_IDS, slices=SLICES)
        )
        (dep.dags / "distributed.py").write_text(dag_text)
        workers = {}
        for name, mount in (("a", "srv/airflow/dags"), ("b", "opt/pipelines/current/dags")):
            base = root / f"worker-{name}"
            for sub in ("home", "airflow", "tmp", "cwd", mount):
                (base / sub).mkdir(parents=True)
            (base / mount / "distributed.py").write_text(dag_text)
            dep.log_roots.append(base / "airflow")
            workers[name] = SimpleNamespace(
                name=f"worker-{name}",
                home=base / "airflow",
                cwd=base / "cwd",
                env={
                    "HOME": str(base / "home"),
                    "TMPDIR": str(base / "tmp"),
                    "AIRFLOW_HOME": str(base / "airflow"),
                    "AIRFLOW__CORE__DAGS_FOLDER": str(base / mount),
                },
            )
        try:
            dep.cli("db", "migrate")
            dep.start("api-server", "api-server", "--workers", "1")
            dep.start("scheduler", "scheduler")
            dep.start("dag-processor", "dag-processor")
            _start_worker(dep, workers["a"], queue)
            engine = sa.create_engine(meta)
            try:
                runs = _run_through_a_lost_worker(dep, engine, workers, queue)
                yield SimpleNamespace(
                    dep=dep,
                    engine=engine,
                    runs=runs,
                    workers=workers,
                    apis={LOST: lost_api, FANOUT: fanout_api},
                    dest=dest_url,
                    ledger=ledger_url,
                )
            finally:
                engine.dispose()
        finally:
            dep.stop()
            shutil.rmtree(root, ignore_errors=True)


def _start_worker(dep: Deployment, worker: SimpleNamespace, queue: str) -> None:
    dep.start(
        worker.name,
        "celery", "worker", "--queues", queue, "--celery-hostname", f"{worker.name}@%h",
        "--concurrency", "4", "--skip-serve-logs", "--without-gossip", "--without-mingle",
        env=worker.env,
        cwd=worker.cwd,
    )  # fmt: skip


def _submit_states(engine: sa.Engine, runs: dict[str, str]) -> dict[tuple[str, int], tuple[str | None, int]]:
    """(dag_id, map_index) -> (state, try_number) of every submit task instance of the runs."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT dag_id, run_id, map_index, state, try_number FROM task_instance "
                "WHERE task_id = 'submit'"
            )
        ).all()
    return {(d, m): (s, t) for d, r, m, s, t in rows if runs.get(d) == r}


def _set_default_pool(dep: Deployment, token: str, slots: int) -> None:
    dep.api("PATCH", "/api/v2/pools/default_pool?update_mask=slots", token, {"slots": slots})


def _run_through_a_lost_worker(
    dep: Deployment, engine: sa.Engine, workers: dict[str, SimpleNamespace], queue: str
) -> dict[str, str]:
    def parsed() -> bool:
        with engine.connect() as conn:
            return {LOST, FANOUT} <= set(conn.execute(sa.text("SELECT dag_id FROM serialized_dag")).scalars())

    poll("the dag-processor to serialize the DAGs", dep, parsed, TIMEOUT)
    token = poll("the api-server to answer", dep, dep.token, TIMEOUT)
    runs = {dag: f"celery__{uuid.uuid4().hex[:8]}" for dag in (LOST, FANOUT)}
    for dag, run_id in runs.items():  # what the UI's trigger button does; no logical date
        dep.api("POST", f"/api/v2/dags/{dag}/dagRuns", token, {"dag_run_id": run_id, "logical_date": None})
    expected = {(LOST, -1), *((FANOUT, m) for m in range(len(SLICES)))}

    # Every first try runs on worker A; then the pool closes so no retry can be queued there.
    def all_started() -> bool:
        states = _submit_states(engine, runs)
        return set(states) == expected and all(
            s not in (None, "scheduled", "queued") for s, _ in states.values()
        )

    poll("every submit's first try to start on worker A", dep, all_started, TIMEOUT, interval=0.2)
    _set_default_pool(dep, token, 0)

    def first_tries_over() -> bool:
        # Nothing runs on worker A any more: every first try has ended (killed ones are reported as
        # up_for_retry, then "scheduled" for try 2, which the closed pool keeps from being queued).
        states = _submit_states(engine, runs)
        return all(state not in ("queued", "running") for state, _ in states.values())

    poll("every first try to end on worker A", dep, first_tries_over, TIMEOUT)
    dep.kill(workers["a"].name)  # the machine is gone; nothing was running on it any more
    _start_worker(dep, workers["b"], queue)
    _set_default_pool(dep, token, 128)

    def finished() -> bool:
        with engine.connect() as conn:
            states = dict(
                conn.execute(
                    sa.text("SELECT dag_id, state FROM dag_run WHERE run_id IN :r").bindparams(
                        sa.bindparam("r", expanding=True)
                    ),
                    {"r": list(runs.values())},
                ).all()
            )
        return len(states) == 2 and all(s in ("success", "failed") for s in states.values())

    poll("both runs to finish on worker B", dep, finished, TIMEOUT)
    return runs


def _attempt_log(worker: SimpleNamespace, dag: str, run_id: str, map_index: int, attempt: int) -> Path | None:
    mapped = "" if map_index < 0 else f"map_index={map_index}/"
    pattern = f"dag_id={dag}/run_id={run_id}/task_id=submit/{mapped}attempt={attempt}.log"
    return next((worker.home / "logs").glob(pattern), None)


def _ledger_story(deployment: SimpleNamespace, dag: str) -> tuple[str, list[str]]:
    """The ledger's jobs and submissions of one DAG (to say why a count is off), and their states."""
    engine = sa.create_engine(deployment.ledger)
    try:
        with engine.connect() as conn:
            subs = conn.execute(
                sa.text(
                    "SELECT s.job_id, j.spec, s.run_key, s.shard, s.request_count, s.state, s.batch_id, "
                    "s.note FROM fable_submissions s JOIN fable_jobs j ON j.job_id = s.job_id "
                    "WHERE s.run_key LIKE :dag ORDER BY s.id"
                ),
                {"dag": f"{dag}/%"},
            ).all()
    finally:
        engine.dispose()
    specs = {job: json.loads(spec or "{}").get("output_model") for job, spec, *_ in subs}
    lines = [f"job {job[:12]}: output model {model}" for job, model in specs.items()]
    lines += [
        f"  {job[:12]} {rk} shard {n} ({c} requests) {st} {b} {note or ''}"
        for job, _, rk, n, c, st, b, note in subs
    ]
    return "ledger:\n" + "\n".join(lines), [sub.state for sub in subs]


def _assert_one_batch_per_shard(deployment: SimpleNamespace, dag: str, sizes: list[int]) -> None:
    server, (story, states) = deployment.apis[dag], _ledger_story(deployment, dag)
    batches = emulator_batches(server)
    assert sorted(sum(b["request_counts"].values()) for b in batches) == sorted(sizes), story
    stats = emulator_stats(server)
    assert stats["batches_created"] == len(sizes) and stats["requests_seen"] == sum(sizes), (
        f"{stats}\n{story}"
    )
    # Every killed try's intent was settled by its retry (docs/ledger.md: none left after a success).
    assert "intent" not in states, story


def _loaded(url, table: str) -> list[str]:
    """Record ids in the destination: accepted rows plus rejects (each with a reason)."""
    dest = sa.create_engine(url)
    try:
        with dest.connect() as conn:
            ids = list(conn.execute(sa.text(f"SELECT paint_id FROM {table}")).scalars())
            if sa.inspect(dest).has_table(f"{table}_rejects"):
                ids += conn.execute(sa.text(f"SELECT record_id FROM {table}_rejects")).scalars()
    finally:
        dest.dispose()
    return sorted(ids)


def _assert_run_and_retry(deployment: SimpleNamespace, dag: str, map_index: int) -> None:
    dep, run_id = deployment.dep, deployment.runs[dag]
    with deployment.engine.connect() as conn:
        run_state = conn.execute(
            sa.text("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r"), {"d": dag, "r": run_id}
        ).scalar_one()
        tis = conn.execute(
            sa.text(
                "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = :d AND run_id = :r"
            ),
            {"d": dag, "r": run_id},
        ).all()
    assert run_state == "success", f"{dag}: run {run_state}, tasks {tis}\n{dep.diagnostics()}"
    killed = next(t for t in tis if t.task_id == "submit" and t.map_index == map_index)
    assert (killed.state, killed.try_number) == ("success", 2), tis
    first = _attempt_log(deployment.workers["a"], dag, run_id, map_index, 1)
    second = _attempt_log(deployment.workers["b"], dag, run_id, map_index, 2)
    assert first is not None and second is not None, (
        f"try 1 on worker A, try 2 on worker B:\n{dep.diagnostics()}"
    )
    log = first.read_text(errors="replace")
    assert "SIGKILL" in log, f"try 1 was not killed by SIGKILL:\n{log[-3000:]}"


def test_a_retry_on_another_worker_after_a_lost_create_pays_once(celery_deployment):
    """#18 item 1: the retry runs under another DAGs path; it must adopt shard 1's batch."""
    _assert_run_and_retry(celery_deployment, LOST, -1)
    _assert_one_batch_per_shard(celery_deployment, LOST, [3, 3, 1])
    assert _loaded(celery_deployment.dest, "paint_lost") == sorted(LOST_IDS)


def test_a_mapped_fan_out_with_a_killed_member_pays_once(celery_deployment):
    """#18 items 1 and 2: one job's members must not settle each other's live intents."""
    _assert_run_and_retry(celery_deployment, FANOUT, 0)
    _assert_one_batch_per_shard(celery_deployment, FANOUT, [3, 2] * len(SLICES))
    assert _loaded(celery_deployment.dest, "paint_fanout") == sorted(FANOUT_IDS)

"""The seven traps of issue #17, fixed in the core so the primitives are safe too.

Each test drives the real operators (real anthropic SDK over HTTP against the emulator, real
SQLite ledger and destination); trap 4 runs a real Airflow DAG (``dag.test``) with ``retries=2``.

1. a load given a submit manifest loads only that submit's records (a pilot re-attached to an
   older batch loaded the whole batch);
2. measured output tokens per request live in the ledger per job, from any run's load, and
   every estimate uses them;
3. a batch's cost is counted once per job (a re-attached batch is reported as such);
4. failures no retry can fix fail the task on its first try, retries or not;
5. a failed-records rerun has its own reject-rate rule;
6. a record that fails the same way N times becomes ``needs_review`` and is not sent again;
7. an estimate-only run pays nothing and says so; load and sensor pass it through.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.ledger import Ledger
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.testing.plugin import point_connection_at
from tests import test_ledger
from tests.test_ledger import context, stats

RECORDS = [
    {"id": f"r{i:02d}", "text": f"{['red', 'green', 'blue'][i % 3]} fence, two coats"} for i in range(30)
]


def submit_op(**kwargs) -> FableBatchSubmitOperator:
    """``test_ledger.submit_op`` over this file's 30 records, with a small estimate sample."""
    return test_ledger.submit_op(**{"records": RECORDS, "estimate_sample": 5, **kwargs})


def load_op(manifest, **kwargs) -> FableValidateLoadOperator:
    """``test_ledger.load_op`` given the manifest as the submit manifest too, without a QA sample."""
    return test_ledger.load_op(manifest, **{"submit_manifest": manifest, "qa_size": 0, **kwargs})


dbs = test_ledger.dbs  # the destination and ledger connections, each on its own SQLite file


# -- trap 1 ----------------------------------------------------------------------------------
def test_pilot_reattached_to_an_older_batch_loads_only_its_sample(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    full = submit_op().execute(context("full"))  # an older run: one batch of all 30, not loaded yet
    pilot = submit_op(sample=5).execute(context("pilot"))
    assert pilot["submitted"] == 0 and pilot["attached"] == 5 and pilot["batch_ids"] == full["batch_ids"]
    summary = load_op(pilot).execute({})
    assert summary["records"] == 5, summary  # was 30: the whole older batch
    assert summary["not_selected"] == 25
    with dbs.dest.connect() as conn:
        loaded = conn.execute(sa.text("SELECT count(*) FROM paint")).scalar_one()
        loaded += conn.execute(sa.text("SELECT count(*) FROM paint_rejects")).scalar_one()
    assert loaded == 5
    # The older run's own load still loads its whole batch.
    assert load_op(full).execute({})["records"] == 30


# -- trap 2 ----------------------------------------------------------------------------------
def test_measured_output_tokens_come_from_the_ledger_after_any_load(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    first = submit_op(records=RECORDS[:20]).execute(context("first"))  # not a pilot
    assert first["estimate"]["output_basis"] == "max_tokens"
    load_op(first).execute({})
    measured = dbs.ledger_obj.measured_output(first["job_fingerprint"])
    assert measured is not None and measured["requests"] >= 15 and 0 < measured["mean"] < 1024
    second = submit_op(records=RECORDS[20:]).execute(context("second"))
    est = second["estimate"]
    assert est["output_basis"] == "measured", est
    assert est["output_per_request"] == round(measured["mean"], 2)
    assert "measured" in est["output_basis_detail"]
    assert "output_tokens_per_request" in FableBatchSubmitOperator.template_fields


def test_budget_message_names_the_basis_not_run_a_pilot():
    from airflow_provider_fable.core.estimate import BudgetExceededError, check_budget, estimate_run

    est = estimate_run(
        model="claude-fable-5", requests=1000, batches=1, sample_counts=[200], prefix_tokens=0,
        max_tokens=1024, output_per_request=300.0, output_basis="pilot",
        output_basis_detail="mean of 100 succeeded results of the pilot",
    )  # fmt: skip
    with pytest.raises(BudgetExceededError) as err:
        check_budget(est, 0.0001)
    assert "Run a pilot" not in str(err.value)
    assert "mean of 100 succeeded results of the pilot" in str(err.value)
    bound = estimate_run(
        model="claude-fable-5",
        requests=1000,
        batches=1,
        sample_counts=[200],
        prefix_tokens=0,
        max_tokens=1024,
    )
    with pytest.raises(BudgetExceededError, match="Run a pilot"):
        check_budget(bound, 0.0001)


def test_later_stages_are_projected_from_the_escalation_rate():
    from airflow_provider_fable.core.estimate import project_stages

    stages = [
        {"model": "cheap", "requests": 1000, "cost_usd": 1.0},
        {"model": "claude-fable-5", "requests": 1000, "cost_usd": 10.0},
    ]
    out = project_stages(stages, escalation_rate=0.2)
    assert [s["requests"] for s in out] == [1000, 200]
    assert out[1]["cost_usd"] == pytest.approx(2.0) and out[0]["cost_usd"] == 1.0
    assert sum(s["cost_usd"] for s in out) == pytest.approx(3.0)
    per_stage = project_stages(stages, escalation_rate=[0.5])
    assert per_stage[1]["requests"] == 500
    with pytest.raises(ValueError, match="escalation rate"):
        project_stages(stages, escalation_rate=1.5)


# -- trap 3 ----------------------------------------------------------------------------------
def test_a_reattached_batch_is_not_counted_as_new_spend(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    first = submit_op().execute(context("first"))
    one = load_op(first).execute({})
    assert one["actual_cost_usd"] == one["cost_usd"] > 0 and one["reattached_cost_usd"] == 0
    again = submit_op().execute(context("again"))  # another run re-attaches to the same batch
    assert again["attached"] == 30 and again["submitted"] == 0
    two = load_op(again).execute({})
    assert two["actual_cost_usd"] == 0, two
    assert two["reattached_cost_usd"] == pytest.approx(one["cost_usd"])
    assert two["reattached_batches"] == first["batch_ids"]
    assert stats(server)["batches_created"] == 1


# -- trap 4 ----------------------------------------------------------------------------------
_FAIL_FAST_DAG = """
from datetime import timedelta

from airflow.sdk import DAG

from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from tests.conftest import Paint

with DAG("fable_trap_fail_fast", schedule=None, catchup=False):
    FableBatchSubmitOperator(
        task_id="submit",
        prompt_template="Paint for {id}: {text}",
        output_model=Paint,
        records=[{"id": "ok", "text": "red"}, {"id": "bad"}],  # no 'text': a RecordError
        ledger_conn_id="ledger_db",
        retries=2,
        retry_delay=timedelta(seconds=0),
    )
"""


def test_unfixable_failures_fail_the_task_on_the_first_try(
    fable_airflow, fable_emulator_factory, dbs, tmp_path
):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    server = fable_emulator_factory()
    point_connection_at(server)
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "fail_fast.py").write_text(_FAIL_FAST_DAG)
    dag = fable_airflow.load_dag("fable_trap_fail_fast", str(folder), serialize=True)  # for dag.test
    result = fable_airflow.run_dag(dag)
    assert result.task_states["submit"] == "failed", result.task_states
    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=result.run_id).one()
        assert ti.try_number == 1, ti.try_number  # retries=2, yet no second try
    assert stats(server)["calls"].get("create", 0) == 0


def test_core_errors_say_whether_a_retry_could_help():
    from airflow_provider_fable._compat import AirflowFailException
    from airflow_provider_fable.core.errors import FableError, JobSpecError, RecordError
    from airflow_provider_fable.core.estimate import BudgetExceededError
    from airflow_provider_fable.core.guardrails import GuardrailError
    from airflow_provider_fable.retries import fail_fast

    for exc in (
        RecordError("x", "id.missing", "no id"),
        JobSpecError("bad"),
        BudgetExceededError("$"),
        GuardrailError("g"),
    ):
        assert exc.retryable is False
        with pytest.raises(type(exc)) as err, fail_fast():
            raise exc
        assert isinstance(err.value, AirflowFailException) and str(err.value) == str(exc)
    with pytest.raises(FableError) as err, fail_fast():
        raise FableError("network")
    assert not isinstance(err.value, AirflowFailException)
    converted = None
    with pytest.raises(RecordError) as err, fail_fast():
        raise RecordError("r1", "template.field", "missing text", 3)
    converted = err.value
    assert converted.record_id == "r1" and converted.position == 3 and "r1" in str(converted)


# -- trap 5 ----------------------------------------------------------------------------------
def test_rerun_reject_rate_rule_fails_only_when_set(fable_emulator_factory, dbs):
    from airflow_provider_fable.core.guardrails import GuardrailError

    server = fable_emulator_factory(faults={"invalid_answer_rate": 1.0, "seed": 3})
    point_connection_at(server)
    first = submit_op().execute(context("first"))
    with pytest.raises(GuardrailError, match="max_reject_rate"):
        load_op(first, max_reject_rate=0.5, fail_when_all_rejected=False).execute({})
    rerun = submit_op(rerun="failed").execute(context("rerun"))
    ok = load_op(rerun, max_reject_rate=0.5, fail_when_all_rejected=False).execute({})
    assert ok["rejected"] == 30 and ok["reject_rule"] == "max_reject_rate_rerun"
    rerun2 = submit_op(rerun="failed").execute(context("rerun2"))
    with pytest.raises(GuardrailError, match="max_reject_rate_rerun"):
        load_op(rerun2, max_reject_rate_rerun="0.5", fail_when_all_rejected=False).execute({})


# -- trap 6 ----------------------------------------------------------------------------------
def test_a_record_failing_the_same_way_three_times_needs_review(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    # max_tokens=8 cuts every answer: the same reject (max_tokens) on every attempt.
    spec = dict(records=RECORDS[:6], max_tokens=8)
    manifest = submit_op(**spec).execute(context("run1"))
    job = manifest["job_fingerprint"]
    for n in (2, 3):
        load_op(manifest, fail_when_all_rejected=False).execute({})
        assert dbs.ledger_obj.needs_review(job) == []
        manifest = submit_op(rerun="failed", **spec).execute(context(f"run{n}"))
        assert manifest["submitted"] == 6
    load_op(manifest, fail_when_all_rejected=False).execute({})
    review = dbs.ledger_obj.needs_review(job)
    assert sorted(r["record_id"] for r in review) == [r["id"] for r in RECORDS[:6]]
    assert {r["reason"] for r in review} == {"truncated"} and {r["rejects"] for r in review} == {3}
    assert dbs.ledger_obj.failed(job) == []
    created = stats(server)["batches_created"]
    for mode in ("failed", "retryable", "unaccepted"):
        again = submit_op(rerun=mode, **spec).execute(context(f"again-{mode}"))
        assert again["submitted"] == 0 and again["batch_ids"] == [], (mode, again)
    assert stats(server)["batches_created"] == created
    assert dbs.ledger_obj.summary(job) == {"needs_review": 6}


# -- trap 7 ----------------------------------------------------------------------------------
def test_estimate_only_pays_nothing_and_load_and_sensor_pass(fable_emulator_factory, dbs, caplog):
    from airflow_provider_fable.sensors.batch import FableBatchSensor

    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op(estimate_only="True").execute(context())
    assert manifest["estimate_only"] is True and manifest["batch_ids"] == []
    assert manifest["estimate"]["requests"] == 30 and manifest["estimate"]["cost_usd"] > 0
    assert manifest["submitted"] == 0
    seen = stats(server)
    assert seen["calls"].get("create", 0) == 0 and seen["calls"]["count_tokens"] > 0
    assert dbs.ledger_obj.submissions_of() == []
    # Over a cap, an estimate-only run still reports instead of failing (it pays nothing).
    over = submit_op(estimate_only=True, max_cost_usd=0.000001).execute(context("over"))
    assert over["estimate_only"] is True and over["over_budget"] is True
    waited = FableBatchSensor(task_id="wait", batch_ids=manifest, deferrable=False).execute({})
    assert waited["batch_ids"] == []
    summary = load_op(manifest).execute({})
    assert summary["estimate_only"] is True and summary["records"] == 0
    assert "estimate_only" in FableBatchSubmitOperator.template_fields


# -- the ledger's new queries on both dialects ------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def any_ledger(request) -> Ledger:
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    return Ledger(engine).ensure_schema()


def test_ledger_review_usage_and_selection_on_both_dialects(any_ledger):
    from airflow_provider_fable.core.ledger import Outcome

    ledger = any_ledger
    ledger.register_job("cheap", model="m1")
    ledger.register_job("strong", model="m2", parent_job="cheap")
    rows = [(r, r, "d") for r in ("a", "b", "c")]

    def attempt(job: str, batch: str, reasons: dict[str, str | None]) -> None:
        sub = ledger.write_intent(job, run_key=f"run-{batch}", shard=1, records=rows, byte_size=1, model="m")
        ledger.write_batch(sub.id, batch)
        ledger.record_outcomes(
            job,
            batch,
            [
                Outcome(r, r, "accepted" if why is None else "rejected", why, why == "canceled", batch)
                for r, why in reasons.items()
            ],
        )

    # a: the same reject on both stages three times -> needs_review in both jobs.
    # b: canceled does not count. c: a different reason breaks the run.
    attempt("cheap", "B1", {"a": "schema", "b": "canceled", "c": "schema"})
    attempt("strong", "B2", {"a": "schema", "b": "schema", "c": "truncated"})
    assert ledger.needs_review("strong") == []
    attempt("strong", "B3", {"a": "schema", "b": "schema", "c": "schema"})
    review = ledger.needs_review("strong")
    assert [(r["record_id"], r["reason"], r["rejects"]) for r in review] == [("a", "schema", 3)]
    assert ledger.failed("cheap") == ["b", "c"] and ledger.failed("strong") == ["b", "c"]
    assert [r["record_id"] for r in ledger.needs_review("cheap")] == ["a"]
    # Usage: counted once per (job, batch); the mean over every counted batch of the job.
    assert ledger.measured_output("strong") is None
    assert ledger.count_batch_usage("strong", "B2", succeeded=3, output_tokens=30, cost_usd=0.1, pilot=True)
    assert not ledger.count_batch_usage("strong", "B2", succeeded=3, output_tokens=99, cost_usd=0.1)
    assert ledger.measured_output("strong")["pilot_only"] is True
    assert ledger.count_batch_usage("strong", "B3", succeeded=1, output_tokens=50, cost_usd=0.1, run_key="r3")
    measured = ledger.measured_output("strong")
    assert measured["mean"] == 20.0 and measured["requests"] == 4 and measured["pilot_only"] is False
    assert measured["runs"] == ["r3"] and ledger.counted_batches("strong", ["B2", "B9"]) == {"B2"}
    # Selection of a run that shares a batch.
    ledger.record_selection("strong", "pilot-run", "B3", ["a", "c"])
    ledger.record_selection("strong", "pilot-run", "B3", ["a"])  # a retry: no duplicate
    assert ledger.selected_records("strong", "pilot-run", "B3") == {"a", "c"}
    assert ledger.selected_records("strong", "other-run", "B3") == set()


# -- deliverable 7: the emulator draws again on every attempt ----------------------------------
def test_emulator_answers_differ_between_attempts_so_reruns_converge(fable_emulator_factory, dbs):
    """The attempt is part of the emulator's draw: a record broken on its first attempt is
    usually answered on its rerun (as on the real API), instead of failing the same way for ever."""
    server = fable_emulator_factory(faults={"invalid_answer_rate": 0.3, "seed": 11})
    point_connection_at(server)
    first = submit_op().execute(context("first"))
    one = load_op(first, fail_when_all_rejected=False).execute({})
    rejected = set(dbs.ledger_obj.failed(first["job_fingerprint"]))
    assert one["rejected"] == len(rejected) > 0
    rerun = submit_op(rerun="failed").execute(context("rerun"))
    assert rerun["submitted"] == len(rejected)
    two = load_op(rerun, fail_when_all_rejected=False).execute({})
    assert two["accepted"] > 0  # the same requests, drawn again: some are answered now
    again = set(dbs.ledger_obj.failed(first["job_fingerprint"]))
    assert again < rejected

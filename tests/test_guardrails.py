"""Guardrails against the emulator: pilot, estimate, budget cap, QA sample, distribution checks.

The example DAG runs for real (dag.test, real SDK over HTTP, SQLite); operator-level tests call
``execute`` directly so exception text and logs can be asserted.
"""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.cost import UnknownPriceError
from airflow_provider_fable.core.estimate import BudgetExceededError
from airflow_provider_fable.core.guardrails import GuardrailError
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.testing.plugin import point_connection_at
from tests.conftest import Paint
from tests.test_guardrails_core import ticket_ids

RECORDS = [{"id": f"p{i}", "text": f"{['red', 'green', 'blue'][i % 3]} fence, two coats"} for i in range(30)]


def logged(caplog, capsys) -> str:
    """Task logs go through Airflow's structlog to stdout, or to logging: read both."""
    return caplog.text + capsys.readouterr().out


def stats(server) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)


def submit_op(**kwargs) -> FableBatchSubmitOperator:
    spec = dict(
        task_id="submit",
        prompt_template="Paint for {id}: {text}",
        output_model=Paint,
        records=RECORDS,
        system_prompt="You pick paint. " * 400,  # long enough to be cached
    )
    spec.update(kwargs)
    return FableBatchSubmitOperator(**spec)


def load_op(manifest, **kwargs) -> FableValidateLoadOperator:
    spec = dict(
        task_id="load",
        batch_ids=manifest,
        output_model=Paint,
        destination_conn_id="dest_db",
        table="paint",
        id_column="paint_id",
        submit_manifest=manifest,
    )
    spec.update(kwargs)
    return FableValidateLoadOperator(**spec)


@pytest.fixture
def dest(tmp_path, monkeypatch):
    db = tmp_path / "dest.db"
    monkeypatch.setenv("AIRFLOW_CONN_DEST_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    engine = sa.create_engine(f"sqlite:///{db}")
    yield engine
    engine.dispose()


# -- submit: estimate, budget, pilot ----------------------------------------------------------
def test_estimate_is_logged_and_in_the_manifest_before_submit(fable_emulator_factory, caplog, capsys):
    server = fable_emulator_factory()
    point_connection_at(server)
    with caplog.at_level(logging.INFO):
        manifest = submit_op(estimate_sample=10).execute({})
    est = manifest["estimate"]
    assert manifest["model"] == "claude-fable-5" and manifest["pilot"] is False
    assert est["requests"] == 30 and est["sample_size"] == 10 and est["cached"]
    assert est["cache_write_tokens"] == est["prefix_tokens"] and est["cache_ttl"] == "1h"
    assert est["output_basis"] == "max_tokens" and est["output_tokens"] == 30 * 1024
    assert est["cost_usd"] > 0 and est["price"]["input_per_mtok"] == 10.0
    assert stats(server)["calls"]["count_tokens"] == 11  # the sample + one prefix-free count
    text = logged(caplog, capsys)
    assert "Estimated cost of 30 request(s) on claude-fable-5" in text
    assert "upper bound: max_tokens=1024" in text and "seeded sample of 10" in text


def test_the_sample_is_counted_a_few_calls_at_a_time_in_order(fable_emulator_factory):
    from airflow_provider_fable.hooks.fable import FableHook

    server = fable_emulator_factory()
    point_connection_at(server)
    hook = FableHook()
    # Lengths that differ per request: a count returned to the wrong request would show.
    sample = [
        {
            "model": "claude-fable-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "word " * (7 * i + 1)}],
        }
        for i in range(23)
    ]
    one_by_one = [hook.count_tokens(params) for params in sample]
    assert len(set(one_by_one)) == len(sample)
    assert submit_op()._count_sample(hook, sample) == one_by_one
    assert stats(server)["calls"]["count_tokens"] == 2 * len(sample)


def test_budget_cap_below_the_estimate_fails_before_any_create(fable_emulator_factory):
    server = fable_emulator_factory()
    point_connection_at(server)
    with pytest.raises(
        BudgetExceededError, match=r"estimated cost \$[\d.]+ for 30 request\(s\).*max_cost_usd=\$0\.0010"
    ):
        submit_op(max_cost_usd="0.001").execute({})
    seen = stats(server)
    assert seen["calls"]["create"] == 0
    assert seen["calls"]["count_tokens"] > 0
    # The same run under a cap above its estimate goes through.
    manifest = submit_op(max_cost_usd=100).execute({})
    assert len(manifest["batch_ids"]) == 1 and stats(server)["calls"]["create"] == 1


def test_unknown_model_under_a_cap_is_refused_not_free(fable_emulator_factory, caplog, capsys):
    server = fable_emulator_factory(known_models=None)  # the emulator serves any model name
    point_connection_at(server)
    with pytest.raises(UnknownPriceError, match="no known price for model 'acme-llm-1'"):
        submit_op(model="acme-llm-1", max_cost_usd=1000).execute({})
    assert stats(server)["calls"]["create"] == 0
    with caplog.at_level(logging.WARNING):
        manifest = submit_op(model="acme-llm-1").execute({})
    assert manifest["estimate"]["cost_usd"] is None, manifest
    assert "no known price" in logged(caplog, capsys)
    # An operator-level price makes it estimable (and the load prices the actual with it too).
    # resubmit: the job ledger would otherwise re-attach these records to the batch just made.
    priced = submit_op(
        model="acme-llm-1", prices={"acme-llm": [1, 2]}, max_cost_usd=1, resubmit=True
    ).execute({})
    assert priced["estimate"]["cost_usd"] > 0


def test_pilot_submits_a_spread_sample_and_says_so(fable_emulator_factory):
    server = fable_emulator_factory()
    point_connection_at(server)
    records = [{"id": i, "text": f"fence {i}"} for i in ticket_ids()]
    manifest = submit_op(records=records, sample=200, estimate_sample=5).execute({})
    assert manifest["request_count"] == 200
    assert manifest["pilot"] == {"sample": 200, "seed": 0, "source_records": 2400}
    order = sorted(r["id"] for r in records)
    from airflow_provider_fable.hooks.fable import FableHook

    hook = FableHook()
    assert hook.retrieve_batch(manifest["batch_ids"][0]).processing_status == "ended"  # 0 s processing
    sent = [r.custom_id for r in hook.iter_results(manifest["batch_ids"][0])]
    assert len(set(sent)) == 200
    assert {order.index(i) * 10 // 2400 for i in sent} == set(range(10))  # ids from every decile


# -- load: QA sample, guardrails ------------------------------------------------------------------
def test_guardrail_breach_fails_after_the_rows_are_loaded(fable_emulator_factory, dest, caplog, capsys):
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    with caplog.at_level(logging.INFO), pytest.raises(GuardrailError) as info:
        load_op(manifest, max_share={"color": {"red": 0.2}}).execute({})
    message = str(info.value)
    assert "color='red' share" in message and "> max_share 20.0%" in message
    assert "accepted)" in message and "rows are loaded" in message
    with dest.connect() as conn:
        loaded = conn.execute(sa.text("SELECT count(*) FROM paint")).scalar_one()
        rejected = conn.execute(sa.text("SELECT count(*) FROM paint_rejects")).scalar_one()
        qa = conn.execute(sa.text("SELECT paint_id, source_excerpt FROM paint_qa")).all()
    assert loaded + rejected == 30 and loaded > 0
    assert qa and all(r.source_excerpt.startswith(f"Paint for {r.paint_id}:") for r in qa)
    text = logged(caplog, capsys)
    assert "==== fable load summary ====" in text and "QA sample:" in text


def test_a_load_where_every_result_is_rejected_fails(fable_emulator_factory, dest):
    server = fable_emulator_factory(faults={"invalid_answer_rate": 1.0})
    point_connection_at(server)
    manifest = submit_op(records=RECORDS[:7]).execute({})
    with pytest.raises(GuardrailError, match="all 7 results were rejected"):
        load_op(manifest).execute({})
    with dest.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM paint_rejects")).scalar_one() == 7


def test_guardrail_typo_fails_before_loading(fable_emulator_factory, dest):
    server = fable_emulator_factory()
    point_connection_at(server)
    with pytest.raises(ValueError, match="'colour' is not an enum or boolean field"):
        load_op({"batch_ids": ["msgbatch_x"]}, max_share={"colour": {"red": 0.5}}).execute({})
    assert stats(server)["calls"].get("results", 0) == 0


# -- the example DAG: pilot, then a full run estimated from it --------------------------------------
@pytest.fixture
def triage(fable_airflow, fable_emulator_factory, tmp_path, monkeypatch):
    server = fable_emulator_factory(processing_retrieves=1, faults={"invalid_answer_rate": 0.05, "seed": 5})
    # The ledger in the test's own database: the backlog unit skips what its job accepted, and the
    # session's embedded ledger would remember what other tests' databases hold.
    point_connection_at(server, ledger_conn_id="fable_backlog_db")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    engine = sa.create_engine(f"sqlite:///{db}")
    yield fable_airflow, server, engine
    engine.dispose()


def test_example_dag_pilot_then_full_run_within_ten_percent_of_estimate(triage):
    """The example on the backlog unit: one run with a pilot pass of 200 sampled tickets, then the
    full pass; the projection the pilot makes for the full pass is within 10 % of what it cost."""
    airflow_env, server, engine = triage
    dag = airflow_env.load_dag("support_ticket_triage")

    run = airflow_env.run_dag(dag, conf={"pilot": 200, "limit": 1200})
    assert run.state == "success", run.task_states
    pilot = run.xcom("tickets.pilot_s1_submit")
    assert pilot["model"] == "claude-fable-5" and pilot["request_count"] == 200
    assert run.xcom("tickets.pilot_finalize")["records"] == 200
    full = run.xcom("tickets.s1_submit")
    assert full["request_count"] == 1000  # the 1,200 selected minus the pilot's 200
    projected = run.xcom("tickets.project")
    actual = run.xcom("tickets.s1_load")["cost_usd"]
    assert abs(projected["projected_cost_usd"] - actual) / actual < 0.10, (projected["stages"], actual)
    final = run.xcom("tickets.finalize")
    assert final["qa_table"] == "ticket_triage_qa" and final["qa_rows"] > 0


def test_example_dag_budget_cap_fails_the_submit_before_any_create(triage):
    airflow_env, server, engine = triage
    dag = airflow_env.load_dag("support_ticket_triage")
    result = airflow_env.run_dag(dag, conf={"limit": 100, "budget_usd": 0.01, "pilot": 0})
    assert result.task_states["tickets.s1_submit"] == "failed"
    assert result.task_states["tickets.s1_load"] != "success"
    seen = stats(server)
    assert seen["calls"]["count_tokens"] > 0  # the estimate ran ...
    assert seen["calls"]["create"] == 0  # ... and nothing was created
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM ticket_triage")).scalar_one() == 0


@pytest.mark.parametrize("ttl", ["1h", "5m"])
def test_cache_ttl_reaches_the_api_and_is_charged_at_its_rate(fable_emulator_factory, dest, ttl):
    server = fable_emulator_factory()
    # Connection-level prices: cache writes 100 $/MTok at 5m, 1000 at 1h, everything else free.
    prices = {
        "claude-fable-5": {
            "input": 0,
            "output": 0,
            "cache_read": 0,
            "cache_write_5m": 100,
            "cache_write_1h": 1000,
        }
    }
    point_connection_at(server, prices=prices)
    manifest = submit_op(cache_ttl=ttl, estimate_sample=3).execute({})
    summary = load_op(manifest, qa_size=0).execute({})
    written = summary["usage"]["cache_creation_input_tokens"]
    assert written == manifest["estimate"]["prefix_tokens"] > 0  # one write, then reads
    assert summary["usage"]["cache_creation_1h_input_tokens"] == (written if ttl == "1h" else 0)
    rate = 1000 if ttl == "1h" else 100
    assert summary["cost_usd"] == pytest.approx(written * rate / 1e6 * 0.5)
    assert manifest["estimate"]["cost_usd"] == pytest.approx(summary["cost_usd"])
    # An operator-level override wins over the connection's.
    cheaper = load_op(manifest, qa_size=0, prices={"claude-fable-5": [0, 0]}).execute({})
    assert cheaper["cost_usd"] == 0


def test_failed_estimate_blocks_only_a_capped_run(fable_emulator_factory):
    faults = {"http_error_rate": 1.0, "http_error_codes": [500], "http_error_endpoints": ["count_tokens"]}
    server = fable_emulator_factory(faults=faults)
    point_connection_at(server, max_retries=0)
    with pytest.raises(Exception, match="max_cost_usd=5.0 is set but the estimate failed"):
        submit_op(max_cost_usd=5).execute({})
    assert stats(server)["calls"]["create"] == 0
    manifest = submit_op().execute({})  # no cap: the estimate is information, the run goes on
    assert "estimate" not in manifest and len(manifest["batch_ids"]) == 1


def test_example_dag_guardrail_breach_fails_the_load_with_rows_loaded(
    fable_airflow, fable_emulator_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("FABLE_POLL_SECONDS", "0.2")
    # Most answers broken: over the DAG's max_reject_rate=0.5.
    server = fable_emulator_factory(faults={"invalid_answer_rate": 0.8, "seed": 2})
    point_connection_at(server, ledger_conn_id="fable_backlog_db")
    db = tmp_path / "backlog.db"
    fable_airflow.set_connection("fable_backlog_db", conn_type="sqlite", host=str(db))
    dag = fable_airflow.load_dag("support_ticket_triage")
    # A guardrail failure is not transient; dag.test() would wait out the retry_delay.
    dag.get_task("tickets.finalize").retries = 0
    result = fable_airflow.run_dag(dag, conf={"limit": 60, "pilot": 0})
    assert result.task_states["tickets.s1_submit"] == "success"
    assert result.task_states["tickets.finalize"] == "failed"
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            accepted = conn.execute(sa.text("SELECT count(*) FROM ticket_triage")).scalar_one()
            rejected = conn.execute(sa.text("SELECT count(*) FROM ticket_triage_rejects")).scalar_one()
    finally:
        engine.dispose()
    assert accepted + rejected == 60 and accepted > 0 and rejected / 60 > 0.5
    # The summary the failed task could not return is kept as XCom "summary".
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(run_id=result.run_id, task_id="tickets.finalize", key="summary")
            .one()
        )
        summary = XComModel.deserialize_value(row)
    assert summary["rejected"] == rejected
    assert any("> max_reject_rate 50.0%" in g for g in summary["guardrails"])

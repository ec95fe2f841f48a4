"""Operators, sensor and trigger as Airflow shells over the core, against the emulator.

The whole pipeline through the scheduler loop is covered in test_dag_triage.py; here each
piece's contract is pinned down on its own (records in, manifest out, rejects with reasons).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pandas as pd
import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.errors import FableError, RecordError
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.sensors.batch import FableBatchSensor
from airflow_provider_fable.testing.plugin import point_connection_at
from airflow_provider_fable.triggers.batch import FableBatchTrigger
from tests.conftest import Paint

RECORDS = [{"id": f"p{i}", "text": f"{['red', 'green', 'blue'][i % 3]} fence, two coats"} for i in range(7)]


def stats(server) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)


def submit_op(**kwargs) -> FableBatchSubmitOperator:
    spec = dict(
        task_id="submit", prompt_template="Paint for {id}: {text}", output_model=Paint, records=RECORDS
    )
    spec.update(kwargs)
    return FableBatchSubmitOperator(**spec)


@pytest.fixture
def dest(tmp_path, monkeypatch):
    db = tmp_path / "dest.db"
    monkeypatch.setenv("AIRFLOW_CONN_DEST_DB", json.dumps({"conn_type": "sqlite", "host": str(db)}))
    engine = sa.create_engine(f"sqlite:///{db}")
    yield engine
    engine.dispose()


def test_submit_splits_into_batches_and_returns_manifest(fable_emulator_factory):
    server = fable_emulator_factory()
    point_connection_at(server, default_model="claude-haiku-4-5")
    manifest = submit_op(max_requests_per_batch=3).execute({})
    assert manifest["request_count"] == 7
    assert [s["requests"] for s in manifest["shards"]] == [3, 3, 1]
    assert len(set(manifest["batch_ids"])) == 3
    assert manifest["model"] == "claude-haiku-4-5"  # the connection's default_model extra
    assert stats(server)["calls"]["create"] == 3


def test_submit_accepts_a_dataframe_a_loader_and_a_file(fable_emulator_factory, tmp_path):
    server = fable_emulator_factory()
    point_connection_at(server)
    assert submit_op(records=pd.DataFrame(RECORDS)).execute({})["request_count"] == 7
    assert submit_op(records=lambda: pd.DataFrame(RECORDS[:3])).execute({})["request_count"] == 3
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    assert submit_op(records=str(path)).execute({})["request_count"] == 2


def test_bad_record_fails_before_anything_is_paid_for(fable_emulator_factory):
    server = fable_emulator_factory()
    point_connection_at(server)
    bad = [*RECORDS, {"id": "p3", "text": "x"}]
    with pytest.raises(RecordError, match=r"'p3'.*custom_id.duplicate"):
        submit_op(records=bad, max_requests_per_batch=3).execute({})
    assert stats(server)["calls"]["create"] == 0


def test_submit_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        FableBatchSubmitOperator(task_id="s", prompt_template="{id}", output_model=Paint)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("non_json", "invalid_json"),
        ("wrong_type", "schema"),
        ("bad_enum", "schema"),
        ("missing_field", "schema"),
    ],
)
def test_broken_answers_land_in_rejects_with_reason(fable_emulator_factory, dest, kind, reason):
    server = fable_emulator_factory(faults={"invalid_answer_rate": 1.0, "invalid_kinds": [kind]})
    point_connection_at(server)
    manifest = submit_op().execute({})
    load = FableValidateLoadOperator(
        task_id="load",
        batch_ids=manifest,
        output_model=Paint,
        destination_conn_id="dest_db",
        table="paint",
        id_column="paint_id",
        fail_when_all_rejected=False,  # the default fails an all-rejected load (test_guardrails.py)
    )
    summary = load.execute({})
    assert summary["accepted"] == 0
    assert summary["reject_reasons"] == {reason: 7}
    with dest.connect() as conn:
        rows = conn.execute(sa.text("SELECT record_id, reason, detail, raw_answer FROM paint_rejects")).all()
    assert sorted(r.record_id for r in rows) == sorted(r["id"] for r in RECORDS)
    assert all(r.reason == reason and r.detail and r.raw_answer for r in rows)


def test_load_is_idempotent_and_enforces_max_reject_rate(fable_emulator_factory, dest):
    server = fable_emulator_factory(faults={"errored_rate": 0.5, "seed": 1})
    point_connection_at(server)
    manifest = submit_op().execute({})
    load = FableValidateLoadOperator(
        task_id="load",
        batch_ids=manifest["batch_ids"],
        output_model="tests.conftest.Paint",
        destination_conn_id="dest_db",
        table="paint",
        id_column="paint_id",
    )
    first = load.execute({})
    second = load.execute({})
    assert first["accepted"] + first["rejected"] == 7
    # Issue #17 (trap 3): the second load of the same batch does not count its cost again.
    spend = ("actual_cost_usd", "reattached_cost_usd", "reattached_batches")
    assert {k: v for k, v in first.items() if k not in spend} == {
        k: v for k, v in second.items() if k not in spend
    }
    assert second["actual_cost_usd"] == 0 and second["reattached_cost_usd"] == first["actual_cost_usd"]
    with dest.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM paint")).scalar_one() == first["accepted"]
        assert conn.execute(sa.text("SELECT count(*) FROM paint_rejects")).scalar_one() == first["rejected"]
    if first["rejected"]:
        load.max_reject_rate = 0.0
        with pytest.raises(FableError, match="max_reject_rate"):
            load.execute({})


def test_sensor_poke_mode_waits_then_returns_summaries(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=30, cancel_seconds=0.0)
    point_connection_at(server)
    manifest = submit_op().execute({})
    sensor = FableBatchSensor(task_id="wait", batch_ids=manifest, deferrable=False)
    assert sensor.poke({}).is_done is False
    from airflow_provider_fable.hooks.fable import FableHook

    FableHook().cancel_batch(manifest["batch_ids"][0])
    with pytest.raises(FableError, match="canceled: msgbatch_"):  # canceled from outside fails by default
        sensor.poke({})
    sensor.accept_incomplete = True
    done = sensor.poke({})
    assert done.is_done is True
    assert done.xcom_value["batches"][0]["request_counts"]["canceled"] == 7
    assert done.xcom_value["outcome"] == "partial"


def test_trigger_serializes_and_fires_when_batches_end(fable_emulator_factory):
    server = fable_emulator_factory(processing_retrieves=2)
    point_connection_at(server)
    manifest = submit_op(max_requests_per_batch=4).execute({})
    trigger = FableBatchTrigger(batch_ids=manifest["batch_ids"], poll_interval=0.2)
    path, kwargs = trigger.serialize()
    assert path == "airflow_provider_fable.triggers.batch.FableBatchTrigger"
    rebuilt = FableBatchTrigger(**kwargs)

    async def first_event():
        async for event in rebuilt.run():
            return event.payload

    payload = asyncio.run(first_event())
    assert payload["status"] == "success"
    assert [b["id"] for b in payload["batches"]] == manifest["batch_ids"]
    assert payload["polls"] == 2
    assert all(b["processing_status"] == "ended" for b in payload["batches"])


def test_trigger_gives_up_on_unknown_batch_with_error_event(fable_connection):
    trigger = FableBatchTrigger(
        batch_ids=["msgbatch_doesnotexist"], poll_interval=0.05, max_consecutive_errors=2
    )

    async def first_event():
        async for event in trigger.run():
            return event.payload

    payload = asyncio.run(first_event())
    assert payload["status"] == "error"
    assert "404" in payload["message"]


def test_sensor_execute_complete_raises_on_error_event():
    sensor = FableBatchSensor(task_id="wait", batch_ids=["msgbatch_x"], deferrable=True)
    with pytest.raises(FableError, match="boom"):
        sensor.execute_complete({}, {"status": "error", "message": "boom", "batch_ids": ["msgbatch_x"]})


def test_sensor_poke_gives_up_on_a_batch_that_never_appears(fable_connection):
    sensor = FableBatchSensor(
        task_id="wait", batch_ids=["msgbatch_mistyped"], deferrable=False, max_consecutive_errors=3
    )
    assert sensor.poke({}).is_done is False  # a 404 may be eventual consistency right after create
    assert sensor.poke({}).is_done is False
    with pytest.raises(FableError, match="404"):
        sensor.poke({})

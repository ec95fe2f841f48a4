"""core.report through the Ledger API (no Airflow): the page's fast counts never disagree with an
exact count, on SQLite and PostgreSQL, across a job's life (in flight, loaded, rerun, superseded)."""

from __future__ import annotations

import pytest

from airflow_provider_fable.core.ledger import Ledger
from airflow_provider_fable.core.loading import RecordOutcome
from airflow_provider_fable.core.report import Report, ReportError


@pytest.fixture(params=["sqlite", "postgres"])
def report(request, sqlite_engine):
    engine = sqlite_engine if request.param == "sqlite" else request.getfixturevalue("pg_engine")
    return Report(Ledger(engine).ensure_schema()).ensure_schema()


def _submit(
    ledger: Ledger, job: str, ids: list[str], batch: str, run: str = "dag_a/run1/grp.submit/-1"
) -> None:
    sub = ledger.write_intent(
        job, run_key=run, shard=1, records=[(i, i, "d") for i in ids], byte_size=10, model="m"
    )
    ledger.write_batch(sub.id, batch)


def _load(report: Report, job: str, batch: str, verdicts: dict[str, str | None]) -> None:
    outcomes = [
        RecordOutcome(
            rid, rid, "accepted" if reason is None else "rejected", reason, reason == "errored", batch
        )
        for rid, reason in verdicts.items()
    ]
    report.ledger.record_outcomes(job, batch, outcomes)
    summary = {"accepted": sum(r is None for r in verdicts.values()), "rejected": sum(r is not None for r in verdicts.values()),
               "cost_usd": 0.5, "table": "t", "rejects_table": "t_rejects",
               "distribution": {"color": {"red": 2}}}  # fmt: skip
    report.record_load(job, run_key="dag_a/run1/load/-1", summary=summary, batch_ids=[batch],
                       estimated_cost_usd=1.0, qa_table=None)  # fmt: skip
    parent = (report.ledger.job(job) or {}).get("parent_job")
    report.snapshot_counts([job, parent])


def _agree(report: Report) -> dict[str, dict[str, int]]:
    fast = {r["job_id"]: r["counts"] for r in report.jobs(fast=True)}
    exact = {r["job_id"]: r["counts"] for r in report.jobs()}
    assert fast == exact
    return exact


def test_fast_counts_match_exact_counts_through_a_jobs_life(report):
    ledger = report.ledger
    ids = [f"r{i}" for i in range(6)]
    ledger.register_job("job1", model="m")
    _submit(ledger, "job1", ids, "b1")
    assert _agree(report)["job1"]["submitted"] == 6  # no snapshot yet: counted live

    _load(
        report,
        "job1",
        "b1",
        {"r0": None, "r1": None, "r2": None, "r3": "schema", "r4": "errored", "r5": None},
    )
    counts = _agree(report)["job1"]
    assert (counts["accepted"], counts["rejected"], counts["total"]) == (4, 2, 6)

    # A rerun of the failed records under the same job: a newer submission makes the snapshot stale.
    _submit(ledger, "job1", ["r3", "r4"], "b2", run="dag_a/run2/grp.submit/-1")
    assert _agree(report)["job1"]["submitted"] == 2

    # An escalation job accepts r3: job1's reject of it is superseded (job1's snapshot is refreshed).
    ledger.register_job("job2", model="m2", parent_job="job1")
    _load(report, "job1", "b2", {"r3": "schema", "r4": None})
    _submit(ledger, "job2", ["r3"], "b3", run="dag_a/run3/grp.escalate/-1")
    _load(report, "job2", "b3", {"r3": None})
    counts = _agree(report)
    assert counts["job1"]["superseded"] == 1 and counts["job1"]["rejected"] == 0
    assert counts["job2"]["accepted"] == 1

    jobs = {r["job_id"]: r for r in report.jobs(fast=True)}
    assert jobs["job1"]["dag_id"] == "dag_a" and jobs["job1"]["stage"] == "grp.submit"
    assert jobs["job2"]["stage"] == "grp.escalate" and jobs["job2"]["parent_job"] == "job1"
    assert jobs["job1"]["cost_usd"] == pytest.approx(1.0) and jobs["job1"]["estimated_cost_usd"] == 1.0

    status = report.status("job1")
    assert {b["batch_id"] for b in status["batches"]} == {"b1", "b2"}
    assert report.distribution("job1") == {"color": {"red": 4}}
    assert [r["record_id"] for r in report.failed("job1")] == []
    assert report.resolve_job("job2") == "job2"
    with pytest.raises(ReportError, match="ambiguous"):
        report.resolve_job("job")

"""The ledger's set-based paths (issue #19): PostgreSQL writes intents with COPY + one joined
upsert and looks records up with ``= ANY`` arrays; a rerun's selection is asked per chunk.

Each scenario runs on SQLite (the per-row path, the reference) and on real PostgreSQL (the
set-based path), and the two ledgers must hold and answer exactly the same: states of a mixed
ledger, duplicate ids in one intent, a shard registered again on a retry, ids COPY has to escape.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.ledger import Ledger, Outcome
from airflow_provider_fable.operators import submit as submit_module
from tests.test_ledger import context, dbs, healthy_ids, load_op, submit_op  # noqa: F401 - fixture

#: Ids the COPY text format must escape (tab, newline, CR, backslash, a literal \N) and others.
AWKWARD = ["plain", "tab\there", "new\nline", "cr\rhere", "back\\slash", "\\N", "ünï😀", "", " sp ", "q'\"t"]


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request) -> Ledger:
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    return Ledger(engine).ensure_schema()


def _mixed(ledger: Ledger) -> list[str]:
    """A job whose records are in every state: pending, submitted, accepted, rejected (retryable
    or not), superseded by a child job, and re-sent under a later submission of another run."""
    ids = [f"r{i:03d}" for i in range(60)] + AWKWARD
    ledger.register_job("J", model="m1")
    sub1 = ledger.write_intent(
        "J", run_key="d/run1/t/-1", shard=1, records=[(r, f"c-{k}", f"d{k}") for k, r in enumerate(ids[:40])],
        byte_size=1, model="m1", api="http://a",
    )  # fmt: skip
    ledger.write_batch(sub1.id, "B1")
    ledger.record_outcomes(
        "J", "B1",
        [
            Outcome(r, f"c-{k}", "rejected" if k % 3 == 0 else "accepted", "errored" if k % 3 == 0 else None,
                    k % 2 == 0, "B1")
            for k, r in enumerate(ids[:30])
        ],
    )  # fmt: skip
    sub2 = ledger.write_intent(
        "J", run_key="d/run2/t/-1", shard=1,
        records=[(r, f"c2-{k}", f"e{k}") for k, r in enumerate(ids[25:55])], byte_size=1, model="m1",
        api="http://b",
    )  # fmt: skip
    ledger.write_batch(sub2.id, "B2")
    ledger.write_intent(  # pending: an intent with no batch yet
        "J", run_key="d/run3/t/-1", shard=1, records=[(r, r or "empty", "f") for r in ids[55:]],
        byte_size=1, model="m1",
    )  # fmt: skip
    ledger.register_job("K", model="m2", parent_job="J")
    sub3 = ledger.write_intent(
        "K", run_key="d/run4/t/-1", shard=1, records=[(ids[0], "k0", "g"), (ids[3], "k3", "g")],
        byte_size=1, model="m2",
    )  # fmt: skip
    ledger.write_batch(sub3.id, "B3")
    ledger.record_outcomes("K", "B3", [Outcome(ids[0], "k0", "accepted", None, False, "B3")])
    return ids


def _plain_states(ledger: Ledger, job_id: str) -> dict[str, tuple]:
    """Every record of the job read with one plain query: what the look-up must return."""
    c, s = ledger.records.c, ledger.submissions.c
    q = (
        sa.select(c.record_id, c.custom_id, c.status, c.batch_id, c.request_digest, c.retryable,
                  c.superseded_by, s.api, s.run_key)
        .select_from(ledger.records.outerjoin(ledger.submissions, s.id == c.submission_id))
        .where(c.job_id == job_id)
    )  # fmt: skip
    with ledger.engine.connect() as conn:
        return {r[0]: tuple(r) for r in conn.execute(q)}


def _snapshot(ledger: Ledger, ids: list[str]) -> dict:
    asked = ids + ["never-seen", ids[1]]  # an unknown id, and one asked twice
    return {
        "states": {k: tuple(v.__dict__.values()) for k, v in ledger.record_states("J", asked).items()},
        "summary": ledger.summary("J"),
        "failed": ledger.failed("J"),
        "retryable": ledger.failed("J", retryable_only=True),
        "run2": sorted(ledger.record_ids_of_run("J", "d/run2/t/-1")),
    }


def test_lookup_on_a_mixed_ledger_is_the_same_on_both_dialects(sqlite_engine, pg_engine):
    """The same calls on SQLite (per-row path) and PostgreSQL (set-based): the same answers."""
    snaps = []
    for engine in (sqlite_engine, pg_engine):
        ledger = Ledger(engine).ensure_schema()
        ids = _mixed(ledger)
        snap = _snapshot(ledger, ids)
        # Every record of the job, nothing more (the unknown id is absent), as one plain query reads it.
        assert snap["states"] == _plain_states(ledger, "J")
        assert set(snap["states"]) == set(ids)
        states = snap["states"]
        assert states["r003"][2] == "rejected" and states["r027"][2] == "submitted"
        assert states["tab\there"][2] == "pending" and states["\\N"][3] is None
        assert states["r055"][2] == "pending" and states["r000"][6] == "K"
        snaps.append(snap)
    assert snaps[0] == snaps[1]


def test_rerun_selection_per_chunk_equals_the_whole_sets(ledger):
    ids = _mixed(ledger)
    for retryable in (False, True):
        failed = set(ledger.failed("J", retryable_only=retryable))
        mine = set(ledger.record_ids_of_run("J", "d/run2/t/-1"))
        assert failed and mine
        whole = ledger.rerun_ids("J", retryable_only=retryable, job_id="J", run_key="d/run2/t/-1")
        assert whole == failed | mine
        asked = ids[::2] + ["never-seen"]
        assert ledger.rerun_selected(
            "J", asked, retryable_only=retryable, job_id="J", run_key="d/run2/t/-1"
        ) == (failed | mine) & set(asked)
        assert ledger.rerun_selected("J", asked, retryable_only=retryable) == failed & set(asked)
        # Past the limit the set is not built: the caller asks per chunk.
        assert ledger.rerun_ids("J", retryable_only=retryable, limit=len(failed) - 1) is None
        assert ledger.rerun_ids("J", retryable_only=retryable, limit=len(failed)) == failed


def test_a_duplicate_id_in_one_intent_keeps_its_last_row(ledger):
    ledger.register_job("J", model="m")
    rows = [("a", "ca1", "d1"), ("b", "cb", "d2"), ("a", "ca2", "d3")]
    sub = ledger.write_intent("J", run_key="r", shard=1, records=rows, byte_size=1, model="m")
    assert sub.request_count == 3  # what the shard holds, as before
    states = ledger.record_states("J", ["a", "b"])
    assert (states["a"].custom_id, states["a"].request_digest, states["a"].status) == ("ca2", "d3", "pending")
    ledger.write_batch(sub.id, "B1")
    assert ledger.custom_id_map("B1") == {"ca2": "a", "cb": "b"}


def test_a_shard_registered_again_on_a_retry(ledger):
    """A retry writes the intent of the same shard again (the first was abandoned): the records
    move to the new submission and stay pending until its batch exists; the old batch id is kept
    meanwhile, and the new one replaces it (attempts counted once per batch)."""
    ledger.register_job("J", model="m")
    rows = [(r, r, "d") for r in AWKWARD]
    first = ledger.write_intent("J", run_key="run/1", shard=1, records=rows, byte_size=1, model="m")
    ledger.write_batch(first.id, "B1")
    again = ledger.write_intent("J", run_key="run/1", shard=1, records=rows[:5], byte_size=1, model="m")
    states = ledger.record_states("J", AWKWARD)
    assert {states[r].status for r in AWKWARD[:5]} == {"pending"}
    assert {states[r].batch_id for r in AWKWARD} == {"B1"}
    assert {states[r].status for r in AWKWARD[5:]} == {"submitted"}
    assert [s.id for s in ledger.open_intents("J")] == [again.id]
    ledger.abandon(again.id, "retry")
    third = ledger.write_intent("J", run_key="run/1", shard=1, records=rows[:5], byte_size=1, model="m")
    assert ledger.write_batch(third.id, "B2")
    states = ledger.record_states("J", AWKWARD)
    assert {r: (states[r].batch_id, states[r].status) for r in AWKWARD[:5]} == {
        r: ("B2", "submitted") for r in AWKWARD[:5]
    }
    with ledger.engine.connect() as conn:
        attempts = dict(conn.execute(sa.select(ledger.records.c.record_id, ledger.records.c.attempts)).all())
    assert attempts == {r: 2 if r in AWKWARD[:5] else 1 for r in AWKWARD}
    assert sorted(ledger.custom_id_map("B2").values()) == sorted(AWKWARD[:5])  # ids round-trip exactly


def test_a_ledger_from_before_the_index_gains_it(ledger):
    c = ledger.records
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_fable_records_submission_id")
    assert "ix_fable_records_submission_id" not in {
        i["name"] for i in sa.inspect(ledger.engine).get_indexes(c.name)
    }
    Ledger(ledger.engine).ensure_schema()
    assert "ix_fable_records_submission_id" in {
        i["name"] for i in sa.inspect(ledger.engine).get_indexes(c.name)
    }
    assert ledger.has_records("J") is False
    ledger.write_intent("J", run_key="r", shard=1, records=[("a", "a", "d")], byte_size=1, model="m")
    assert ledger.has_records("J") is True


def test_a_new_postgres_ledger_leaves_room_for_hot_verdict_updates(pg_engine):
    """fillfactor 70 on fable_records, set by an ALTER after CREATE (``postgresql_with=`` is a
    SQLAlchemy 2.1 table option and the floor is 2.0.50)."""
    ledger = Ledger(pg_engine).ensure_schema()
    with pg_engine.connect() as conn:
        options = conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE oid = to_regclass(:t)"), {"t": ledger.records.name}
        ).scalar_one()
    assert options is not None and "fillfactor=70" in options


@pytest.mark.parametrize("per_chunk", [False, True], ids=["set", "per_chunk"])
def test_a_rerun_of_another_job_sends_exactly_its_rejects(
    fable_emulator_factory,
    dbs,  # noqa: F811 - the fixture imported from tests.test_ledger
    monkeypatch,
    per_chunk,
):
    """``rerun_job=`` (another model reruns the first job's failures): the rejects are read once
    as a set, or, past ``_RERUN_SET_MAX``, asked per chunk; both send exactly the rejects, and a
    retry of the rerun re-attaches instead of paying again."""
    if per_chunk:
        monkeypatch.setattr(submit_module, "_RERUN_SET_MAX", 0)
        monkeypatch.setattr(submit_module, "_LEDGER_CHUNK", 2)
    from tests.test_ledger import point_connection_at, stats

    flaky = fable_emulator_factory(faults={"errored_rate": 0.4, "seed": 3})
    point_connection_at(flaky)
    first = submit_op().execute(context())
    load_op(first).execute({})
    failed = dbs.ledger_obj.failed(first["job_fingerprint"])
    assert failed
    healthy = fable_emulator_factory()
    point_connection_at(healthy)
    rerun = submit_op(model="claude-fable-5-1", rerun="failed", rerun_job=first)
    manifest = rerun.execute(context(run_id="rerun"))
    assert manifest["job_fingerprint"] != first["job_fingerprint"]
    assert manifest["submitted"] == len(failed)
    assert healthy_ids(healthy) == sorted(failed)
    retry = submit_op(model="claude-fable-5-1", rerun="failed", rerun_job=first).execute(
        context(run_id="rerun")
    )
    assert retry["submitted"] == 0 and retry["attached"] == len(failed)
    assert stats(healthy)["batches_created"] == 1

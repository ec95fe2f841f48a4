"""No paid result lost or blocked (issue #18, items 6-11): hostile result files, errors no retry
can fix, requests the model cannot take, and database outages during a load.

Everything runs through the real operators, the real SDK over HTTP against the emulator and real
SQLite/PostgreSQL. A hostile results file is made by rewriting the lines the emulator serves for
an ended batch (what a corrupt or buggy results file would look like on the wire).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.ledger import Ledger
from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.testing.plugin import point_connection_at
from tests import test_ledger
from tests.test_ledger import RECORDS, context, stats, submit_op

dbs = test_ledger.dbs  # the destination and ledger connections, each on its own SQLite file


def load_op(manifest, **kwargs) -> FableValidateLoadOperator:
    """``test_ledger.load_op`` where an all-rejected batch is an outcome to look at, not a failure."""
    return test_ledger.load_op(manifest, **{"fail_when_all_rejected": False, **kwargs})


def rewrite_results(server, batch_id: str, change: Callable[[dict[str, bytes]], list[bytes]]) -> None:
    """Replace the lines the emulator serves for an ended batch by ``change({custom_id: line})``."""
    store = server.store
    store.open_results(batch_id)  # ends the batch (instant processing) and builds its lines
    batch = store._get(batch_id)
    by_id = {json.loads(line)["custom_id"]: line for line in batch.lines}
    batch.lines = [line if line.endswith(b"\n") else line + b"\n" for line in change(by_id)]


def rewrite_last(
    server, batch_id: str, tail: bytes, change: Callable[[dict[str, bytes]], list[bytes]]
) -> None:
    """As ``rewrite_results``, then the file's last line is ``tail`` with no newline after it."""
    rewrite_results(server, batch_id, change)
    server.store._get(batch_id).lines.append(tail)


def with_answer(line: bytes, text: str) -> bytes:
    """The same result line with another answer text."""
    obj = json.loads(line)
    obj["result"]["message"]["content"] = [{"type": "text", "text": text}]
    return json.dumps(obj).encode()


def with_custom_id(line: bytes, custom_id: str | int) -> bytes:
    obj = json.loads(line)
    obj["custom_id"] = custom_id
    return json.dumps(obj).encode()


def ledger_states(dbs, manifest) -> dict[str, tuple[str, str | None, bool | None]]:
    """Each record's current (status, reason, retryable) in the ledger."""
    rows = table(
        dbs.ledger,
        "SELECT record_id, status, reason, retryable FROM fable_records "
        f"WHERE job_id = '{manifest['job_fingerprint']}'",
    )
    return {
        rid: (status, reason, None if retryable is None else bool(retryable))
        for rid, status, reason, retryable in rows
    }


def table(engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


# ------------------------------------------------------------------ 6. completeness by custom_id
def test_a_result_carrying_another_custom_id_makes_the_missing_record_a_retryable_reject(
    fable_emulator_factory, dbs
):
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]
    # As many lines as requests, but p3's answer carries a custom_id the batch never had.
    rewrite_results(
        server,
        batch_id,
        lambda by_id: [
            *(with_custom_id(v, "zz_stranger") if k == "p3" else v for k, v in by_id.items()),
            with_custom_id(by_id["p0"], 7),  # a JSON number as custom_id: never this batch's
        ],
    )
    summary = load_op(manifest).execute({})

    states = ledger_states(dbs, manifest)
    assert states["p3"] == ("rejected", "missing_result", True)
    assert all(states[f"p{i}"][0] == "accepted" for i in range(7) if i != 3)
    assert table(dbs.dest, "SELECT record_id, reason, retryable FROM paint_rejects") == [
        ("p3", "missing_result", 1)
    ]
    ids = {r[0] for r in table(dbs.dest, "SELECT paint_id FROM paint")}
    assert ids == {f"p{i}" for i in range(7)} - {"p3"}  # the stranger is never a row
    assert summary["reject_reasons"] == {"missing_result": 1}
    assert summary["unknown_custom_ids"] == 2
    assert dbs.ledger_obj.failed(manifest["job_fingerprint"], retryable_only=True) == ["p3"]

    # A failed-records rerun picks it up and pays for that one record only.
    rerun = submit_op(rerun="failed").execute(context(run_id="rerun"))
    assert rerun["submitted"] == 1
    load_op(rerun).execute({})
    assert ledger_states(dbs, manifest)["p3"][0] == "accepted"


# ------------------------------------------------------------------ 7. unparseable lines
def test_unparseable_result_lines_become_rejects_and_the_rest_of_the_batch_loads(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]
    deep = b'{"custom_id": "p4", "result": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"

    def hostile(by_id: dict[str, bytes]) -> list[bytes]:
        return [
            by_id["p0"],
            by_id["p1"].replace(b"fence", b"f\xff\xfence"),  # invalid UTF-8, custom_id readable
            b'{"custom_id": "p2", "result": {"type": "succeeded", "message": {',  # not JSON
            by_id["p3"],
            deep,  # 10,000-deep nesting
            b"\x00\x01 garbage nobody can attribute",  # p5's line, unreadable: missing_result
        ]

    # p6's line is last, torn, with no newline after it: the file ends like a cut download, on
    # every attempt, so it is a bad line of a complete file, not a download to retry for ever.
    rewrite_last(server, batch_id, b'{"custom_id": "p6", "result": {"ty', hostile)
    summary = load_op(manifest).execute({})

    states = ledger_states(dbs, manifest)
    assert {k: v[:2] for k, v in states.items()} == {
        "p0": ("accepted", None),
        "p1": ("rejected", "unparseable_result"),
        "p2": ("rejected", "unparseable_result"),
        "p3": ("accepted", None),
        "p4": ("rejected", "unparseable_result"),
        "p5": ("rejected", "missing_result"),
        "p6": ("rejected", "unparseable_result"),
    }
    assert all(states[k][2] is True for k in ("p1", "p2", "p4", "p5", "p6"))
    rejects = dict(table(dbs.dest, "SELECT record_id, reason FROM paint_rejects"))
    assert rejects == {k: v[1] for k, v in states.items() if v[0] == "rejected"}
    assert summary["unattributable_lines"] == 1
    assert summary["accepted"] == 2 and summary["rejected"] == 5


def test_unparseable_lines_without_the_ledger_are_rejects_too(fable_emulator_factory, dbs):
    """A batch submitted elsewhere (not in the ledger) still loads past a bad line."""
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]
    rewrite_results(
        server, batch_id, lambda by_id: [b"{not json" if k == "p2" else v for k, v in by_id.items()]
    )
    dbs.ledger_obj.ensure_schema()
    with dbs.ledger.begin() as conn:  # forget the batch: it was "submitted elsewhere"
        conn.execute(sa.text("DELETE FROM fable_submissions"))
    summary = load_op(manifest).execute({})
    assert summary["accepted"] == 6
    assert summary["unattributable_lines"] == 1


# ------------------------------------------------------------------ 8. duplicate custom_ids
@pytest.mark.parametrize("chunk_size", [2, 10_000])
def test_duplicate_result_lines_give_one_verdict_per_record(fable_emulator_factory, dbs, chunk_size):
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]

    def doubled(by_id: dict[str, bytes]) -> list[bytes]:
        return [
            with_answer(by_id["p1"], "not json at all"),  # rejected first ...
            by_id["p1"],  # ... then accepted: the accepted answer wins
            by_id["p2"],  # accepted first ...
            with_answer(by_id["p2"], "{}"),  # ... then rejected: still accepted
            with_answer(by_id["p3"], "nope"),  # rejected twice: the first reject stands
            with_answer(by_id["p3"], '{"color": "red"}'),
            by_id["p4"],
            by_id["p4"],  # the same answer twice: one row
            by_id["p0"],
            by_id["p5"],
            by_id["p6"],
        ]

    rewrite_results(server, batch_id, doubled)
    summary = load_op(manifest, chunk_size=chunk_size).execute({})

    states = ledger_states(dbs, manifest)
    assert states["p3"] == ("rejected", "invalid_json", True)
    assert all(states[k][0] == "accepted" for k in ("p0", "p1", "p2", "p4", "p5", "p6"))
    assert summary["duplicate_results"] == 4
    assert summary["accepted"] == 6 and summary["rejected"] == 1
    assert summary["reject_reasons"] == {"invalid_json": 1}
    assert sorted(r[0] for r in table(dbs.dest, "SELECT paint_id FROM paint")) == [
        f"p{i}" for i in range(7) if i != 3
    ]
    assert dbs.ledger_obj.failed(manifest["job_fingerprint"]) == ["p3"]
    # The outcome view (each record's latest outcome) agrees with the ledger.
    view = dict(table(dbs.dest, "SELECT record_id, outcome FROM paint_outcomes"))
    assert view == {k: v[0] for k, v in states.items()}


# ------------------------------------------------------------------ 9. errors no retry can fix
def as_errored(line: bytes, error_type: str) -> bytes:
    obj = json.loads(line)
    obj["result"] = {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": error_type, "message": f"{error_type} for this request"},
        },
    }
    return json.dumps(obj).encode()


def test_errored_results_are_retryable_only_when_a_retry_can_fix_them(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]
    kinds = {
        "p0": "overloaded_error",
        "p1": "api_error",
        "p2": "invalid_request_error",
        "p3": "not_found_error",
        "p4": "permission_error",
        "p5": "authentication_error",
        "p6": "billing_error",
    }
    rewrite_results(server, batch_id, lambda by_id: [as_errored(v, kinds[k]) for k, v in by_id.items()])
    load_op(manifest).execute({})
    states = ledger_states(dbs, manifest)
    assert states["p0"] == states["p1"] == ("rejected", "errored", True)
    for rid in ("p2", "p3", "p4", "p5", "p6"):
        assert states[rid] == ("rejected", "errored_not_retryable", False), rid
    assert dbs.ledger_obj.failed(manifest["job_fingerprint"], retryable_only=True) == ["p0", "p1"]
    rejects = dict(table(dbs.dest, "SELECT record_id, retryable FROM paint_rejects"))
    assert rejects == {"p0": 1, "p1": 1, "p2": 0, "p3": 0, "p4": 0, "p5": 0, "p6": 0}


@pytest.mark.parametrize("estimate_sample", [0, 3])
def test_an_unknown_model_is_refused_before_any_create(fable_emulator_factory, dbs, estimate_sample):
    from airflow_provider_fable._compat import AirflowFailException
    from airflow_provider_fable.hooks.fable import UnknownModelError

    server = fable_emulator_factory()
    point_connection_at(server)
    with pytest.raises(UnknownModelError, match="claude-nope-9") as caught:
        submit_op(model="claude-nope-9", estimate_sample=estimate_sample).execute({})
    assert isinstance(caught.value, AirflowFailException)  # no retry can fix it
    assert "base URL" not in str(caught.value)
    assert stats(server)["calls"].get("create", 0) == 0


# ------------------------------------------------------------------ 11. database outages
@pytest.fixture
def pg_ledger(monkeypatch):
    """An Airflow postgres connection ``pg_ledger`` to a private database, and an ``outage(s)``
    that refuses every connection to it (and ends the open ones) for ``s`` seconds."""
    from tests.conftest import PG_URL, private_pg_database

    with private_pg_database("fable_outage") as url:
        monkeypatch.setenv(
            "AIRFLOW_CONN_PG_LEDGER",
            json.dumps(
                {
                    "conn_type": "postgres",
                    "host": url.host,
                    "port": url.port or 5432,
                    "login": url.username,
                    "schema": url.database,
                }
            ),
        )
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        threads: list[threading.Thread] = []

        def allow(flag: bool) -> None:
            with admin.connect() as conn:
                conn.execute(sa.text(f"ALTER DATABASE {url.database} ALLOW_CONNECTIONS {str(flag).lower()}"))
                if not flag:
                    conn.execute(
                        sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                        {"d": url.database},
                    )

        def outage(seconds: float) -> None:
            allow(False)
            timer = threading.Timer(seconds, allow, args=(True,))
            timer.start()
            threads.append(timer)

        try:
            yield SimpleNamespace(url=url, outage=outage)
        finally:
            for timer in threads:
                timer.cancel()
            allow(True)
            admin.dispose()


def test_a_ledger_outage_during_the_load_is_ridden_out_inside_the_task(
    fable_emulator_factory, dbs, pg_ledger
):
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op(ledger_conn_id="pg_ledger", max_requests_per_batch=3).execute(context())
    pg_ledger.outage(4.0)  # every connection refused for 4 s, from before the load starts
    summary = load_op(manifest, ledger_conn_id="pg_ledger").execute({})
    assert summary["accepted"] == 7
    ledger = Ledger(sa.create_engine(pg_ledger.url))
    assert ledger.summary(manifest["job_fingerprint"]) == {"accepted": 7}
    ledger.engine.dispose()


def test_a_longer_ledger_outage_fails_with_a_clear_error_not_a_raw_driver_error(
    fable_emulator_factory, dbs, pg_ledger
):
    from airflow_provider_fable.core.dbretry import DatabaseUnavailableError

    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op(ledger_conn_id="pg_ledger", max_requests_per_batch=3).execute(context())
    pg_ledger.outage(30.0)
    with pytest.raises(DatabaseUnavailableError, match="Nothing was loaded yet") as caught:
        load_op(manifest, ledger_conn_id="pg_ledger", db_retry_seconds=1).execute({})
    assert "not currently accepting connections" in str(caught.value)


def test_an_outage_mid_load_names_the_batches_loaded_and_the_verdicts_committed(
    fable_emulator_factory, dbs, pg_ledger, monkeypatch
):
    from airflow_provider_fable.core.dbretry import DatabaseUnavailableError

    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op(ledger_conn_id="pg_ledger", max_requests_per_batch=3).execute(context())
    first, second, _ = manifest["batch_ids"]
    serve = server.store.open_results

    def open_results(batch_id: str):
        if batch_id == second:  # the ledger goes away while the second batch is downloaded
            pg_ledger.outage(30.0)
        return serve(batch_id)

    monkeypatch.setattr(server.store, "open_results", open_results)
    with pytest.raises(DatabaseUnavailableError) as caught:
        load_op(manifest, ledger_conn_id="pg_ledger", db_retry_seconds=1).execute({})
    message = str(caught.value)
    assert f"loading batch {second} failed" in message
    assert f"Batches fully loaded before it: {first}." in message
    # The second batch's first chunk reached the destination, not the ledger.
    assert "3 record(s) were committed to the destination and 0 verdict(s) to the job ledger" in message
    assert "nothing is paid again" in message
    assert len(table(dbs.dest, "SELECT paint_id FROM paint")) == 6  # what was committed stays


def test_a_ledger_outage_after_a_create_names_the_paid_batches_and_the_retry_adopts_them(
    fable_emulator_factory, dbs, pg_ledger, monkeypatch
):
    from airflow_provider_fable.core.dbretry import DatabaseUnavailableError

    server = fable_emulator_factory()
    point_connection_at(server)
    create = server.store.create
    made: list[str] = []

    def create_then_outage(*args, **kwargs):
        batch = create(*args, **kwargs)
        made.append(batch["id"])
        if len(made) == 2:  # the ledger goes away right after the second (paid) create
            pg_ledger.outage(6.0)
        return batch

    monkeypatch.setattr(server.store, "create", create_then_outage)
    monkeypatch.setenv("FABLE_DB_RETRY_SECONDS", "1")
    with pytest.raises(DatabaseUnavailableError) as caught:
        submit_op(ledger_conn_id="pg_ledger", max_requests_per_batch=3).execute(context())
    message = str(caught.value)
    assert f"recording batch {made[1]} (shard 2/3) failed" in message
    assert f"Batches this try created (paid for): {made[0]}, {made[1]}." in message

    # The next try (the outage over) pays only for the shard never created.
    monkeypatch.setenv("FABLE_DB_RETRY_SECONDS", "60")
    manifest = submit_op(ledger_conn_id="pg_ledger", max_requests_per_batch=3).execute(context())
    assert stats(server)["batches_created"] == 3
    assert set(manifest["batch_ids"]) == set(made)


# ------------------------------------------------------------------ 10. over the context window
def test_a_request_over_the_context_window_is_refused_before_paying_naming_the_record(
    fable_emulator_factory, dbs
):
    from airflow_provider_fable.core.errors import RecordError

    server = fable_emulator_factory()
    point_connection_at(server)
    words = "the fence was painted red and then painted again in the spring "
    # The default model's window is 1M tokens (docs/cost.md): ~6 MB of text is over it.
    big = {"id": "huge-1", "text": words * (6_000_000 // len(words))}
    with pytest.raises(RecordError, match=r"'huge-1'.*context_window.*1,000,000-token context window"):
        submit_op(records=[*RECORDS, big], estimate_sample=0).execute(context())
    assert stats(server)["calls"].get("create", 0) == 0


def test_only_requests_near_the_window_are_counted_and_one_that_fits_is_sent(fable_emulator_factory, dbs):
    server = fable_emulator_factory()
    point_connection_at(server)
    words = "the fence was painted red and then painted again in the spring "
    # 1.2 MB: over the sure bound of the 1M-token window (bytes + max_tokens), ~280k tokens: fits
    long = {"id": "long-1", "text": words * (1_200_000 // len(words))}
    manifest = submit_op(records=[*RECORDS, long], estimate_sample=0).execute(context())
    assert manifest["submitted"] == 8
    # One count, for the record over the sure bound (bytes + max_tokens > window; it also
    # proves the model known, so the check before the create needs no call of its own); the
    # seven short records were never counted.
    assert stats(server)["calls"]["count_tokens"] == 1


def test_a_locked_sqlite_file_is_transient_and_waited_out_a_bad_statement_is_not(tmp_path):
    """Real SQLite: ``database is locked`` is retried until the lock goes; a syntax error fails
    at once (no retry can fix it)."""
    from airflow_provider_fable.core.dbretry import is_transient_db_error, retry_transient_db

    path = tmp_path / "locked.db"
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    holder = sa.create_engine(f"sqlite:///{path}").connect()
    holder.exec_driver_sql("BEGIN EXCLUSIVE")
    attempts = []

    def wait(seconds: float) -> None:  # the other writer finishes while this one backs off
        holder.rollback()

    def write() -> None:
        attempts.append(1)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))

    retry_transient_db(write, what="test write", budget=30, sleep=wait)
    assert len(attempts) == 2
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
    with pytest.raises(sa.exc.OperationalError) as caught:
        retry_transient_db(lambda: engine.connect().execute(sa.text("SELEC 1")), what="bad", budget=30)
    assert not is_transient_db_error(caught.value)
    holder.close()
    engine.dispose()


def test_the_async_results_stream_hands_on_bad_lines_like_the_sync_one(fable_emulator_factory, dbs):
    """``aiter_results`` (what an async caller reads): a bad line is an ``unparseable`` result,
    a torn last line is handed on at the last attempt, the rest are read."""
    import asyncio

    from airflow_provider_fable.hooks.fable import FableHook

    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]
    rewrite_last(
        server,
        batch_id,
        b'{"custom_id": "p6", "res',
        lambda by_id: [b"{oops" if k == "p1" else v for k, v in by_id.items() if k != "p6"],
    )

    async def read() -> list[tuple[str, str]]:
        hook = FableHook()
        try:
            return [(r.custom_id, r.type) async for r in hook.aiter_results(batch_id)]
        finally:
            await hook.aclose()

    got = asyncio.run(read())
    assert sorted(got) == sorted(
        [(f"p{i}", "succeeded") for i in (0, 2, 3, 4, 5)] + [("", "unparseable"), ("p6", "unparseable")]
    )


@pytest.mark.parametrize("depth", [1_000, 3_000])
def test_deeply_nested_answers_are_rejects_not_a_blocked_load(fable_emulator_factory, dbs, depth):
    """Nesting in the answer itself (a tool input, an answer text), not in the envelope: parsers
    and encoders each have their own depth limit (msgspec, orjson 1024/255, json's recursion);
    none of them may surface as a raw RecursionError."""
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]

    def tool_answer(line: bytes) -> bytes:
        obj = json.loads(line)
        obj["result"]["message"]["content"] = [
            {"type": "tool_use", "id": "t", "name": "x", "input": {"color": 0}}
        ]
        return json.dumps(obj).encode().replace(b'"color": 0', b'"color": ' + b"[" * depth + b"]" * depth)

    def deep(by_id: dict[str, bytes]) -> list[bytes]:
        out = dict(by_id)
        out["p0"] = tool_answer(by_id["p0"])
        out["p3"] = with_answer(by_id["p3"], "[" * depth * 30 + "]" * depth * 30)
        return list(out.values())

    rewrite_results(server, batch_id, deep)
    summary = load_op(manifest).execute({})
    states = ledger_states(dbs, manifest)
    assert states["p0"][0] == states["p3"][0] == "rejected"
    assert summary["accepted"] == 5


def test_two_result_lines_merged_into_one_do_not_block_the_load(fable_emulator_factory, dbs):
    """The file is one line short on every download (two lines merged): it is loaded as it is
    (was: "ended after 6 of 7 lines", retried, then the load failed, every time)."""
    server = fable_emulator_factory()
    point_connection_at(server)
    manifest = submit_op().execute({})
    (batch_id,) = manifest["batch_ids"]

    def merged(by_id: dict[str, bytes]) -> list[bytes]:
        rest = [v for k, v in by_id.items() if k not in ("p1", "p2")]
        return [by_id["p1"].rstrip(b"\n") + by_id["p2"], *rest]

    rewrite_results(server, batch_id, merged)
    summary = load_op(manifest).execute({})
    states = ledger_states(dbs, manifest)
    assert states["p1"][:2] == ("rejected", "unparseable_result")
    assert states["p2"][:2] == ("rejected", "missing_result")
    assert summary["accepted"] == 5

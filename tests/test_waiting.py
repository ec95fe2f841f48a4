"""Waiting on batches: the terminal policy on every path, deadlines, cancel on kill, fault tolerance.

Everything runs against the real emulator over HTTP; triggers run in a real event loop exactly as
the triggerer runs them (``async for event in trigger.run()``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.terminal import TerminalPolicy, default_deadline
from airflow_provider_fable.hooks.fable import FableHook
from airflow_provider_fable.sensors.batch import FableBatchSensor
from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at
from airflow_provider_fable.triggers.batch import FableBatchTrigger

ROOT = Path(__file__).resolve().parents[1]
REQUEST = {
    "model": "claude-haiku-4-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Paint: red"}],
}


def stats(server) -> dict:
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        return json.load(resp)


def create(n_batches: int, per_batch: int = 3) -> list[str]:
    hook = FableHook()
    try:
        return [
            hook.create_batch([{"custom_id": f"b{b}r{i}", "params": REQUEST} for i in range(per_batch)]).id
            for b in range(n_batches)
        ]
    finally:
        hook.close()


def statuses(ids: list[str]) -> dict[str, tuple[str, int]]:
    hook = FableHook()
    try:
        out = {}
        for batch_id in ids:
            batch = hook.retrieve_batch(batch_id)
            out[batch_id] = (batch.processing_status, batch.request_counts.canceled)
        return out
    finally:
        hook.close()


def run_trigger(trigger: FableBatchTrigger) -> dict:
    async def first_event():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(first_event())


def summary(batch_id: str, status: str = "ended", **counts) -> dict:
    full = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
    full.update(counts)
    return {"id": batch_id, "processing_status": status, "request_counts": full, "expires_at": None}


# ----------------------------------------------------------------------------- the policy itself
@pytest.mark.parametrize(
    ("batches", "policy", "ok", "reason"),
    [
        ([summary("a", succeeded=3), summary("b", succeeded=2)], TerminalPolicy(), True, "ended"),
        ([summary("a", succeeded=2, errored=1)], TerminalPolicy(), True, "partial"),
        ([summary("a", succeeded=2, expired=1)], TerminalPolicy(fail_on_partial=True), False, "partial"),
        ([summary("a", succeeded=1, canceled=2)], TerminalPolicy(), False, "incomplete"),
        ([summary("a", expired=3)], TerminalPolicy(), False, "incomplete"),
        ([summary("a", expired=3)], TerminalPolicy(accept_incomplete=True), True, "partial"),
        # Re-attached batches an earlier try saw end canceled/expired pass as partial, also under
        # fail_on_partial; a fresh batch's own failures still decide.
        ([summary("a", succeeded=1, canceled=2)], TerminalPolicy(known_incomplete=("a",)), True, "partial"),
        (
            [summary("a", canceled=3)],
            TerminalPolicy(fail_on_partial=True, known_incomplete=("a",)),
            True,
            "partial",
        ),
        (
            [summary("a", canceled=3), summary("b", succeeded=1, errored=1)],
            TerminalPolicy(fail_on_partial=True, known_incomplete=("a",)),
            False,
            "partial",
        ),
        (
            [summary("a", canceled=3), summary("b", canceled=1)],
            TerminalPolicy(known_incomplete=("a",)),
            False,
            "incomplete",
        ),
    ],
)
def test_terminal_policy(batches, policy, ok, reason):
    verdict = policy.decide(batches, now=0.0, deadline=None)
    assert (verdict.ok, verdict.reason) == (ok, reason), verdict.message


def test_terminal_policy_waits_then_times_out_naming_what_to_cancel():
    batches = [summary("a", succeeded=1), summary("b", status="in_progress", processing=4)]
    assert TerminalPolicy().decide(batches, now=10.0, deadline=11.0) is None
    verdict = TerminalPolicy().decide(batches, now=11.0, deadline=11.0)
    assert (verdict.ok, verdict.reason, verdict.to_cancel) == (False, "timeout", ("b",))
    assert "b" in verdict.message and "cancel" in verdict.message


def test_default_deadline_is_latest_expiry_plus_margin():
    expiry = datetime(2030, 1, 2, tzinfo=timezone.utc)
    batches = [
        {**summary("a"), "expires_at": (expiry - timedelta(hours=1)).isoformat()},
        {**summary("b"), "expires_at": expiry.isoformat().replace("+00:00", "Z")},
    ]
    assert default_deadline(batches, margin=60) == expiry.timestamp() + 60


# ----------------------------------------------------------------------------- trigger vs emulator
def test_many_batches_ending_at_different_times(fable_emulator_factory, capfd):
    # Each batch ends 2 s after its own creation; groups created 0.7 s apart end apart.
    server = fable_emulator_factory(processing_seconds=2.0)
    point_connection_at(server)
    ids = []
    for group in range(3):
        if group:
            time.sleep(0.7)
        ids += create(2)
    payload = run_trigger(FableBatchTrigger(batch_ids=ids, poll_interval=0.1))
    assert payload["status"] == "success", payload["message"]
    assert [b["id"] for b in payload["batches"]] == ids
    ended = {b["ended_at"] for b in payload["batches"]}
    assert len(ended) > 1  # really different end times, seen by one wait
    assert sum(b["request_counts"]["succeeded"] for b in payload["batches"]) == 18
    assert payload["polls"] >= 2
    logged = capfd.readouterr()
    progress = [
        line for line in (logged.out + logged.err).splitlines() if "] Poll " in line or " Poll " in line
    ]
    assert any("% of 18 requests done" in line and "batches ended" in line for line in progress), progress
    # Six batches are read from list pages (at most one per poll), not retrieved one by one.
    calls = stats(server)["calls"]
    assert 1 <= calls["list"] <= payload["polls"]
    # Finished batches are not read again; the last few pending ones are retrieved, not listed.
    assert calls.get("retrieve", 0) < payload["polls"] * len(ids)


def test_canceled_from_outside_fails_the_wait(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=3600, cancel_seconds=0.2)
    point_connection_at(server)
    ids = create(2)
    FableHook().cancel_batch(ids[1])  # someone canceled it in the console
    trigger = FableBatchTrigger(batch_ids=ids[1:], poll_interval=0.1)
    payload = run_trigger(trigger)
    assert payload["status"] == "failed" and payload["reason"] == "incomplete"
    assert f"canceled: {ids[1]}" in payload["message"]
    sensor = FableBatchSensor(task_id="wait", batch_ids=ids[1:])
    with pytest.raises(FableError, match="accept_incomplete=True"):
        sensor.execute_complete({}, payload)


def test_all_expired_fails_the_wait_and_an_accepted_load_of_nothing_fails(
    fable_emulator_factory, tmp_path, monkeypatch
):
    from airflow_provider_fable.operators.load import FableValidateLoadOperator
    from tests.conftest import Paint

    server = fable_emulator_factory(faults={"expired_rate": 1.0})
    point_connection_at(server)
    ids = create(1, per_batch=4)
    # The emulator ends a batch with unprocessed requests at its 24 h expiry, on a clock we move.
    req = urllib.request.Request(
        f"{server.base_url}/_emulator/clock",
        data=json.dumps({"advance_seconds": 86400 + 60}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req).close()
    payload = run_trigger(FableBatchTrigger(batch_ids=ids, poll_interval=0.05))
    assert payload["status"] == "failed" and payload["reason"] == "incomplete"
    assert "no request succeeded" in payload["message"] and "expired 4" in payload["message"]
    # A user who accepts incomplete batches still gets a failing load, not a green load of 0 rows.
    accepted = run_trigger(FableBatchTrigger(batch_ids=ids, poll_interval=0.05, accept_incomplete=True))
    assert accepted["status"] == "success"
    monkeypatch.setenv(
        "AIRFLOW_CONN_DEST_DB", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "d.db")})
    )
    load = FableValidateLoadOperator(
        task_id="load", batch_ids=ids, output_model=Paint, destination_conn_id="dest_db", table="paint"
    )
    with pytest.raises(FableError, match="all 4 results were rejected"):
        load.execute({})


@pytest.mark.parametrize(("n_batches", "endpoint"), [(1, "retrieve"), (5, "list")])
def test_injected_429_500_529_on_retrieve_are_tolerated(fable_emulator_factory, n_batches, endpoint):
    # One batch is retrieved; five are read from list pages: faults on the endpoint in use.
    server = fable_emulator_factory(
        processing_retrieves=6,
        faults={"http_error_rate": 0.2, "http_error_endpoints": endpoint, "seed": 12},
    )
    point_connection_at(server)
    ids = create(n_batches)
    payload = run_trigger(FableBatchTrigger(batch_ids=ids, poll_interval=0.02, max_consecutive_errors=10))
    assert payload["status"] == "success", payload.get("message")
    assert all(b["processing_status"] == "ended" for b in payload["batches"])
    assert stats(server)["faults"]["http_error"] > 0
    assert stats(server)["calls"].get("list" if n_batches == 1 else "retrieve", 0) == 0


@pytest.mark.parametrize("n_batches", [1, 5])
def test_transient_404_after_create_is_tolerated(fable_emulator_factory, n_batches):
    # Not visible yet: a 404 on retrieve, and absent from list pages (the poller then retrieves).
    server = fable_emulator_factory(processing_retrieves=2, faults={"transient_404_after_create": 2})
    point_connection_at(server)
    ids = create(n_batches)
    payload = run_trigger(FableBatchTrigger(batch_ids=ids, poll_interval=0.02, max_consecutive_errors=3))
    assert payload["status"] == "success", payload.get("message")
    assert payload["polls"] >= 3  # two 404s, then the batch
    assert stats(server)["faults"]["transient_404"] == 2 * n_batches


def test_deadline_reached_cancels_the_remaining_batches(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=3600, cancel_seconds=0.0)
    point_connection_at(server)
    ids = create(3)
    payload = run_trigger(FableBatchTrigger(batch_ids=ids, poll_interval=0.05, deadline=time.time() + 0.3))
    assert payload["status"] == "failed" and payload["reason"] == "timeout"
    assert payload["canceled"] == ids
    assert all(batch_id in payload["message"] for batch_id in ids)
    assert stats(server)["calls"]["cancel"] == 3
    assert {s for s, canceled in statuses(ids).values()} <= {"canceling", "ended"}
    sensor = FableBatchSensor(task_id="wait", batch_ids=ids)
    with pytest.raises(FableError, match="deadline reached with 3 of 3 batches still running"):
        sensor.execute_complete({}, payload)


def test_poke_path_deadline_cancels_too(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=3600, cancel_seconds=0.0)
    point_connection_at(server)
    ids = create(1)
    sensor = FableBatchSensor(task_id="wait", batch_ids=ids, deferrable=False, timeout=0.0)
    with pytest.raises(FableError, match="deadline reached"):
        sensor.poke({})
    assert stats(server)["calls"]["cancel"] == 1


def test_trigger_on_kill_cancels_running_batches(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=3600, cancel_seconds=0.0)
    point_connection_at(server)
    ids = create(2)
    trigger = FableBatchTrigger(batch_ids=ids, poll_interval=0.05)

    async def kill_while_waiting():
        async def consume():
            async for _ in trigger.run():
                raise AssertionError("the wait must still be running")

        task = asyncio.ensure_future(consume())
        while stats(server)["calls"].get("retrieve", 0) < 2:  # the wait has polled
            await asyncio.sleep(0.02)
        task.cancel()  # what the triggerer does on a user action, before calling on_kill()
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.on_kill()

    asyncio.run(kill_while_waiting())
    assert stats(server)["calls"]["cancel"] == 2
    assert all(canceled == 3 for _, canceled in statuses(ids).values())


def test_trigger_cleanup_never_cancels(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=3600)
    point_connection_at(server)
    trigger = FableBatchTrigger(batch_ids=create(1), poll_interval=0.05)
    asyncio.run(trigger.cleanup())  # a triggerer restart / hand-over
    assert stats(server)["calls"].get("cancel", 0) == 0


def test_sensor_on_kill_cancels_when_not_deferred(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=3600, cancel_seconds=0.0)
    point_connection_at(server)
    ids = create(2)
    sensor = FableBatchSensor(task_id="wait", batch_ids={"batch_ids": ids}, deferrable=False)
    assert sensor.poke({}).is_done is False
    sensor.on_kill()
    assert all(canceled == 3 for _, canceled in statuses(ids).values())


def test_serialize_round_trip_holds_no_secret(fable_emulator_factory):
    from airflow_provider_fable._compat import TaskDeferred

    server = fable_emulator_factory(processing_seconds=3600)
    point_connection_at(server)
    ids = create(2)
    sensor = FableBatchSensor(task_id="wait", batch_ids=ids, poll_interval=5, fail_on_partial=True)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    path, kwargs = trigger.serialize()
    blob = json.dumps(kwargs)
    assert TEST_API_KEY not in blob and "password" not in blob and server.base_url not in blob
    rebuilt = FableBatchTrigger(**json.loads(blob))
    assert rebuilt.serialize() == (path, kwargs)
    assert kwargs["batch_ids"] == ids and kwargs["fail_on_partial"] is True
    # Deadline from the batches' own expiry (+ margin), and the defer timeout a little longer.
    assert time.time() + 23 * 3600 < kwargs["deadline"] < time.time() + 26 * 3600
    assert deferred.value.timeout.total_seconds() > kwargs["deadline"] - time.time()


def test_triggers_share_one_client_per_connection(fable_emulator_factory, monkeypatch):
    from airflow_provider_fable.hooks import shared_client as module
    from airflow_provider_fable.hooks.shared_client import aclose_shared_clients, shared_client

    monkeypatch.setattr(module, "CONNECTION_TTL", 0.0)  # re-read the connection at every start

    server = fable_emulator_factory()
    point_connection_at(server)

    async def clients():
        first = await asyncio.gather(*(shared_client("fable_default") for _ in range(20)))
        point_connection_at(server, max_retries=5)  # an edited connection gets its own client
        edited = await shared_client("fable_default")
        await aclose_shared_clients()
        return first, edited

    first, edited = asyncio.run(clients())
    assert len({id(c) for c in first}) == 1
    assert edited is not first[0]


def test_poll_headers_match_what_the_sdk_sends():
    import anthropic

    from airflow_provider_fable.hooks.shared_client import request_headers

    kwargs = FableHook("fable_x")._settings_from(
        type(
            "Conn",
            (),
            {"password": "k-123", "host": "http://h:1", "port": None, "extra_dejson": {"workspace_id": "w1"}},
        )()
    )
    kwargs = {
        "api_key": kwargs["api_key"],
        "base_url": kwargs["base_url"],
        "default_headers": {"anthropic-workspace-id": "w1"},
    }
    sdk = anthropic.Anthropic(
        api_key="k-123", base_url="http://h:1", default_headers=kwargs["default_headers"]
    )
    ours = request_headers(kwargs)
    for name in ("Authorization", "anthropic-version", "anthropic-workspace-id"):
        assert ours[name] == sdk.default_headers[name], name


def test_no_slow_callback_under_asyncio_debug(fable_emulator_factory):
    """100 waits in a fresh process under asyncio debug mode, 100 ms slow-callback threshold.

    The process has Airflow's task SDK loaded, as a triggerer has, and nothing else: the waits
    must get their HTTP client, connection and imports without a slow step on the loop, and
    never import the anthropic SDK at all.

    A step's wall time includes the time the OS kept the loop thread waiting for a CPU, which
    on a shared 2-core machine can pass 100 ms with no fault of the code. So each step's
    run-queue delay (Linux ``/proc/thread-self/schedstat``) is subtracted before comparing with
    the threshold: what remains is the loop's own CPU plus any blocking (I/O, sleeps, the GIL
    held by our worker threads), which is what a trigger must not do. Every other asyncio debug
    warning fails the test as it is. Debug mode's own first-time cost (a trivial control
    workload of plain httpx requests shows a ~0.1 s step on this machine) is paid by a control
    run before the waits, and the garbage collector is paused during the waits, so a full
    collection of Airflow's objects (~0.1 s, in any process that imports Airflow) does not land
    in a random step.
    """
    server = fable_emulator_factory(processing_retrieves=3)
    point_connection_at(server)
    ids = create(100, per_batch=1)
    code = r"""
import asyncio, asyncio.events, json, logging, os, sys, time
import airflow.sdk, airflow.triggers.base, airflow.sdk.execution_time.supervisor  # a triggerer's own
from airflow_provider_fable.triggers.batch import FableBatchTrigger
loaded = sorted(m for m in ("anthropic", "httpx2", "airflow_provider_fable.hooks.fable") if m in sys.modules)
assert not loaded, f"the trigger module must stay light, it imported {loaded}"
THRESHOLD = 0.1
SCHED = "/proc/thread-self/schedstat"
def sched():
    try:
        with open(SCHED) as f:
            cpu, delay = f.read().split()[:2]
            return int(cpu) / 1e9, int(delay) / 1e9
    except OSError:
        return 0.0, 0.0
slow, other = [], []
original = asyncio.events.Handle._run
def timed(self):
    t0, (c0, d0) = time.perf_counter(), sched()
    try:
        return original(self)
    finally:
        wall = time.perf_counter() - t0
        if wall >= THRESHOLD:
            c1, d1 = sched()
            own = wall - (d1 - d0)
            if own >= THRESHOLD:
                slow.append(f"{self!r} took {wall:.3f}s: {c1 - c0:.3f}s on a CPU, {d1 - d0:.3f}s waiting for one")
asyncio.events.Handle._run = timed
class Catch(logging.Handler):
    def emit(self, record):
        text = record.getMessage()
        if record.levelno >= logging.WARNING and not (text.startswith("Executing ") and " took " in text):
            other.append(text)
logging.getLogger("asyncio").addHandler(Catch())
async def wait(batch_id):
    async for event in FableBatchTrigger(batch_ids=[batch_id], poll_interval=0.2).run():
        return event.payload["status"]
def light_imports():
    import anyio._backends._asyncio, httpx
async def control(client):
    from airflow.utils.log.logging_mixin import LoggingMixin
    await asyncio.sleep(0.01)
    await client.get(sys.argv[2])
    LoggingMixin().log.info("control request done")  # a triggerer has logged long before
async def main():
    asyncio.get_running_loop().slow_callback_duration = THRESHOLD
    # Debug mode's own first-time costs (capturing stacks with the source lines of every file a
    # callback passes through) show up as a slow step even for a plain httpx request: pay them
    # with a control workload (imports off the loop, as the trigger does) first.
    await asyncio.to_thread(light_imports)
    import httpx
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(control(client) for _ in range(100)))
    # A full garbage collection walks every object Airflow allocated (~0.1 s here), whatever the
    # loop runs; collect now and pause the collector so what is measured is the waits themselves.
    import gc
    gc.collect(); gc.disable()
    await asyncio.sleep(0)  # end this step (the collection above) before the record starts
    slow.clear(); other.clear()
    return await asyncio.gather(*(wait(b) for b in json.loads(sys.argv[1])))
statuses = asyncio.run(main(), debug=True)
print(json.dumps({"statuses": sorted(set(statuses)), "slow": slow, "other": other, "sdk": "anthropic" in sys.modules}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ids), f"{server.base_url}/_emulator/stats"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=os.environ,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["statuses"] == ["success"]
    assert result["sdk"] is False
    assert result["slow"] == [], result["slow"]
    assert result["other"] == [], result["other"]


# ----------------------------------------------------------------------------- coalesced polling
def run_triggers(triggers: list[FableBatchTrigger]) -> tuple[list[dict], dict]:
    """Run triggers together in one loop, as a triggerer does; their payloads and poller stats."""
    from airflow_provider_fable.triggers.poller import batch_poller

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload

    async def main():
        payloads = await asyncio.gather(*(first_event(t) for t in triggers))
        return payloads, dict(batch_poller("fable_default").stats)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("waits", "page_max", "reads_to_end", "pages_per_round"),
    [
        (40, 1000, 3, 1),  # one list call per round serves all 40 waits
        (25, 10, 2, 3),  # pages of 10: three pages per round (after_id cursor)
    ],
)
def test_many_triggers_share_one_list_round(
    fable_emulator_factory, monkeypatch, waits, page_max, reads_to_end, pages_per_round
):
    from airflow_provider_fable.triggers import batch as trigger_module
    from airflow_provider_fable.triggers import poller as poller_module

    monkeypatch.setattr(trigger_module, "START_SPREAD", 0.0)  # all start in the same instant
    monkeypatch.setattr(poller_module, "LIST_PAGE_MAX", page_max)
    server = fable_emulator_factory(processing_retrieves=reads_to_end)
    point_connection_at(server)
    ids = create(waits, per_batch=1)
    payloads, poller = run_triggers([FableBatchTrigger(batch_ids=[b], poll_interval=0.2) for b in ids])
    assert {p["status"] for p in payloads} == {"success"}
    calls = stats(server)["calls"]
    # Each batch ends on its N-th status read: N rounds, each the same list pages for every wait.
    assert poller["rounds"] == reads_to_end
    assert calls["list"] == poller["list_calls"] == reads_to_end * pages_per_round
    assert calls.get("retrieve", 0) == 0
    assert poller["polls"] == waits * reads_to_end and all(p["polls"] == reads_to_end for p in payloads)


def test_batch_missing_from_the_list_falls_back_to_retrieve(fable_emulator_factory, monkeypatch):
    from airflow_provider_fable.triggers import poller as poller_module

    # A one-page budget of 6 batches: the 3 watched (older) batches sit behind 10 newer ones.
    monkeypatch.setattr(poller_module, "LIST_PAGE_MIN", 1)
    monkeypatch.setattr(poller_module, "EXTRA_PAGES", 0)
    server = fable_emulator_factory(processing_retrieves=2)
    point_connection_at(server)
    watched = create(3, per_batch=1)
    create(10, per_batch=1)  # other jobs' batches, newer
    payloads, poller = run_triggers([FableBatchTrigger(batch_ids=watched, poll_interval=0.05)])
    assert payloads[0]["status"] == "success", payloads[0]["message"]
    calls = stats(server)["calls"]
    assert calls["list"] == poller["rounds"] == 2  # one page per round, then the budget is spent
    assert calls["retrieve"] == 3 * 2  # each watched batch retrieved in each round


def test_a_refused_list_endpoint_falls_back_to_retrieves(fable_emulator_factory):
    # A final 4xx on list (a key or host that does not serve it) must not fail the waits.
    server = fable_emulator_factory(
        processing_retrieves=2,
        faults={"http_error_first_n": 100, "http_error_codes": "400", "http_error_endpoints": "list"},
    )
    point_connection_at(server)
    ids = create(4, per_batch=1)
    payloads, poller = run_triggers([FableBatchTrigger(batch_ids=ids, poll_interval=0.05)])
    assert payloads[0]["status"] == "success", payloads[0]["message"]
    calls = stats(server)["calls"]
    assert calls["list"] == 1 and calls["retrieve"] == 4 * 2  # listing tried once, then retrieves


def test_console_link_uses_the_documented_batches_page():
    from airflow_provider_fable.links import console_url

    page = "https://platform.claude.com/settings/workspaces/default/batches"
    assert console_url(["msgbatch_a", "msgbatch_b"]) == page
    assert console_url(["msgbatch_a"]) == page + "#msgbatch_a"


def test_one_wait_on_one_batch_only_retrieves(fable_emulator_factory):
    server = fable_emulator_factory(processing_retrieves=2)
    point_connection_at(server)
    payload = run_trigger(FableBatchTrigger(batch_ids=create(1), poll_interval=0.02))
    assert payload["status"] == "success"
    calls = stats(server)["calls"]
    assert calls.get("list", 0) == 0 and calls["retrieve"] == 2


# ----------------------------------------------------------------------------- one-task operator
def test_batch_operator_submits_defers_and_returns_the_manifest(fable_emulator_factory):
    """Submit + deferred wait in one task; the resume gets the submit manifest back."""
    from airflow_provider_fable._compat import TaskDeferred
    from airflow_provider_fable.operators.batch import FableBatchOperator
    from tests.conftest import Paint

    server = fable_emulator_factory(processing_retrieves=3)
    point_connection_at(server)
    op = FableBatchOperator(
        task_id="batch",
        prompt_template="Paint for {id}: {text}",
        output_model=Paint,
        records=[{"id": f"p{i}", "text": "red fence"} for i in range(5)],
        max_requests_per_batch=2,
        poll_interval=0.1,
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.method_name == "execute_complete"
    manifest = deferred.value.kwargs["manifest"]
    assert manifest["request_count"] == 5 and len(manifest["batch_ids"]) == 3
    assert op.operator_extra_links[0].get_link(op, ti_key=None).endswith("/batches")  # 3 batches: list page
    payload = run_trigger(deferred.value.trigger)
    result = op.execute_complete({}, event=payload, **deferred.value.kwargs)
    assert (
        result["batch_ids"] == manifest["batch_ids"]
        and result["job_fingerprint"] == manifest["job_fingerprint"]
    )
    assert result["waited_in"] == "trigger" and result["outcome"] == "ended"
    assert sum(b["request_counts"]["succeeded"] for b in result["batches"]) == 5


def test_batch_operator_retry_reattaches_instead_of_paying_again(fable_emulator_factory):
    """A retry of the one-task form after its batches exist waits on them again, creating none.

    The submit half goes through the job ledger like the three-task form, so a second try with
    the same job and records adopts the first try's batches (the wait is simply deferred again).
    """
    import json
    import urllib.request

    from airflow_provider_fable._compat import TaskDeferred
    from airflow_provider_fable.operators.batch import FableBatchOperator
    from tests.conftest import Paint

    server = fable_emulator_factory(processing_retrieves=50)  # still running at the retry
    point_connection_at(server)

    def make_op() -> FableBatchOperator:
        return FableBatchOperator(
            task_id="batch_retry",
            prompt_template="Paint for {id}: {text}",
            output_model=Paint,
            records=[{"id": f"r{i}", "text": "blue shed"} for i in range(5)],
            max_requests_per_batch=2,
            poll_interval=0.1,
        )

    def created() -> int:
        with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
            return json.load(resp)["batches_created"]

    with pytest.raises(TaskDeferred) as first:
        make_op().execute({})
    assert created() == 3
    with pytest.raises(TaskDeferred) as second:  # try 2: a fresh operator object, as on a worker
        make_op().execute({})
    assert created() == 3
    assert second.value.kwargs["manifest"]["batch_ids"] == first.value.kwargs["manifest"]["batch_ids"]

"""How the end of a large batch is shared out: worker processes by default, jobs shipped packed
by prompt shape, large batches answered one after the other (bench/emulator_throughput.py times
it; these tests hold what must not change while it gets faster)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import threading
from typing import Any

import anthropic
import pytest

from airflow_provider_fable.emulator import EmulatorSettings, FaultSettings
from airflow_provider_fable.emulator import model as emulator_model
from airflow_provider_fable.emulator.state import BatchStore, ResultsFile, parse_create_body

from .helpers import text_params
from .test_throughput_paths import _requests


def _ended_jobs(store: BatchStore, requests: list[dict[str, Any]]) -> list[Any]:
    """The jobs a batch's end hands to the generation (captured instead of answered)."""
    feeds: list[Any] = []
    handed = threading.Event()

    def capture(results: ResultsFile, jobs: Any, chunk: int = 500) -> None:
        feeds.append(jobs)  # read below, once the end has decided every request
        handed.set()

    store._generate = capture  # type: ignore[method-assign]
    store._queue_generation = capture  # type: ignore[method-assign]
    batch = store.create(parse_create_body(json.dumps({"requests": requests}).encode()), "http://e/")
    store.retrieve(batch["id"], "http://e/")
    assert handed.wait(30), "the batch end handed nothing to the generation"
    (feed,) = feeds
    return [job for part in feed.parts(len(requests)) for job in part]


def test_packed_jobs_rebuild_the_same_requests_and_answers() -> None:
    faults = FaultSettings(seed=3, errored_rate=0.1, invalid_answer_rate=0.2)
    jobs = _ended_jobs(BatchStore(EmulatorSettings(faults=faults, generation_workers=0)), _requests(90))
    answered = [job for job in jobs if isinstance(job, emulator_model.AnswerJob)]
    assert answered and len(answered) < len(jobs)  # ready lines (errored) travel too
    whole = jobs.index(answered[5])
    jobs[whole] = dataclasses.replace(answered[5], shared=None)  # its prompt not looked up: sent whole
    packed = emulator_model.pack_jobs(jobs)
    _, shapes, rows = packed
    assert len(shapes) == 3  # structured output, forced tool, free text: each prompt shape once
    assert sum(type(row) is tuple for row in rows) == len(answered) - 1
    unpacked = emulator_model.unpack_jobs(pickle.loads(pickle.dumps(packed)))
    assert len(unpacked) == len(jobs)
    for before, after in zip(jobs, unpacked, strict=True):
        if not isinstance(before, emulator_model.AnswerJob):
            assert after == before
            continue
        assert after == before  # every field but the local shared-prompt reference
        assert list(after.params) == list(before.params)  # keys in the request's own order
    assert emulator_model.answer_packed(packed, 0.2, 0.2) == emulator_model.answer_lines(jobs, 0.2, 0.2)


def test_a_batch_end_ships_requests_of_distinct_but_equal_prompts_as_one_shape() -> None:
    """Small creates are not made to share objects: requests of one prompt are equal, not
    identical; the shape is still sent once (keyed by the shared prompt, which is by JSON)."""
    requests = [
        {"custom_id": f"r{i}", "params": text_params(f"record {i}", system="Be brief.")} for i in range(40)
    ]
    jobs = _ended_jobs(BatchStore(EmulatorSettings(generation_workers=0)), requests)
    _, shapes, rows = emulator_model.pack_jobs(jobs)
    assert len(shapes) == 1 and all(type(row) is tuple for row in rows)


def test_equal_short_values_are_recognised_without_a_json_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model name and max_tokens are not made one object by a create; the identity check
    must still recognise the next request's shared part (no JSON key built per request)."""
    schema = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    config = {"format": {"type": "json_schema", "schema": schema}}
    first = {"model": "claude-" + "fable-5", "max_tokens": 1000 + 24, "output_config": config,
             "messages": [{"role": "user", "content": "a"}]}  # fmt: skip
    second = {"model": "-".join(["claude", "fable", "5"]), "max_tokens": int("1024"), "output_config": config,
              "messages": [{"role": "user", "content": "b"}]}  # fmt: skip
    assert first["model"] is not second["model"] and first["max_tokens"] is not second["max_tokens"]
    plan = emulator_model.shared_prompt(first)
    assert plan is not None

    def no_key(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("the JSON key was built again")

    monkeypatch.setattr(emulator_model.orjson, "dumps", no_key)
    assert emulator_model.shared_prompt(second) is plan
    monkeypatch.undo()
    # A float is never taken as equal by value (-0.0 and 0.0 differ in JSON): keyed again.
    third = {**second, "temperature": 0.0}
    fourth = {**second, "temperature": -0.0}
    assert emulator_model.shared_prompt(third) is not emulator_model.shared_prompt(fourth)


@pytest.mark.parametrize(
    "last",
    [
        {"role": "user", "content": "a record"},
        {"role": "user", "content": [{"type": "text", "text": "a record"}, {"type": "text", "text": "more"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "user", "content": {"type": "text", "text": "odd"}},
        {"role": "user"},
    ],
    ids=["string", "blocks", "cache-breakpoint", "object", "no-content"],
)
def test_accounting_a_record_on_the_shared_tally_counts_as_a_full_tally(last: dict[str, Any]) -> None:
    system = [{"type": "text", "text": "Long instructions. " * 200, "cache_control": {"type": "ephemeral"}}]
    params = {**text_params("x", system=system), "messages": [last]}
    emulator_model.account_prompt({**params, "messages": [{"role": "user", "content": "warm"}]})
    fast = emulator_model.account_prompt(params)  # the shared tally plus this record
    tally = emulator_model._tally_prompt(params, params["messages"])
    full = emulator_model.PromptAccounting(
        tally.total + emulator_model._schema_tokens(params), tally.prefix_tokens, tally.prefix_key, tally.ttl
    )
    assert fast == full
    assert fast.cache_key is not None


def test_the_default_is_one_worker_per_cpu_and_zero_keeps_the_thread() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert BatchStore(EmulatorSettings()).generation_workers == (min(cpus, 4) if cpus >= 2 else 0)
    assert BatchStore(EmulatorSettings(generation_workers=0)).generation_workers == 0
    assert BatchStore(EmulatorSettings(generation_workers=3)).generation_workers == 3


def test_large_batches_are_answered_one_after_the_other_in_end_order() -> None:
    """Batches that end together are answered in end order, each to its last line before the
    next starts (so the first download completes first); small ones keep their own thread."""
    events: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    class Recording(BatchStore):
        def _generate(self, results: ResultsFile, jobs: list[Any], chunk: int = 500) -> None:
            with lock:
                events.append(("start", results.total, threading.current_thread().name))
            super()._generate(results, jobs, chunk)
            with lock:
                events.append(("end", results.total, threading.current_thread().name))

    store = Recording(EmulatorSettings(generation_workers=0, generation_min_batch=20))
    sizes = [30, 25, 21]
    ids = []
    for n, size in enumerate(sizes):
        requests = [{"custom_id": f"b{n}r{i}", "params": text_params(f"ticket {i}")} for i in range(size)]
        ids.append(
            store.create(parse_create_body(json.dumps({"requests": requests}).encode()), "http://e/")["id"]
        )
    small = [{"custom_id": f"s{i}", "params": text_params(f"note {i}")} for i in range(3)]
    small_id = store.create(parse_create_body(json.dumps({"requests": small}).encode()), "http://e/")["id"]
    for batch_id in [*ids, small_id]:
        store.retrieve(batch_id, "http://e/")  # ends each batch (processing_seconds=0)
    for batch_id in [*ids, small_id]:
        lines = b"".join(store.open_results(batch_id).chunks())
        assert lines.count(b"\n") == store.retrieve(batch_id, "http://e/")["request_counts"]["succeeded"]
    large = [(kind, total) for kind, total, name in events if name == "results-queue"]
    assert large == [("start", 30), ("end", 30), ("start", 25), ("end", 25), ("start", 21), ("end", 21)]
    assert [name for kind, total, name in events if total == 3] == [f"results-{small_id}"] * 2
    store.close()


def test_an_http_batch_answered_by_the_default_workers_is_complete() -> None:
    """The default settings on a large batch: worker processes answer it, every line arrives."""
    from airflow_provider_fable.emulator import EmulatorServer

    from .helpers import API_KEY

    settings = EmulatorSettings(generation_min_batch=50)
    with EmulatorServer(settings) as server:
        client = anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url)
        requests = _requests(120)
        batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
        results = list(client.messages.batches.results(batch.id))
    assert sorted(r.custom_id for r in results) == sorted(r["custom_id"] for r in requests)
    assert all(r.result.type == "succeeded" for r in results)


def test_results_come_window_by_window_shuffled_within_each() -> None:
    """2,500 requests: lines 1-1,000 answer requests 1-1,000 (not in their order), and so on;
    the same order at every download."""
    from airflow_provider_fable.emulator.state import _ORDER_WINDOW

    store = BatchStore(EmulatorSettings(generation_workers=0))
    n = 2 * _ORDER_WINDOW + 500
    requests = [{"custom_id": f"r{i}", "params": text_params(f"record {i}")} for i in range(n)]
    batch = store.create(parse_create_body(json.dumps({"requests": requests}).encode()), "http://e/")
    store.retrieve(batch["id"], "http://e/")
    served = [
        json.loads(line)["custom_id"]
        for line in b"".join(store.open_results(batch["id"]).chunks()).splitlines()
    ]
    again = [
        json.loads(line)["custom_id"]
        for line in b"".join(store.open_results(batch["id"]).chunks()).splitlines()
    ]
    assert served == again
    for start in range(0, n, _ORDER_WINDOW):
        window = served[start : start + _ORDER_WINDOW]
        expected = [f"r{i}" for i in range(start, min(start + _ORDER_WINDOW, n))]
        assert sorted(window) == sorted(expected)
        assert window != expected
    store.close()


def test_the_feed_hands_over_decided_jobs_before_the_end_is_done() -> None:
    from airflow_provider_fable.emulator.state import _JobFeed

    feed = _JobFeed()
    parts = feed.parts(2)
    feed.put([b"a", b"b", b"c"])
    assert next(parts) == [b"a", b"b"]  # without waiting for the rest of the batch
    feed.close()
    assert next(parts) == [b"c"]
    assert next(parts, None) is None
    failed = _JobFeed()
    failed.put([b"x"])
    failed.close(ValueError("boom"))
    with pytest.raises(RuntimeError, match="batch end failed"):
        list(failed.parts(5))

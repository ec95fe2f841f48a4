"""FableHook against the emulator through the real anthropic SDK over HTTP."""

from __future__ import annotations

import json
import urllib.request

import pytest

from airflow_provider_fable.core.job import BatchJob
from airflow_provider_fable.core.requests import build_requests
from airflow_provider_fable.hooks.fable import (
    BatchCreateUncertainError,
    FableApiError,
    FableConfigError,
    FableHook,
    ResultsIncompleteError,
)
from airflow_provider_fable.testing.plugin import TEST_API_KEY, point_connection_at
from tests.conftest import Paint

JOB = BatchJob(prompt_template="Paint for {id}: {text}", output_model=Paint, system_prompt="Pick paint.")


def requests_for(n: int, prefix: str = "r") -> list[dict]:
    records = [
        {"id": f"{prefix}{i}", "text": f"the {['red', 'green', 'blue'][i % 3]} shed, glossy"}
        for i in range(n)
    ]
    return list(build_requests(JOB, records))


@pytest.fixture
def hook(fable_connection):
    return FableHook()


def test_create_retrieve_results_roundtrip(hook):
    batch = hook.create_batch(requests_for(6))
    assert batch.id.startswith("msgbatch_")
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 6
    ended = hook.retrieve_batch(batch.id)
    assert ended.processing_status == "ended"
    lines = list(hook.iter_result_lines(batch.id))
    assert len(lines) == 6
    results = list(hook.iter_results(batch.id))
    assert sorted(r.custom_id for r in results) == sorted(f"r{i}" for i in range(6))
    assert all(r.type == "succeeded" for r in results)
    answer = Paint.model_validate_json(results[0].text)
    assert answer.color.value in ("red", "green", "blue")
    assert results[0].usage.input_tokens > 0


def test_list_walks_every_page_newest_first(hook):
    made = [hook.create_batch(requests_for(1, prefix=f"p{i}_")).id for i in range(5)]
    listed = [b.id for b in hook.list_batches(limit=2)]
    positions = [listed.index(b) for b in made]
    assert positions == sorted(positions, reverse=True), "newest first"
    older = [b.id for b in hook.list_batches(limit=2, after_id=made[-1])]
    assert made[-2] in older and made[-1] not in older
    newer = [b.id for b in hook.list_batches(limit=2, before_id=made[0])]
    assert made[1] in newer and made[0] not in newer


def test_cancel_then_delete(fable_emulator_factory, monkeypatch):
    server = fable_emulator_factory(processing_seconds=30, cancel_seconds=0.0)
    point_connection_at(server)
    hook = FableHook()
    batch = hook.create_batch(requests_for(3))
    with pytest.raises(FableApiError, match="HTTP 400"):
        hook.delete_batch(batch.id)  # still in progress
    canceled = hook.cancel_batch(batch.id)
    assert canceled.processing_status in ("canceling", "ended")
    ended = hook.retrieve_batch(batch.id)
    assert ended.processing_status == "ended"
    assert ended.request_counts.canceled == 3
    assert {r.type for r in hook.iter_results(batch.id)} == {"canceled"}
    assert hook.delete_batch(batch.id) == batch.id
    with pytest.raises(FableApiError, match="HTTP 404"):
        hook.retrieve_batch(batch.id)


def test_count_tokens_grows_with_input(hook):
    small, big = requests_for(1)[0]["params"], json.loads(json.dumps(requests_for(1)[0]["params"]))
    big["messages"][-1]["content"] += " lorem ipsum" * 200
    assert 0 < hook.count_tokens(small) < hook.count_tokens(big)


def test_missing_key_is_a_config_error(monkeypatch, fable_emulator):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FABLE_NOKEY", json.dumps({"conn_type": "fable", "host": fable_emulator.base_url})
    )
    with pytest.raises(FableConfigError, match="password field"):
        FableHook("fable_nokey").retrieve_batch("msgbatch_x")


def test_wrong_key_fails_with_hint_and_never_echoes_the_key(fable_emulator_factory, monkeypatch):
    server = fable_emulator_factory(api_key="the-right-key")
    secret = "fake-wrong-key-but-still-secret-0123456789"
    monkeypatch.setenv(
        "AIRFLOW_CONN_FABLE_BADKEY",
        json.dumps({"conn_type": "fable", "host": server.base_url, "password": secret}),
    )
    hook = FableHook("fable_badkey")
    with pytest.raises(FableApiError) as info:
        hook.create_batch(requests_for(1))
    assert info.value.status_code == 401
    assert "API key" in str(info.value)
    assert secret not in str(info.value)
    ok, message = hook.test_connection()
    assert not ok and secret not in message


def test_environment_credentials_do_not_leak_in(hook, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-key-must-not-be-used")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    fresh = FableHook()
    assert fresh.client.api_key == TEST_API_KEY
    assert fresh.test_connection()[0]


def test_sdk_retries_transient_429_on_create(fable_emulator_factory):
    server = fable_emulator_factory(
        faults={
            "http_error_first_n": 2,
            "http_error_codes": [429],
            "http_error_endpoints": ["create"],
            "retry_after_ms": 10,
        }
    )
    point_connection_at(server, max_retries=3)
    hook = FableHook()
    batch = hook.create_batch(requests_for(2))
    listed = [b.id for b in hook.list_batches()]
    assert listed == [batch.id], "a rejected attempt must not have created a batch"


def test_results_download_resumes_after_a_cut(fable_emulator_factory):
    server = fable_emulator_factory(faults={"cut_results_after": 4, "cut_results_times": 2})
    point_connection_at(server)
    hook = FableHook()
    batch = hook.create_batch(requests_for(10))
    ids = [json.loads(line)["custom_id"] for line in hook.iter_result_lines(batch.id)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))


def test_results_before_end_say_what_to_do(fable_emulator_factory):
    server = fable_emulator_factory(processing_seconds=30)
    point_connection_at(server)
    hook = FableHook()
    batch = hook.create_batch(requests_for(1))
    with pytest.raises(FableApiError, match="FableBatchSensor"):
        list(hook.iter_result_lines(batch.id))


def test_connection_extras_configure_client(fable_emulator, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_FABLE_TUNED",
        json.dumps(
            {
                "conn_type": "fable",
                "host": fable_emulator.base_url,
                "password": "k",
                "extra": {"timeout": "12.5", "max_retries": "4", "default_model": "claude-haiku-4-5"},
            }
        ),
    )
    hook = FableHook("fable_tuned")
    assert hook.client.max_retries == 4
    # `timeout` is the read timeout of a call; connecting keeps a short limit (issue #6 item 8).
    assert hook.client.timeout.read == 12.5
    assert hook.client.timeout.connect == 5.0
    assert hook.default_model == "claude-haiku-4-5"


async def test_async_endpoints(fable_connection):
    hook = FableHook()
    try:
        batch = await hook.acreate_batch(requests_for(3, prefix="a"))
        got = await hook.aretrieve_batch(batch.id)
        assert got.id == batch.id
        assert batch.id in [b.id async for b in hook.alist_batches(limit=1)]
        results = [r async for r in hook.aiter_results(batch.id)]
        assert sorted(r.custom_id for r in results) == ["a0", "a1", "a2"]
        assert await hook.acount_tokens(requests_for(1)[0]["params"]) > 0
        assert await hook.adelete_batch(batch.id) == batch.id
        other = await hook.acreate_batch(requests_for(1, prefix="c"))
        assert (await hook.acancel_batch(other.id)).id == other.id
    finally:
        await hook.aclose()


def test_ambiguous_create_failure_is_not_retried(fable_emulator_factory):
    """A 500 on create may hide a created batch: one attempt only, and an error that says so."""
    server = fable_emulator_factory(
        faults={
            "http_error_first_n": 1,
            "http_error_codes": [500],
            "http_error_endpoints": ["create"],
            "retry_after_ms": 10,
        }
    )
    point_connection_at(server, max_retries=3)
    with pytest.raises(BatchCreateUncertainError, match="may or may not have been created") as info:
        FableHook().create_batch(requests_for(2))
    assert info.value.status_code == 500
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        assert json.load(resp)["calls"]["create"] == 1


async def test_async_create_follows_the_same_retry_rule(fable_emulator_factory):
    server = fable_emulator_factory(
        faults={
            "http_error_first_n": 2,
            "http_error_codes": [429, 500],
            "http_error_endpoints": ["create"],
            "retry_after_ms": 10,
        }
    )
    point_connection_at(server, max_retries=3)
    hook = FableHook()
    try:
        # Call 1 gets 429 (refused: retried), call 2 gets 500 (ambiguous: not retried).
        with pytest.raises(BatchCreateUncertainError) as info:
            await hook.acreate_batch(requests_for(1))
        assert info.value.status_code == 500
        batch = await hook.acreate_batch(requests_for(1))  # faults used up: a clean create
        assert batch.id.startswith("msgbatch_")
    finally:
        await hook.aclose()
    with urllib.request.urlopen(f"{server.base_url}/_emulator/stats") as resp:
        assert json.load(resp)["calls"]["create"] == 3


def test_a_clean_but_short_results_file_is_incomplete():
    """A body that ends on a line boundary but short of the request count is not the whole file."""
    from types import SimpleNamespace

    from airflow_provider_fable.hooks.fable import _ResumableLines

    counts = SimpleNamespace(succeeded=3, errored=1, canceled=0, expired=1, processing=0)
    lines = _ResumableLines(SimpleNamespace(id="msgbatch_x", results_url="u", request_counts=counts))
    got = lines.feed(b'{"a": 1}\n{"a": 2}\n{"a"') + lines.feed(b": 3}\n")
    got += lines.finish()
    assert len(got) == 3
    with pytest.raises(ResultsIncompleteError, match="3 of 5 lines"):
        lines.check_complete()
    lines.restart()  # a second download hands out only what is new
    again = lines.feed(b'{"a": 1}\n{"a": 2}\n{"a": 3}\n{"a": 4}\n{"a": 5}')
    again += lines.finish()
    lines.check_complete()
    assert again == [b'{"a": 4}', b'{"a": 5}']


def test_short_results_file_is_detected(fable_emulator_factory):
    # The cut fault drops the connection; with every download cut, the hook gives up loudly.
    server = fable_emulator_factory(faults={"cut_results_after": 3, "cut_results_times": 5})
    point_connection_at(server)
    hook = FableHook()
    batch = hook.create_batch(requests_for(8))
    got = []
    with pytest.raises(ResultsIncompleteError, match="3 of 8 lines"):
        for line in hook.iter_result_lines(batch.id, max_attempts=2):
            got.append(line)
    assert len(got) == 3, "what was read before giving up was handed out once"


def test_hook_repr_and_errors_never_carry_the_key(hook):
    hook.retrieve_batch(hook.create_batch(requests_for(1)).id)  # settings and client are loaded now
    assert TEST_API_KEY not in repr(hook)
    with pytest.raises(FableApiError) as info:
        hook.retrieve_batch("msgbatch_missing")
    assert TEST_API_KEY not in str(info.value)


def test_results_status_read_tolerates_transient_errors_like_the_sensor(fable_emulator_factory, monkeypatch):
    """Issue 6 item 9: a 5xx streak on the status read before a download no longer fails the load."""
    server = fable_emulator_factory(
        faults={
            "http_error_first_n": 3,
            "http_error_codes": [500, 503, 529],
            "http_error_endpoints": ["retrieve"],
        }
    )
    point_connection_at(server, max_retries=0)
    monkeypatch.setattr(FableHook, "results_status_backoff", 0.01)
    hook = FableHook()
    batch = hook.create_batch(requests_for(4))
    ids = sorted(json.loads(line)["custom_id"] for line in hook.iter_result_lines(batch.id))
    assert ids == [f"r{i}" for i in range(4)]


def test_results_status_read_gives_up_on_a_final_error(fable_emulator_factory, monkeypatch):
    server = fable_emulator_factory(
        faults={"http_error_first_n": 10, "http_error_codes": [500], "http_error_endpoints": ["retrieve"]}
    )
    point_connection_at(server, max_retries=0)
    monkeypatch.setattr(FableHook, "results_status_backoff", 0.01)
    monkeypatch.setattr(FableHook, "results_status_attempts", 3)
    hook = FableHook()
    batch = hook.create_batch(requests_for(2))
    with pytest.raises(FableApiError, match="500|server"):
        list(hook.iter_result_lines(batch.id))


async def test_async_results_status_read_tolerates_transient_errors(fable_emulator_factory, monkeypatch):
    server = fable_emulator_factory(
        faults={"http_error_first_n": 2, "http_error_codes": [502], "http_error_endpoints": ["retrieve"]}
    )
    point_connection_at(server, max_retries=0)
    monkeypatch.setattr(FableHook, "results_status_backoff", 0.01)
    hook = FableHook()
    batch = hook.create_batch(requests_for(3))
    ids = sorted([json.loads(line)["custom_id"] async for line in hook.aiter_result_lines(batch.id)])
    assert ids == [f"r{i}" for i in range(3)]


def test_resumable_lines_feed_hands_out_each_line_once_whatever_the_chunks():
    """``_ResumableLines.feed`` works per chunk (issue #19): across random chunk boundaries,
    blank lines and downloads restarted part-way, the lines handed out are those of the
    per-line rule it replaced (skip blank lines, skip the ones an earlier attempt handed out)."""
    import random
    from types import SimpleNamespace

    from airflow_provider_fable.hooks.fable import _ResumableLines

    rng = random.Random(7)
    body = b"".join(
        rng.choice([b"\n", b"  \n", b"\t\r\n"]) if rng.random() < 0.1 else b'{"i": %d}\n' % i
        for i in range(400)
    )
    expected = [line for line in body.split(b"\n") if line.strip()]
    counts = SimpleNamespace(succeeded=len(expected), errored=0, canceled=0, expired=0, processing=0)
    for _ in range(20):
        lines = _ResumableLines(SimpleNamespace(id="msgbatch_x", results_url="u", request_counts=counts))
        got: list[bytes] = []
        for _attempt in range(3):  # two downloads broken off at random points, then a whole one
            lines.restart()
            cut = rng.randrange(len(body) + 1) if _attempt < 2 else len(body)
            at = 0
            while at < cut:
                step = rng.randrange(1, 64)
                got += lines.feed(body[at : min(cut, at + step)])
                at += step
        got += lines.finish()
        assert got == expected

"""The Message Batches endpoints through the official SDK (instant mode: processing_seconds=0)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorServer

from .helpers import API_KEY, stats, text_params

BATCH_ID_RE = re.compile(r"^msgbatch_[A-Za-z0-9]{24,}$")


def _requests(n: int, text: str = "My invoice {i} is wrong. Please fix it.") -> list[dict[str, Any]]:
    return [{"custom_id": f"req-{i}", "params": text_params(text.format(i=i))} for i in range(n)]


def test_create_returns_an_in_progress_batch(client: anthropic.Anthropic) -> None:
    raw = client.messages.batches.with_raw_response.create(requests=_requests(3))
    batch = raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    assert BATCH_ID_RE.match(batch.id)
    assert batch.type == "message_batch"
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.model_dump() == {
        "processing": 3,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert batch.ended_at is None and batch.results_url is None and batch.cancel_initiated_at is None
    assert batch.archived_at is None
    assert batch.expires_at - batch.created_at == timedelta(hours=24)


def test_instant_mode_ends_on_first_retrieve(client: anthropic.Anthropic, emulator: EmulatorServer) -> None:
    created = client.messages.batches.create(requests=_requests(4))
    batch = client.messages.batches.retrieve(created.id)
    assert batch.processing_status == "ended"
    assert batch.request_counts.succeeded == 4 and batch.request_counts.processing == 0
    assert batch.ended_at is not None and batch.ended_at >= batch.created_at
    assert batch.results_url == f"{emulator.base_url}/v1/messages/batches/{batch.id}/results"


def test_results_cover_every_request_but_not_in_request_order(client: anthropic.Anthropic) -> None:
    requests = _requests(12)
    batch = client.messages.batches.create(requests=requests)
    client.messages.batches.retrieve(batch.id)
    got = [r.custom_id for r in client.messages.batches.results(batch.id)]
    sent = [r["custom_id"] for r in requests]
    assert sorted(got) == sorted(sent)
    assert got != sent
    # Deterministic: a second download has the same order.
    assert [r.custom_id for r in client.messages.batches.results(batch.id)] == got


def test_results_are_jsonl_with_the_api_shapes(client: anthropic.Anthropic, http: httpx.Client) -> None:
    batch = client.messages.batches.create(requests=_requests(2))
    url = client.messages.batches.retrieve(batch.id).results_url
    assert url is not None
    response = http.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/binary")
    lines = response.content.decode().splitlines()
    assert len(lines) == 2
    line = json.loads(lines[0])
    assert set(line) == {"custom_id", "result"}
    assert line["result"]["type"] == "succeeded"
    message = line["result"]["message"]
    assert message["id"].startswith("msg_")
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "claude-fable-5"
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert message["content"][0]["type"] == "text"
    usage = message["usage"]
    assert usage["service_tier"] == "batch"
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["cache_creation_input_tokens"] == 0 and usage["cache_read_input_tokens"] == 0


def test_free_text_answers_are_extractive_and_deterministic(client: anthropic.Anthropic) -> None:
    text = "Classify this ticket.\n\nThe export button does nothing when I click it. I tried twice. Help!"
    batch = client.messages.batches.create(
        requests=[{"custom_id": cid, "params": text_params(text)} for cid in ("a", "b")]
    )
    client.messages.batches.retrieve(batch.id)
    answers = {
        r.custom_id: r.result.message.content[0].text for r in client.messages.batches.results(batch.id)
    }
    assert answers["a"] == answers["b"]
    assert answers["a"].startswith("The export button does nothing when I click it.")
    assert "Classify" not in answers["a"]


def test_bad_params_become_errored_results(client: anthropic.Anthropic) -> None:
    good = text_params("hello there")
    requests = [
        {"custom_id": "no-model", "params": {k: v for k, v in good.items() if k != "model"}},
        {"custom_id": "no-max-tokens", "params": {k: v for k, v in good.items() if k != "max_tokens"}},
        {"custom_id": "no-messages", "params": {k: v for k, v in good.items() if k != "messages"}},
        {"custom_id": "fine", "params": good},
    ]
    batch = client.messages.batches.create(requests=requests)
    assert batch.request_counts.processing == 4  # accepted: params are checked asynchronously
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.request_counts.errored == 3 and ended.request_counts.succeeded == 1
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    for custom_id, field in [
        ("no-model", "model"),
        ("no-max-tokens", "max_tokens"),
        ("no-messages", "messages"),
    ]:
        result = results[custom_id]
        assert result.type == "errored"
        assert result.error.type == "error"
        assert result.error.error.type == "invalid_request_error"
        assert result.error.error.message.startswith(f"{field}:")
    assert results["fine"].type == "succeeded"


@pytest.mark.parametrize(
    ("requests", "expected"),
    [
        pytest.param([], "at least 1 item", id="empty"),
        pytest.param(
            [{"custom_id": "ok", "params": {}}, {"custom_id": "x" * 65, "params": {}}],
            "requests.1.custom_id",
            id="65-char-custom-id",
        ),
        pytest.param(
            [{"custom_id": "has space", "params": {}}],
            "requests.0.custom_id",
            id="bad-characters",
        ),
        pytest.param(
            [
                {"custom_id": "a", "params": {}},
                {"custom_id": "b", "params": {}},
                {"custom_id": "a", "params": {}},
            ],
            "requests.2.custom_id: duplicate custom_id 'a'",
            id="duplicate",
        ),
        pytest.param([{"custom_id": "a", "params": "nope"}], "requests.0.params", id="params-not-object"),
        pytest.param([{"params": {}}], "requests.0.custom_id: Field required", id="missing-custom-id"),
    ],
)
def test_create_validation(client: anthropic.Anthropic, requests: list[Any], expected: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=requests)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert expected in body["error"]["message"]
    assert body["request_id"] == info.value.request_id


def test_custom_id_rule_is_named(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.batches.create(requests=[{"custom_id": "y" * 65, "params": {}}])
    message = info.value.body["error"]["message"]  # type: ignore[index]
    assert "65 characters" in message and "^[a-zA-Z0-9_-]{1,64}$" in message


def _cheap_body(n: int, params: str = "{}") -> bytes:
    """A create body with ``n`` requests, built as bytes (no per-request dicts)."""
    items = ",".join(f'{{"custom_id":"q{i}","params":{params}}}' for i in range(n))
    return f'{{"requests":[{items}]}}'.encode()


def test_more_than_100000_requests_is_rejected(http: httpx.Client) -> None:
    response = http.post("/v1/messages/batches", content=_cheap_body(100_001))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "at most 100000" in error["message"]


def test_100000_requests_are_accepted_and_streamed(http: httpx.Client) -> None:
    response = http.post("/v1/messages/batches", content=_cheap_body(100_000))
    assert response.status_code == 200
    batch = response.json()
    assert batch["request_counts"]["processing"] == 100_000
    ended = http.get(f"/v1/messages/batches/{batch['id']}").json()
    assert ended["request_counts"]["errored"] == 100_000  # empty params: errored at the end
    lines = 0
    with http.stream("GET", ended["results_url"]) as stream:
        for line in stream.iter_lines():
            lines += 1
            if lines == 1:
                assert json.loads(line)["result"]["error"]["error"]["type"] == "invalid_request_error"
    assert lines == 100_000


def test_retrieve_unknown_batch_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.batches.retrieve("msgbatch_01doesnotexist000000000")
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_delete_ended_batch(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=_requests(1))
    client.messages.batches.retrieve(batch.id)
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in client.messages.batches.list(limit=1000).data]


def test_cancel_of_ended_batch_returns_it_unchanged(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=_requests(2))
    ended = client.messages.batches.retrieve(batch.id)
    canceled = client.messages.batches.cancel(batch.id)
    assert canceled.processing_status == "ended"
    assert canceled.cancel_initiated_at is None
    assert canceled.request_counts == ended.request_counts


def test_list_pages_towards_older_batches_with_after_id(client: anthropic.Anthropic) -> None:
    ids = [client.messages.batches.create(requests=_requests(1)).id for _ in range(5)]
    newest_first = ids[::-1]
    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2]
    assert page.has_more is True
    assert page.first_id == newest_first[0] and page.last_id == newest_first[1]

    older = client.messages.batches.list(limit=2, after_id=page.last_id)
    assert [b.id for b in older.data] == newest_first[2:4]

    everything = client.messages.batches.list(limit=1000)
    assert everything.has_more is False
    walked = [b.id for b in client.messages.batches.list(limit=2)]  # SDK auto-pagination
    assert walked == [b.id for b in everything.data]
    assert walked[:5] == newest_first
    assert len(walked) == len(set(walked))


def test_list_pages_towards_newer_batches_with_before_id(client: anthropic.Anthropic) -> None:
    ids = [client.messages.batches.create(requests=_requests(1)).id for _ in range(5)]  # oldest first
    page = client.messages.batches.list(limit=2, before_id=ids[1])
    assert [b.id for b in page.data] == [ids[3], ids[2]]  # the two right above the cursor
    assert page.has_more is True
    assert page.first_id == ids[3] and page.last_id == ids[2]

    walked = [b.id for b in client.messages.batches.list(limit=2, before_id=ids[0])]
    assert walked == [ids[2], ids[1], ids[4], ids[3]]

    top = client.messages.batches.list(limit=2, before_id=ids[3])
    assert [b.id for b in top.data] == [ids[4]] and top.has_more is False


def test_list_of_nothing_has_null_ids(client: anthropic.Anthropic) -> None:
    newest = client.messages.batches.create(requests=_requests(1)).id
    page = client.messages.batches.list(before_id=newest)
    assert page.data == [] and page.has_more is False
    assert page.first_id is None and page.last_id is None


@pytest.mark.parametrize("limit", ["0", "1001", "abc"])
def test_list_limit_is_validated(http: httpx.Client, limit: str) -> None:
    response = http.get("/v1/messages/batches", params={"limit": limit})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_count_tokens_matches_usage_of_the_same_request(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model="claude-fable-5", messages=[{"role": "user", "content": "hi"}])
    params = text_params("A considerably longer question about my invoice and the charges on it. " * 5)
    counted = client.messages.count_tokens(model=params["model"], messages=params["messages"])
    assert counted.input_tokens > short.input_tokens > 0
    message = client.messages.create(**params)
    usage = message.usage
    total = (
        usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)
    )
    assert total == counted.input_tokens
    assert usage.service_tier == "standard"


def test_messages_endpoint_gives_the_batch_answer(client: anthropic.Anthropic) -> None:
    params = text_params("Where is my parcel? It was shipped a week ago.")
    direct = client.messages.create(**params)
    batch = client.messages.batches.create(requests=[{"custom_id": "one", "params": params}])
    client.messages.batches.retrieve(batch.id)
    (result,) = list(client.messages.batches.results(batch.id))
    assert result.result.message.content == direct.content
    assert result.result.message.usage.input_tokens == direct.usage.input_tokens


def test_messages_endpoint_validates_synchronously(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="claude-fable-5", max_tokens=-1, messages=[{"role": "user", "content": "x"}]
        )
    assert "max_tokens" in info.value.body["error"]["message"]  # type: ignore[index]


def test_unknown_route_uses_the_error_shape(http: httpx.Client) -> None:
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["request_id"] == response.headers["request-id"]


def test_health_and_stats_need_no_key(emulator: EmulatorServer) -> None:
    assert httpx.get(f"{emulator.base_url}/_emulator/health").json() == {"status": "ok"}
    snapshot = stats(emulator)
    assert snapshot["batches_created"] >= 1
    assert snapshot["requests_seen"] >= snapshot["batches_created"]
    assert snapshot["calls"]["create"] >= snapshot["batches_created"]
    assert set(snapshot["calls"]) == {
        "create",
        "retrieve",
        "list",
        "cancel",
        "delete",
        "results",
        "count_tokens",
        "messages",
    }


async def test_async_client_round_trip(emulator: EmulatorServer) -> None:
    async with anthropic.AsyncAnthropic(api_key=API_KEY, base_url=emulator.base_url) as sdk:
        batch = await sdk.messages.batches.create(requests=_requests(3))
        ended = await sdk.messages.batches.retrieve(batch.id)
        assert ended.processing_status == "ended"
        results = await sdk.messages.batches.results(batch.id)
        ids = [item.custom_id async for item in results]
        assert sorted(ids) == ["req-0", "req-1", "req-2"]
        walked = [b.id async for b in sdk.messages.batches.list(limit=1)]
        assert batch.id in walked and len(walked) == len(set(walked))

"""Batch lifecycle with a processing window: counts, results_url, cancel, delete."""

from __future__ import annotations

from datetime import timedelta

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorSettings

from .helpers import text_params, wait_ended

EMULATOR_SETTINGS = EmulatorSettings(processing_seconds=1.0, cancel_seconds=0.2)


def _requests(n: int) -> list[dict[str, object]]:
    return [{"custom_id": f"r{i}", "params": text_params(f"question {i}")} for i in range(n)]


def test_counts_stay_processing_until_the_end(client: anthropic.Anthropic, http: httpx.Client) -> None:
    created = client.messages.batches.create(requests=_requests(3))
    during = client.messages.batches.retrieve(created.id)
    assert during.processing_status == "in_progress"
    assert during.request_counts.processing == 3
    assert during.request_counts.succeeded == 0
    assert during.results_url is None and during.ended_at is None

    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client.messages.batches.results(created.id)
    early = http.get(f"/v1/messages/batches/{created.id}/results")
    assert early.status_code == 400
    assert early.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(created.id)

    ended = wait_ended(client, created.id)
    assert ended.request_counts.processing == 0
    assert ended.request_counts.succeeded == 3
    assert ended.results_url is not None and ended.results_url.endswith(
        f"/v1/messages/batches/{created.id}/results"
    )
    # ended_at is the scheduled end, not the moment somebody looked.
    assert ended.ended_at is not None
    assert abs((ended.ended_at - ended.created_at) - timedelta(seconds=1)) < timedelta(milliseconds=5)
    assert len(list(client.messages.batches.results(created.id))) == 3
    assert client.messages.batches.delete(created.id).type == "message_batch_deleted"


def test_cancel_goes_through_canceling_to_ended(client: anthropic.Anthropic) -> None:
    created = client.messages.batches.create(requests=_requests(2))
    canceling = client.messages.batches.cancel(created.id)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.request_counts.processing == 2
    assert canceling.results_url is None
    again = client.messages.batches.cancel(created.id)
    assert again.cancel_initiated_at == canceling.cancel_initiated_at

    ended = wait_ended(client, created.id)
    counts = ended.request_counts
    assert counts.processing == 0
    assert counts.canceled >= 1
    assert counts.canceled + counts.succeeded == 2
    assert ended.ended_at is not None
    assert abs((ended.ended_at - canceling.cancel_initiated_at) - timedelta(seconds=0.2)) < timedelta(
        milliseconds=5
    )
    types = [r.result.type for r in client.messages.batches.results(created.id)]
    assert types.count("canceled") == counts.canceled
    assert types.count("succeeded") == counts.succeeded


def test_list_shows_live_status(client: anthropic.Anthropic) -> None:
    created = client.messages.batches.create(requests=_requests(1))
    (listed,) = [b for b in client.messages.batches.list(limit=5).data if b.id == created.id]
    assert listed.processing_status == "in_progress"
    assert listed.results_url is None


def test_processing_retrieves_ends_a_batch_on_the_nth_retrieve() -> None:
    from airflow_provider_fable.emulator import EmulatorServer

    with EmulatorServer(EmulatorSettings(processing_seconds=3600, processing_retrieves=3)) as server:
        with anthropic.Anthropic(api_key="k", base_url=server.base_url) as sdk:
            created = sdk.messages.batches.create(requests=_requests(2))
            statuses = [sdk.messages.batches.retrieve(created.id).processing_status for _ in range(4)]
    assert statuses == ["in_progress", "in_progress", "ended", "ended"]

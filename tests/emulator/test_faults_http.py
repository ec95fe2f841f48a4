"""HTTP-level faults: first-N errors the SDK retries, transient 404s, cut result streams."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings

from .helpers import API_HEADERS, API_KEY, stats, text_params

EMULATOR_SETTINGS = EmulatorSettings(
    faults=FaultSettings(
        http_error_first_n=2,
        http_error_codes=(429, 529),
        http_error_endpoints=("count_tokens", "list"),
        retry_after_ms=5,
        transient_404_after_create=1,
        cut_results_after=2,
    )
)


def _ended_batch(client: anthropic.Anthropic, n: int) -> Any:
    batch = client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": text_params(f"q {i}")} for i in range(n)]
    )
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    return client.messages.batches.retrieve(batch.id)


def test_first_n_errors_are_retried_by_the_sdk(client: anthropic.Anthropic, emulator: EmulatorServer) -> None:
    counted = client.messages.count_tokens(
        model="claude-fable-5", messages=[{"role": "user", "content": "hello"}]
    )
    assert counted.input_tokens > 0
    snapshot = stats(emulator)
    assert snapshot["calls"]["count_tokens"] == 3
    assert snapshot["faults"]["http_error_by_code"] == {"429": 1, "529": 1}
    # Later calls are served at once.
    client.messages.count_tokens(model="claude-fable-5", messages=[{"role": "user", "content": "again"}])
    assert stats(emulator)["calls"]["count_tokens"] == 4


def test_errors_carry_the_api_shape_and_retry_headers(emulator: EmulatorServer) -> None:
    no_retries = anthropic.Anthropic(api_key=API_KEY, base_url=emulator.base_url, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as rate_limited:
        no_retries.messages.batches.list()
    assert rate_limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    headers = rate_limited.value.response.headers
    assert headers["retry-after-ms"] == "5" and headers["x-should-retry"] == "true"
    assert headers["retry-after"] == "5" and headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["request-id"] == rate_limited.value.request_id
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        no_retries.messages.batches.list()
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert no_retries.messages.batches.list().has_more is not None


def test_transient_404_right_after_create(client: anthropic.Anthropic, emulator: EmulatorServer) -> None:
    before = stats(emulator)["faults"]["transient_404"]
    batch = _ended_batch(client, 1)
    assert batch.processing_status == "ended"
    assert stats(emulator)["faults"]["transient_404"] == before + 1


def test_results_stream_is_cut_once(client: anthropic.Anthropic, emulator: EmulatorServer) -> None:
    batch = _ended_batch(client, 6)
    seen: list[str] = []
    with pytest.raises((httpx2.TransportError, anthropic.APIConnectionError)):
        for item in client.messages.batches.results(batch.id):
            seen.append(item.custom_id)
    assert len(seen) == 2
    complete = [item.custom_id for item in client.messages.batches.results(batch.id)]
    assert len(complete) == 6 and complete[:2] == seen
    assert stats(emulator)["faults"]["cut_stream"] >= 1


def test_cut_stream_ends_mid_line(client: anthropic.Anthropic) -> None:
    batch = _ended_batch(client, 4)
    received = b""
    with httpx.Client(headers=API_HEADERS) as raw:
        with pytest.raises(httpx.RemoteProtocolError):
            with raw.stream("GET", batch.results_url) as response:
                for chunk in response.iter_raw():
                    received += chunk
    lines = received.split(b"\n")
    assert len(lines) == 3 and lines[2] and not received.endswith(b"\n")


def test_http_error_rate_is_survivable_with_retries() -> None:
    settings = EmulatorSettings(
        faults=FaultSettings(
            http_error_rate=0.5, http_error_endpoints=("retrieve",), retry_after_ms=1, seed=3
        )
    )
    with EmulatorServer(settings) as server:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url, max_retries=10)
        batch = sdk.messages.batches.create(requests=[{"custom_id": "a", "params": text_params("x")}])
        for _ in range(10):
            assert sdk.messages.batches.retrieve(batch.id).id == batch.id
        snapshot = stats(server)
    assert snapshot["faults"]["http_error"] > 0
    assert snapshot["calls"]["retrieve"] == 10 + snapshot["faults"]["http_error"]

"""Authentication (x-api-key and Bearer) and the request body cap (413 request_too_large)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings

from .helpers import text_params

EMULATOR_SETTINGS = EmulatorSettings(api_key="secret", max_body_bytes=4096)


def test_missing_key_is_401_with_the_api_body(emulator: EmulatorServer) -> None:
    response = httpx.get(f"{emulator.base_url}/v1/messages/batches")
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["request-id"]


def test_wrong_key_is_rejected(emulator: EmulatorServer) -> None:
    sdk = anthropic.Anthropic(api_key="not-the-key", base_url=emulator.base_url)
    with pytest.raises(anthropic.AuthenticationError) as info:
        sdk.messages.batches.list()
    assert info.value.body["error"]["message"] == "invalid x-api-key"  # type: ignore[index]


def test_bearer_and_x_api_key_are_both_accepted(
    emulator: EmulatorServer, client: anthropic.Anthropic
) -> None:
    assert client.messages.batches.list().data is not None  # SDK 2.x sends Authorization: Bearer
    response = httpx.get(
        f"{emulator.base_url}/v1/messages/batches",
        headers={"x-api-key": "secret", "anthropic-version": "2026-10-21"},
    )
    assert response.status_code == 200


def test_body_over_the_cap_is_413(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.batches.create(requests=[{"custom_id": "big", "params": text_params("x" * 5000)}])
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


def test_body_without_length_is_counted_while_reading(emulator: EmulatorServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"requests": ['
        for i in range(300):
            yield b'{"custom_id": "c%d", "params": {}},' % i
        yield b'{"custom_id": "last", "params": {}}]}'

    response = httpx.post(
        f"{emulator.base_url}/v1/messages/batches",
        content=chunks(),
        headers={"x-api-key": "secret", "anthropic-version": "2026-10-21"},
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


def test_body_under_the_cap_is_fine(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(requests=[{"custom_id": "small", "params": text_params("hi")}])
    assert batch.request_counts.processing == 1

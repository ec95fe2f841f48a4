"""Helpers shared by the emulator tests (imported relatively; conftest only holds fixtures)."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorServer

API_KEY = "test-key"
#: Headers every raw HTTP call needs (the SDK sends them itself), as the real API requires.
API_HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2026-10-21"}


def stats(emulator: EmulatorServer) -> dict[str, Any]:
    """The emulator's counters."""
    return httpx.get(f"{emulator.base_url}/_emulator/stats", timeout=10).json()


def advance_clock(emulator: EmulatorServer, seconds: float) -> dict[str, Any]:
    """Move the emulator's clock forward (e.g. 24 h to run batches to their expiry)."""
    response = httpx.post(
        f"{emulator.base_url}/_emulator/clock", json={"advance_seconds": seconds}, timeout=10
    )
    response.raise_for_status()
    return response.json()


def text_params(text: str, **extra: Any) -> dict[str, Any]:
    """Minimal valid Messages params for one user message."""
    return {
        "model": "claude-fable-5",
        "max_tokens": 400,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def wait_ended(client: anthropic.Anthropic, batch_id: str, deadline_s: float = 15.0) -> Any:
    """Poll until the batch has ended (fails the test instead of hanging)."""
    deadline = time.monotonic() + deadline_s
    while True:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        if time.monotonic() > deadline:
            pytest.fail(f"batch {batch_id} did not end within {deadline_s}s: {batch}")
        time.sleep(0.05)

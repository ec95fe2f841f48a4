"""Helpers shared by the emulator tests (imported relatively; conftest only holds fixtures)."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorServer

API_KEY = "test-key"


def stats(emulator: EmulatorServer) -> dict[str, Any]:
    """The emulator's counters."""
    return httpx.get(f"{emulator.base_url}/_emulator/stats", timeout=10).json()


def text_params(text: str, **extra: Any) -> dict[str, Any]:
    """Minimal valid Messages params for one user message."""
    return {
        "model": "claude-test",
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

"""Fixtures for the emulator tests: one real HTTP server per test module.

A module chooses its server's settings with a module-level ``EMULATOR_SETTINGS``; tests then
talk to it through the official ``anthropic`` SDK exactly like users' DAG tests do.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings

from .helpers import API_KEY


@pytest.fixture(scope="module")
def emulator(request: pytest.FixtureRequest) -> Iterator[EmulatorServer]:
    """A running emulator configured by the test module's ``EMULATOR_SETTINGS``."""
    settings = getattr(request.module, "EMULATOR_SETTINGS", None) or EmulatorSettings()
    with EmulatorServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def client(emulator: EmulatorServer) -> Iterator[anthropic.Anthropic]:
    """The official SDK pointed at the emulator."""
    api_key = emulator.settings.api_key or API_KEY
    with anthropic.Anthropic(api_key=api_key, base_url=emulator.base_url) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    """A plain HTTP client (with a valid key) for what the SDK hides: headers, raw bodies."""
    api_key = emulator.settings.api_key or API_KEY
    headers = {"x-api-key": api_key, "anthropic-version": "2026-10-21"}
    with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=60) as raw:
        yield raw

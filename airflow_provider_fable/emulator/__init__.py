"""Local emulator of Anthropic's Message Batches API.

Run DAG tests offline: the official ``anthropic`` SDK talks to it unchanged
(``anthropic.Anthropic(api_key="x", base_url=server.base_url)``). Answers come from a
deterministic model that honours structured-output schemas and forced tools, and faults
(errored/expired requests, broken answers, HTTP errors, cut downloads) can be injected
reproducibly. Importing this package never imports Airflow.
"""

from __future__ import annotations

from airflow_provider_fable.emulator.app import create_app
from airflow_provider_fable.emulator.server import EmulatorServer
from airflow_provider_fable.emulator.settings import EmulatorSettings, FaultSettings

__all__ = ["EmulatorServer", "EmulatorSettings", "FaultSettings", "create_app"]

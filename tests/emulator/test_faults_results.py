"""Per-request faults: errored, expired and deliberately broken answers, all deterministic."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Literal

import anthropic
import pytest
from pydantic import BaseModel, ValidationError

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings

from .helpers import API_KEY, advance_clock, stats

EMULATOR_SETTINGS = EmulatorSettings(
    faults=FaultSettings(
        seed=7, errored_rate=0.2, expired_rate=0.1, invalid_answer_rate=0.4, description_break_rate=0
    )
)
N = 200


class Label(BaseModel):
    category: Literal["billing", "bug", "shipping"]
    urgent: bool
    summary: str


SCHEMA = anthropic.transform_schema(Label)


def _requests() -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"rec-{i}",
            "params": {
                "model": "claude-fable-5",
                "max_tokens": 500,
                "messages": [{"role": "user", "content": f"Ticket {i}: my invoice is wrong."}],
                "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
            },
        }
        for i in range(N)
    ]


def _run(client: anthropic.Anthropic, emulator: EmulatorServer) -> tuple[Any, dict[str, Any]]:
    """Run a batch to its end: the unprocessed share keeps it in progress until its 24 h expiry."""
    batch = client.messages.batches.create(requests=_requests())
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    advance_clock(emulator, 24 * 3600)
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended"
    assert ended.ended_at == ended.expires_at
    return ended, {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}


@pytest.fixture(scope="module")
def first_run(client: anthropic.Anthropic, emulator: EmulatorServer) -> tuple[Any, dict[str, Any]]:
    return _run(client, emulator)


def test_errored_and_expired_shares(first_run: tuple[Any, dict[str, Any]]) -> None:
    batch, results = first_run
    counts = batch.request_counts
    assert counts.errored + counts.expired + counts.succeeded == N
    assert 0.1 * N <= counts.errored <= 0.3 * N
    assert 0.04 * N <= counts.expired <= 0.16 * N
    types = Counter(r.type for r in results.values())
    assert types["errored"] == counts.errored and types["expired"] == counts.expired
    error_types = {r.error.error.type for r in results.values() if r.type == "errored"}
    assert error_types == {"api_error", "overloaded_error"}
    for result in results.values():
        if result.type == "errored":
            assert result.error.type == "error" and result.error.request_id.startswith("req_")


def _classify(text: str) -> str:
    """Which way an answer is broken ("ok" when it validates)."""
    try:
        value = json.loads(text)
    except ValueError:
        return "non_json"
    try:
        Label.model_validate(value, strict=True)
    except ValidationError as exc:
        error_type = exc.errors()[0]["type"]
        if error_type == "missing":
            return "missing_field"
        if error_type == "literal_error" and isinstance(value.get("category"), str):
            return "bad_enum"
        return "wrong_type"
    return "ok"


def test_invalid_answers_cover_every_kind(
    first_run: tuple[Any, dict[str, Any]], emulator: EmulatorServer
) -> None:
    _, results = first_run
    kinds = Counter(_classify(r.message.content[0].text) for r in results.values() if r.type == "succeeded")
    succeeded = sum(kinds.values())
    broken = succeeded - kinds["ok"]
    assert 0.25 * succeeded <= broken <= 0.55 * succeeded
    assert {"non_json", "wrong_type", "bad_enum", "missing_field"} <= set(kinds)
    by_kind = stats(emulator)["faults"]["invalid_answer_by_kind"]
    assert set(by_kind) == {"non_json", "wrong_type", "bad_enum", "missing_field"}


def test_faults_are_deterministic_per_custom_id(first_run: tuple[Any, dict[str, Any]]) -> None:
    """Another emulator with the same settings gives every request the same fate and answer."""
    _, first = first_run
    with EmulatorServer(EMULATOR_SETTINGS) as other:
        with anthropic.Anthropic(api_key=other.settings.api_key or API_KEY, base_url=other.base_url) as sdk:
            _, again = _run(sdk, other)
    assert {k: r.type for k, r in first.items()} == {k: r.type for k, r in again.items()}
    for custom_id, result in first.items():
        if result.type == "succeeded":
            assert again[custom_id].message.content == result.message.content


def test_a_request_sent_again_is_a_fresh_draw(
    client: anthropic.Anthropic, emulator: EmulatorServer, first_run: tuple[Any, dict[str, Any]]
) -> None:
    """Like the real service, a rerun is not doomed to fail the way the first attempt did."""
    _, first = first_run
    batch, second = _run(client, emulator)
    failed_first = {k for k, r in first.items() if r.type != "succeeded"}
    failed_again = {k for k, r in second.items() if r.type != "succeeded"}
    assert failed_first and failed_again != failed_first
    assert failed_first - failed_again  # some of what failed succeeds on the rerun
    counts = batch.request_counts
    assert 0.1 * N <= counts.errored <= 0.3 * N  # the rates hold for every attempt


def test_stats_count_request_faults(emulator: EmulatorServer, first_run: tuple[Any, dict[str, Any]]) -> None:
    batch, _ = first_run
    faults = stats(emulator)["faults"]
    assert faults["errored"] >= batch.request_counts.errored
    assert faults["expired"] >= batch.request_counts.expired
    assert faults["invalid_answer"] > 0

"""Issue #10: the emulator refuses what the real API refuses, through the SDK and raw HTTP.

One test (or a small parametrised family) per item: unknown models, strict params, structured
output schemas, extended thinking, headers and retry timing, the 24 h expiry on a controllable
clock, and the state file across a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from pydantic import BaseModel, Field

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings

from .helpers import API_HEADERS, API_KEY, advance_clock, stats, text_params

EMULATOR_SETTINGS = EmulatorSettings(faults=FaultSettings(description_break_rate=0))


def _one_result(client: anthropic.Anthropic, params: dict[str, Any]) -> Any:
    batch = client.messages.batches.create(requests=[{"custom_id": "only", "params": params}])
    client.messages.batches.retrieve(batch.id)
    return next(iter(client.messages.batches.results(batch.id))).result


# -- 1. models ---------------------------------------------------------------------------------
def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    result = _one_result(client, {**text_params("hi"), "model": "claude-fable-5-typo"})
    assert result.type == "errored"
    assert result.error.error.type == "not_found_error"
    assert result.error.error.message == "model: claude-fable-5-typo"
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(**{**text_params("hi"), "model": "claude-3-opus-20240229"})
    assert info.value.body["error"]["message"] == "model: claude-3-opus-20240229"  # type: ignore[index]
    for alias in ("claude-fable-5", "claude-sonnet-4-5", "claude-haiku-4-5-20251001", "claude-opus-4-8"):
        assert client.messages.create(**{**text_params("hi"), "model": alias}).model == alias


def test_known_models_can_be_overridden() -> None:
    settings = EmulatorSettings(known_models="my-proxy-model")
    with EmulatorServer(settings) as server:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url)
        assert sdk.messages.create(**{**text_params("hi"), "model": "my-proxy-model"}).content
        with pytest.raises(anthropic.NotFoundError):
            sdk.messages.create(**text_params("hi"))
    assert EmulatorSettings(known_models=None).known_models is None  # None accepts any model


# -- 2. strict params --------------------------------------------------------------------------
_BAD_PARAMS = [
    ({"foo": 1}, "foo: Extra inputs are not permitted"),
    ({"response_format": {"type": "json_object"}}, "response_format: Extra inputs are not permitted"),
    ({"temperature": 0.0}, "temperature: is not supported in API version 2026-10-21"),
    ({"max_tokens": 1_000_000}, "which is the maximum allowed number of output tokens"),
    ({"max_tokens": -1}, "max_tokens: Input should be an integer greater than or equal to 0"),
    ({"messages": [{"role": "user", "content": ""}]}, "all messages must have non-empty content"),
    ({"messages": [{"role": "user", "content": []}]}, "all messages must have non-empty content"),
    ({"messages": [{"role": "user", "content": [{"type": "txt", "text": "x"}]}]}, "Input tag 'txt'"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name: Extra inputs"),
    ({"tools": [{"name": "t"}]}, "tools.0.custom.input_schema: Field required"),
    ({"stream": True}, "streaming is not supported for requests in a message batch"),
    ({"metadata": {"user_id": "u", "session": "s"}}, "metadata.session: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(
    ("extra", "message"), _BAD_PARAMS, ids=[m.split(":")[0][:30] for _, m in _BAD_PARAMS]
)
def test_params_the_api_refuses_end_errored(
    client: anthropic.Anthropic, extra: dict[str, Any], message: str
) -> None:
    result = _one_result(client, {**text_params("hello"), **extra})
    assert result.type == "errored"
    assert result.error.error.type == "invalid_request_error"
    assert message in result.error.error.message


def test_extra_envelope_keys_are_refused_at_create(http: httpx.Client) -> None:
    body = {"requests": [{"custom_id": "a", "params": text_params("x"), "priority": 1}]}
    response = http.post("/v1/messages/batches", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "requests.0.priority: Extra inputs are not permitted"
    response = http.post("/v1/messages/batches", json={"requests": [], "dry_run": True})
    assert response.json()["error"]["message"] == "dry_run: Extra inputs are not permitted"


def test_sampling_params_are_checked_on_the_old_api_version(http: httpx.Client) -> None:
    old = {"anthropic-version": "2023-06-01"}
    ok = http.post("/v1/messages", json=text_params("x", temperature=0.3, top_k=5), headers=old)
    assert ok.status_code == 200
    for bad, message in (({"temperature": 1.5}, "temperature:"), ({"top_k": -1}, "top_k:")):
        response = http.post("/v1/messages", json=text_params("x", **bad), headers=old)
        assert response.status_code == 400 and message in response.json()["error"]["message"]


# -- 3. structured outputs ---------------------------------------------------------------------
class Note(BaseModel):
    title: str = Field(max_length=12)
    score: int = Field(ge=1, le=5)
    tags: list[str] = Field(max_length=2)


def _structured(
    schema: dict[str, Any], text: str = "A short note about invoices and refunds."
) -> dict[str, Any]:
    return text_params(text, output_config={"format": {"type": "json_schema", "schema": schema}})


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "properties": {"a": {"type": "string"}}}, "'additionalProperties' must be explicitly set to false"),
        (Note.model_json_schema() | {"additionalProperties": False}, "keyword 'maxLength' is not supported"),
        (
            {
                "$defs": {"Node": {"type": "object", "additionalProperties": False,
                                   "properties": {"child": {"$ref": "#/$defs/Node"}}}},
                "$ref": "#/$defs/Node",
            },
            "recursive schemas are not supported",
        ),
        ({"type": "object", "additionalProperties": False, "properties": {"a": {"$ref": "https://x/y.json"}}}, "external refs"),
        ({"type": "string", "format": "credit-card"}, "string format 'credit-card' is not supported"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 3}, "only minItems of 0 or 1"),
    ],
    ids=["no-additionalProperties-false", "maxLength-keyword", "recursion", "external-ref", "format", "minItems"],
)  # fmt: skip
def test_schemas_the_api_refuses(client: anthropic.Anthropic, schema: dict[str, Any], message: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**_structured(schema))
    assert message in info.value.body["error"]["message"]  # type: ignore[index]
    result = _one_result(client, _structured(schema))
    assert result.type == "errored" and message in result.error.error.message


def test_description_only_constraints_are_broken_at_the_configured_rate() -> None:
    """transform_schema moves maxLength/maximum/maxItems into descriptions; a model may ignore them."""
    schema = anthropic.transform_schema(Note)
    requests = [
        {
            "custom_id": f"n{i}",
            "params": _structured(schema, f"Note {i}: the invoice {i} was charged twice, refund it please."),
        }
        for i in range(300)
    ]
    settings = EmulatorSettings(faults=FaultSettings(description_break_rate=0.1))
    with EmulatorServer(settings) as server:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url)
        batch = sdk.messages.batches.create(requests=requests)
        sdk.messages.batches.retrieve(batch.id)
        answers = [r.result.message.content[0].text for r in sdk.messages.batches.results(batch.id)]
        broken_counter = stats(server)["faults"]["description_constraint_broken"]
    invalid = 0
    for text in answers:
        try:
            Note.model_validate_json(text)
        except ValueError:
            invalid += 1
    # 3 hinted constraints per answer at 10 %: about 27 % of answers break at least one.
    assert 0.12 * len(answers) <= invalid <= 0.45 * len(answers)
    assert broken_counter >= invalid
    # Keywords the API enforces still hold in every answer: JSON, types, required keys.
    import json

    assert all(set(json.loads(t)) == {"title", "score", "tags"} for t in answers)


# -- 4. extended thinking ----------------------------------------------------------------------
def test_thinking_block_comes_first_and_is_billed(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(**text_params("Why is my invoice wrong?", max_tokens=3000))
    thought = client.messages.create(
        **text_params("Why is my invoice wrong?", max_tokens=3000),
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.type for b in thought.content] == ["thinking", "text"]
    assert thought.content[0].thinking and thought.content[0].signature
    assert thought.content[1].text == plain.content[0].text
    assert thought.usage.output_tokens > plain.usage.output_tokens


@pytest.mark.parametrize(
    ("thinking", "extra", "message"),
    [
        ({"type": "enabled", "budget_tokens": 2048}, {"max_tokens": 2048}, "`max_tokens` must be greater than `thinking.budget_tokens`"),
        ({"type": "enabled", "budget_tokens": 500}, {"max_tokens": 4000}, "greater than or equal to 1024"),
        ({"type": "enabled", "budget_tokens": 1024}, {"max_tokens": 4000, "tools": [{"name": "t", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "t"}}, "Thinking may not be enabled when tool_choice forces tool use"),
        ({"type": "sometimes"}, {}, "thinking.type"),
    ],
    ids=["budget-not-below-max", "budget-too-small", "forced-tool", "bad-type"],
)  # fmt: skip
def test_thinking_rules(
    client: anthropic.Anthropic, thinking: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    result = _one_result(client, {**text_params("hi"), **extra, "thinking": thinking})
    assert result.type == "errored" and message in result.error.error.message


# -- 5. headers --------------------------------------------------------------------------------
def test_missing_version_and_unknown_beta_are_400(emulator: EmulatorServer) -> None:
    url = f"{emulator.base_url}/v1/messages/batches"
    missing = httpx.get(url, headers={"x-api-key": API_KEY})
    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == "anthropic-version: header is required"
    unknown = httpx.get(
        url, headers={**API_HEADERS, "anthropic-beta": "message-batches-2024-09-24,made-up-beta"}
    )
    assert unknown.status_code == 400
    assert "`made-up-beta`" in unknown.json()["error"]["message"]
    known = httpx.get(url, headers={**API_HEADERS, "anthropic-beta": "message-batches-2024-09-24"})
    assert known.status_code == 200
    sdk = anthropic.Anthropic(
        api_key=API_KEY, base_url=emulator.base_url, default_headers={"anthropic-beta": "nope"}
    )
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.batches.list()


def test_rate_limits_carry_seconds_and_ratelimit_headers() -> None:
    settings = EmulatorSettings(
        faults=FaultSettings(
            http_error_first_n=2, http_error_codes=(429, 529), http_error_endpoints=("list",)
        )
    )
    with EmulatorServer(settings) as server:
        limited = httpx.get(f"{server.base_url}/v1/messages/batches", headers=API_HEADERS)
        overloaded = httpx.get(f"{server.base_url}/v1/messages/batches", headers=API_HEADERS)
    assert limited.status_code == 429 and overloaded.status_code == 529
    for response in (limited, overloaded):
        assert response.headers["retry-after"] == "5"
        assert "retry-after-ms" not in response.headers  # only when a test asks for fast retries
        assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert limited.json()["error"]["type"] == "rate_limit_error"


# -- 6. time -----------------------------------------------------------------------------------
def test_unprocessed_requests_expire_only_at_the_24h_expiry() -> None:
    settings = EmulatorSettings(faults=FaultSettings(expired_rate=0.3, seed=1, description_break_rate=0))
    requests = [{"custom_id": f"r{i}", "params": text_params(f"q {i}")} for i in range(40)]
    with EmulatorServer(settings) as server:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url)
        batch = sdk.messages.batches.create(requests=requests)
        canceled = sdk.messages.batches.create(requests=requests)
        assert sdk.messages.batches.retrieve(batch.id).processing_status == "in_progress"
        sdk.messages.batches.cancel(canceled.id)
        clock = advance_clock(server, 23 * 3600)
        assert clock["offset_seconds"] == 23 * 3600
        assert sdk.messages.batches.retrieve(batch.id).processing_status == "in_progress"
        advance_clock(server, 3600)
        ended = sdk.messages.batches.retrieve(batch.id)
        done_canceled = sdk.messages.batches.retrieve(canceled.id)
    assert ended.processing_status == "ended" and ended.ended_at == ended.expires_at
    counts = ended.request_counts
    assert counts.expired > 0 and counts.succeeded > 0 and counts.expired + counts.succeeded == 40
    assert done_canceled.request_counts.expired == 0 and done_canceled.request_counts.canceled > 0


def test_clock_endpoint_refuses_going_back(emulator: EmulatorServer) -> None:
    response = httpx.post(f"{emulator.base_url}/_emulator/clock", json={"advance_seconds": -5})
    assert response.status_code == 400
    assert "now" in httpx.get(f"{emulator.base_url}/_emulator/clock").json()


# -- 8. state file -----------------------------------------------------------------------------
def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "emulator.sqlite"
    settings = EmulatorSettings(state_path=str(state), processing_seconds=3600)
    with EmulatorServer(settings) as first:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=first.base_url)
        pending = sdk.messages.batches.create(requests=[{"custom_id": "p", "params": text_params("later")}])
        done = sdk.messages.batches.create(requests=[{"custom_id": "d", "params": text_params("now")}])
        advance_clock(first, 1800)
        sdk.messages.batches.cancel(done.id)
        gone = sdk.messages.batches.create(requests=[{"custom_id": "g", "params": text_params("bye")}])
    with EmulatorServer(settings) as second:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=second.base_url)
        assert sdk.messages.batches.retrieve(pending.id).processing_status == "in_progress"
        advance_clock(second, 1800)  # the offset of the first run was kept: 1 h has now passed
        assert sdk.messages.batches.retrieve(pending.id).processing_status == "ended"
        assert [r.custom_id for r in sdk.messages.batches.results(pending.id)] == ["p"]
        canceled = wait_for_end(sdk, done.id)
        assert canceled.request_counts.canceled == 1
        ids = [b.id for b in sdk.messages.batches.list(limit=10).data]
        assert ids == [gone.id, done.id, pending.id]
        sdk.messages.batches.cancel(gone.id)
        wait_for_end(sdk, gone.id)
        sdk.messages.batches.delete(gone.id)
    with EmulatorServer(settings) as third:
        sdk = anthropic.Anthropic(api_key=API_KEY, base_url=third.base_url)
        with pytest.raises(anthropic.NotFoundError):
            sdk.messages.batches.retrieve(gone.id)
        assert [r.custom_id for r in sdk.messages.batches.results(pending.id)] == ["p"]
        assert [b.id for b in sdk.messages.batches.list(after_id=gone.id).data] == [done.id, pending.id]


def wait_for_end(sdk: anthropic.Anthropic, batch_id: str) -> Any:
    from .helpers import wait_ended

    return wait_ended(sdk, batch_id)


def test_strict_tool_schemas_and_beta_output_format(http: httpx.Client) -> None:
    loose = {"type": "object", "properties": {"a": {"type": "string"}}}
    strict_tool = {"name": "t", "strict": True, "input_schema": loose}
    response = http.post("/v1/messages", json=text_params("x", tools=[strict_tool]))
    assert response.status_code == 400
    assert "tools.0.custom.input_schema: 'additionalProperties'" in response.json()["error"]["message"]
    assert (
        http.post("/v1/messages", json=text_params("x", tools=[{**strict_tool, "strict": False}])).status_code
        == 200
    )
    # The deprecated top-level output_format exists only behind its beta header.
    fmt = {"type": "json_schema", "schema": {**loose, "additionalProperties": False}}
    refused = http.post("/v1/messages", json=text_params("x", output_format=fmt))
    assert refused.json()["error"]["message"] == "output_format: Extra inputs are not permitted"
    beta = {"anthropic-beta": "structured-outputs-2025-11-13"}
    accepted = http.post("/v1/messages", json=text_params("x", output_format=fmt), headers=beta)
    assert accepted.status_code == 200 and accepted.json()["content"][0]["text"].startswith("{")


def test_omitted_thinking_display_keeps_only_the_signature(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        **text_params("Where is my parcel?", max_tokens=2000),
        thinking={"type": "enabled", "budget_tokens": 1024, "display": "omitted"},
    )
    block = message.content[0]
    assert block.type == "thinking" and block.thinking == "" and block.signature

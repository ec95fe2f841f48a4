"""Unit tests of the Airflow-free core: request building, ids, sharding, parsing, validation."""

from __future__ import annotations

import json

import pytest

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.cost import usage_cost_usd
from airflow_provider_fable.core.errors import JobSpecError, RecordError
from airflow_provider_fable.core.job import BatchJob
from airflow_provider_fable.core.requests import build_requests
from airflow_provider_fable.core.results import Usage, parse_result_line
from airflow_provider_fable.core.sharding import request_size, shard_requests
from airflow_provider_fable.core.validation import Accepted, Rejected, validate_result
from tests.conftest import Paint


def make_job(**overrides):
    spec = dict(
        prompt_template="Paint request {id}: {text}",
        output_model=Paint,
        system_prompt="You choose paint.",
        model="claude-haiku-4-5",
    )
    spec.update(overrides)
    return BatchJob(**spec)


def succeeded(custom_id: str, text: str, stop_reason: str = "end_turn") -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "result": {
                "type": "succeeded",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-haiku-4-5",
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": stop_reason,
                    "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 50},
                },
            },
        }
    )


def test_request_has_structured_output_system_cache_and_real_id():
    [req] = build_requests(make_job(), [{"id": "A-1", "text": "blue walls"}])
    assert req["custom_id"] == "A-1"
    params = req["params"]
    assert params["output_config"]["format"]["type"] == "json_schema"
    schema = params["output_config"]["format"]["schema"]
    assert set(schema["required"]) == {"color", "glossy", "coats", "note"}
    assert schema["additionalProperties"] is False
    assert params["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert params["messages"][-1] == {"role": "user", "content": "Paint request A-1: blue walls"}


def test_few_shot_turns_precede_record_and_carry_the_cache_breakpoint():
    example = {
        "record": {"id": "ex", "text": "red door"},
        "answer": {"color": "red", "glossy": True, "coats": 2, "note": "door"},
    }
    [req] = build_requests(make_job(few_shot_examples=[example]), [{"id": 7, "text": "x"}])
    msgs = req["params"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert "cache_control" not in req["params"]["system"][0]
    assert req["custom_id"] == "7"


def test_few_shot_answer_must_satisfy_output_model():
    bad = {
        "record": {"id": "ex", "text": "t"},
        "answer": {"color": "pink", "glossy": False, "coats": 1, "note": ""},
    }
    with pytest.raises(JobSpecError, match=r"few_shot_examples\[0\]"):
        make_job(few_shot_examples=[bad])


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        ({"id": None, "text": "t"}, "custom_id.missing"),
        ({"id": "", "text": "t"}, "custom_id.missing"),
        ({"text": "t"}, "id.missing"),
        ({"id": "ok", "other": "t"}, "template.missing_field"),
    ],
)
def test_bad_records_name_record_and_rule(record, rule):
    with pytest.raises(RecordError) as info:
        list(build_requests(make_job(), [record]))
    assert info.value.rule == rule
    assert f"[{rule}]" in str(info.value)


def test_duplicate_ids_are_caught_before_sending():
    with pytest.raises(RecordError, match="custom_id.duplicate"):
        list(build_requests(make_job(), [{"id": "a", "text": "1"}, {"id": "a", "text": "2"}]))


def test_template_must_use_named_fields():
    with pytest.raises(JobSpecError, match="named fields"):
        make_job(prompt_template="hello {}")


def test_temperature_is_refused_before_anything_is_sent():
    # API version 2026-10-21 (sent by SDK 2.x) answers 400 to temperature, even 0.0.
    with pytest.raises(JobSpecError, match="temperature"):
        make_job(temperature=0.0)
    params = next(iter(build_requests(make_job(), [{"id": "a", "text": "1"}])))["params"]
    assert "temperature" not in params


def test_fingerprint_is_stable_and_sensitive():
    assert make_job().fingerprint() == make_job().fingerprint()
    assert make_job().fingerprint() != make_job(max_tokens=99).fingerprint()


@pytest.mark.parametrize(
    "real",
    [
        "x" * 65,
        "has space",
        "trailing-newline\n",
        "a@b.example",
        "ZD#123",
        "dir/sub/file.txt",
        "tête-à-tête 東京",
        "y" * 200,
        "enc-",
        "-",
    ],
)
def test_id_codec_encodes_unusable_ids_deterministically(real):
    custom = ids.encode(real)
    assert ids.CUSTOM_ID_RE.fullmatch(custom), custom
    assert ids.encode(real) == custom  # a retry builds byte-identical requests
    if ids.is_native(real):
        assert custom == real
    else:
        assert custom.startswith(ids.ENCODED_PREFIX) and custom != real
        assert ids.decode(custom, {custom: real}) == real


def test_id_codec_keeps_fitting_ids_and_reports_collisions():
    assert ids.encode("ZD-123_ok") == "ZD-123_ok"
    encoded = ids.encode("ZD#123")
    with pytest.raises(RecordError, match=r"custom_id.collision.*'ZD#123'"):
        list(build_requests(make_job(), [{"id": "ZD#123", "text": "1"}, {"id": encoded, "text": "2"}]))


def test_id_codec_accepts_ints_and_integral_floats():
    assert ids.encode(12) == "12"
    assert ids.encode(12.0) == "12"
    with pytest.raises(RecordError):
        ids.encode(True)


def test_sharding_respects_count_and_bytes():
    reqs = [{"custom_id": f"r{i}", "params": {"x": "y" * 100}} for i in range(25)]
    by_count = list(shard_requests(reqs, max_requests=10))
    assert [len(s) for s in by_count] == [10, 10, 5]
    one = request_size(reqs[0])
    by_bytes = list(shard_requests(reqs, max_bytes=int((one * 4 + 100) / 0.98)))
    assert all(sum(request_size(r) for r in s) <= one * 4 + 100 for s in by_bytes)
    assert sum(len(s) for s in by_bytes) == 25
    assert len(by_bytes) > 1
    with pytest.raises(ValueError, match="alone is"):
        list(shard_requests(reqs, max_bytes=50))


def test_parse_and_validate_accepts_good_answer():
    line = succeeded("A-1", json.dumps({"color": "blue", "glossy": True, "coats": 3, "note": "ok"}))
    outcome = validate_result(parse_result_line(line), Paint)
    assert isinstance(outcome, Accepted)
    assert outcome.data["color"] == "blue"
    assert outcome.usage.cache_read_input_tokens == 50


@pytest.mark.parametrize(
    ("text", "reason", "needle"),
    [
        ("not json at all", "invalid_json", "not JSON"),
        (json.dumps({"color": "pink", "glossy": False, "coats": 1, "note": "n"}), "schema", "color"),
        (json.dumps({"color": "red", "glossy": "yes", "coats": 1, "note": "n"}), "schema", "glossy"),
        (json.dumps({"color": "red", "glossy": False, "note": "n"}), "schema", "coats"),
        (json.dumps({"color": "red", "glossy": True, "coats": 1, "note": "n"}), "invariant", "2 coats"),
        ("", "empty_answer", "no text"),
    ],
)
def test_validation_rejects_with_reason(text, reason, needle):
    outcome = validate_result(parse_result_line(succeeded("B-2", text)), Paint)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == reason
    assert needle in outcome.detail
    assert outcome.record_id == "B-2"


def test_errored_expired_and_truncated_results_are_retryable_rejects():
    errored = json.dumps(
        {
            "custom_id": "e",
            "result": {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            },
        }
    )
    expired = json.dumps({"custom_id": "x", "result": {"type": "expired"}})
    cut = succeeded("t", '{"color": "re', stop_reason="max_tokens")
    outcomes = [validate_result(parse_result_line(x), Paint) for x in (errored, expired, cut)]
    assert [o.reason for o in outcomes] == ["errored", "expired", "truncated"]
    assert "overloaded_error" in outcomes[0].detail
    assert all(o.retryable for o in outcomes)


def test_batch_cost_is_half_price_with_cache_multipliers():
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_read_input_tokens=1_000_000)
    # sonnet: 3 in + 15 out + 0.3 cache read = 18.3, halved for batches
    assert usage_cost_usd(usage, "claude-sonnet-4-5") == pytest.approx(9.15)
    assert usage_cost_usd(usage, "unknown-model") is None


def test_format_errors_name_record_rule_and_position():
    job = make_job(prompt_template="{id}: {amount:.2f}")
    with pytest.raises(RecordError) as info:
        list(build_requests(job, [{"id": "a", "amount": 1.5}, {"id": "b", "amount": "n/a"}]))
    assert info.value.rule == "template.format"
    assert "'b' (#2 in the source)" in str(info.value)


def test_aliased_fields_validate_and_dump_by_alias():
    from pydantic import BaseModel, ConfigDict, Field

    class Aliased(BaseModel):
        model_config = ConfigDict(populate_by_name=True)
        label_value: str = Field(alias="label")

    outcome = validate_result(parse_result_line(succeeded("x", '{"label": "ok"}')), Aliased)
    assert isinstance(outcome, Accepted)
    assert outcome.data == {"label": "ok"}


def test_the_fast_dump_of_flat_models_equals_pydantics_json_mode_dump():
    """Flat models are dumped by a generated attribute reader (core.validation._attribute_dump);
    its output must be exactly ``model_dump(mode="json", by_alias=True)``, and models it does not
    know how to read (a custom serializer) keep the serializer's output."""
    from enum import Enum, IntEnum

    from pydantic import BaseModel, Field, field_serializer

    from airflow_provider_fable.core.validation import _compiled

    class Tone(str, Enum):
        calm = "calm"
        angry = "angry"

    class Level(IntEnum):
        one = 1
        two = 2

    class Flat(BaseModel):
        tone: Tone
        maybe_tone: Tone | None = None
        level: Level
        score: float
        ok: bool
        count: int | None = None
        name: str = Field(alias="title", min_length=1)

    class Custom(BaseModel):
        tone: Tone

        @field_serializer("tone")
        def _upper(self, value: Tone) -> str:
            return value.value.upper()

    answers = [
        '{"tone": "calm", "level": 2, "score": 0.5, "ok": true, "title": "a"}',
        '{"tone": "angry", "maybe_tone": "calm", "level": 1, "score": 3, "ok": false, "count": 7, "title": "b"}',
        '{"tone": "calm", "maybe_tone": null, "level": 1, "score": -1e300, "ok": true, "title": "c"}',
    ]
    assert _compiled(Flat).fast is not None  # the reader is used for this model
    for i, text in enumerate(answers):
        outcome = validate_result(parse_result_line(succeeded(f"f{i}", text)), Flat)
        assert isinstance(outcome, Accepted), outcome
        expected = Flat.model_validate_json(text, strict=True).model_dump(mode="json", by_alias=True)
        assert outcome.data == expected and list(outcome.data) == list(expected)
        assert type(outcome.data["tone"]) is str and type(outcome.data["level"]) is int
    assert _compiled(Flat).dump is _compiled(Flat).fast  # kept after the first-answer check
    for i in range(2):
        outcome = validate_result(parse_result_line(succeeded(f"c{i}", '{"tone": "calm"}')), Custom)
        assert isinstance(outcome, Accepted) and outcome.data == {"tone": "CALM"}

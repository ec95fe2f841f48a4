"""The deterministic model as pure functions: schema coverage, evidence, tokens, broken answers."""

from __future__ import annotations

import json
import re
import uuid
from datetime import date, datetime
from typing import Any

import pytest

from airflow_provider_fable.emulator import model

jsonschema = pytest.importorskip("jsonschema")


def _check(schema: dict[str, Any], text: str = "Some ticket text about an invoice. It is wrong.") -> Any:
    value = model.answer_for_schema(schema, text).value
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    return value


SCHEMAS: dict[str, dict[str, Any]] = {
    "string-lengths": {"type": "string", "minLength": 30, "maxLength": 35},
    "tiny-max": {"type": "string", "maxLength": 3},
    "const": {"const": "fixed"},
    "enum-ints": {"enum": [1, 2, 3]},
    "integer-exclusive": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5},
    "integer-multiple": {"type": "integer", "minimum": 10, "maximum": 100, "multipleOf": 25},
    "number-bounds": {"type": "number", "minimum": -2.5, "maximum": -2.4},
    "number-exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.01},
    "nullable": {"type": ["string", "null"], "maxLength": 4},
    "only-null": {"type": "null"},
    "array-bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 4},
    "array-of-enum": {
        "type": "array",
        "items": {"enum": ["a", "b"]},
        "minItems": 2,
        "maxItems": 2,
        "uniqueItems": True,
    },
    "one-of": {
        "oneOf": [{"type": "integer", "minimum": 7, "maximum": 7}, {"type": "string", "maxLength": 0}]
    },
    "all-of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        ]
    },
    "definitions-ref": {
        "definitions": {"Item": {"type": "object", "properties": {"n": {"type": "integer", "maximum": -1}}}},
        "type": "object",
        "properties": {"item": {"$ref": "#/definitions/Item"}},
        "required": ["item"],
        "additionalProperties": False,
    },
    "formats": {
        "type": "object",
        "properties": {
            "d": {"type": "string", "format": "date"},
            "dt": {"type": "string", "format": "date-time"},
            "e": {"type": "string", "format": "email"},
            "u": {"type": "string", "format": "uri"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["d", "dt", "e", "u", "id"],
    },
    "recursive": {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["name", "children"],
            }
        },
        "$ref": "#/$defs/Node",
    },
    "dict-values": {
        "type": "object",
        "additionalProperties": {"type": "integer", "minimum": 5, "maximum": 6},
    },
    "required-without-property": {"type": "object", "required": ["x"]},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_answers_validate_against_schema_features(name: str) -> None:
    _check(SCHEMAS[name])


def test_format_values_parse() -> None:
    value = _check(
        SCHEMAS["formats"], "Due 2025-02-03, mail me at jane@corp.example or see https://corp.example/t/1."
    )
    assert value["d"] == "2025-02-03"
    assert datetime.fromisoformat(value["dt"].replace("Z", "+00:00")).date() == date(2025, 2, 3)
    assert value["e"] == "jane@corp.example"
    assert value["u"] == "https://corp.example/t/1"
    assert uuid.UUID(value["id"]).version == 4


def test_description_hints_from_transform_schema_are_honoured() -> None:
    # What anthropic.transform_schema leaves for constraints the API does not support.
    schema = {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "Short.\n\n{maxLength: 12, minLength: 10}"},
            "score": {"type": "integer", "description": "{maximum: 3, minimum: 2}"},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "{maxItems: 1}"},
        },
        "required": ["summary", "score", "tags"],
    }
    value = model.answer_for_schema(schema, "A very long first sentence that will not fit at all.").value
    assert 10 <= len(value["summary"]) <= 12
    assert 2 <= value["score"] <= 3
    assert len(value["tags"]) == 1


def test_same_text_same_answer_and_text_matters() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "label": {"enum": ["x", "y", "z"]}}}
    texts = [f"text number {i}" for i in range(20)]
    answers = [json.dumps(model.answer_for_schema(schema, t).value) for t in texts]
    assert answers == [json.dumps(model.answer_for_schema(schema, t).value) for t in texts]
    assert len(set(answers)) > 1


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("Where is my invoice for March?", ["shipping", "billing", "bug"], "billing"),
        ("I was overcharged, VAT is wrong on the receipt", ["tech_support", "Billing", "sales"], "Billing"),
        (
            "2FA code never arrives so I cannot sign in",
            ["billing", "account-access", "other"],
            "account-access",
        ),
        ("The page throws an exception and then crashes", ["bug", "feature_request"], "bug"),
        ("Could you add support for CSV export?", ["bug", "feature_request"], "feature_request"),
        ("The courier says the parcel was delivered", ["shipping", "billing"], "shipping"),
        ("We have an outage, critical!", ["low", "medium", "high", "urgent"], "urgent"),
        ("nothing to see", ["low", "medium", "high"], "medium"),
        ("yes, that is correct", ["yes", "no", "unknown"], "yes"),
        ("I hate this, terrible", ["positive", "negative", "neutral"], "negative"),
    ],
)
def test_enum_evidence(text: str, labels: list[str], expected: str) -> None:
    schema = {"type": "object", "properties": {"label": {"enum": labels}}, "required": ["label"]}
    assert model.answer_for_schema(schema, text).value["label"] == expected


def test_only_the_last_user_message_is_evidence() -> None:
    params = {
        "model": "m",
        "max_tokens": 200,
        "system": "Labels: shipping shipping shipping delivery tracking parcel",
        "messages": [
            {"role": "user", "content": "parcel parcel delivery"},
            {"role": "assistant", "content": '{"label": "shipping"}'},
            {"role": "user", "content": [{"type": "text", "text": "Refund my invoice please"}]},
        ],
        "output_config": {
            "format": {
                "type": "json_schema",
                "schema": {"type": "object", "properties": {"label": {"enum": ["shipping", "billing"]}}},
            }
        },
    }
    answer = model.build_answer(params)
    assert json.loads(answer.content[0]["text"]) == {"label": "billing"}


def test_ties_are_broken_by_hash_not_by_position() -> None:
    schema = {"type": "object", "properties": {"label": {"enum": ["alpha", "beta", "gamma", "delta"]}}}
    picks = {model.answer_for_schema(schema, f"no evidence {i}").value["label"] for i in range(40)}
    assert len(picks) > 1


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("escalate", "I will contact my lawyer about this chargeback", True),
        ("needs_escalation", "This is unacceptable", True),
        ("escalate", "Just a question about the API", False),
        ("is_urgent", "please answer asap", True),
        ("is_billing_related", "my invoice is wrong", True),
        ("is_billing_related", "the app crashes", False),
    ],
)
def test_boolean_evidence(field: str, text: str, expected: bool) -> None:
    schema = {"type": "object", "properties": {field: {"type": "boolean"}}}
    assert model.answer_for_schema(schema, text).value[field] is expected


def test_summary_fields_are_extractive() -> None:
    schema = {"type": "object", "properties": {"reason": {"type": "string"}, "title": {"type": "string"}}}
    text = "Summarize the ticket below.\nSubject: The login page shows a blank screen after the update. Other details."
    value = model.answer_for_schema(schema, text).value
    assert value["reason"] == "The login page shows a blank screen after the update."
    assert value["title"] == "The login page shows a blank screen after"


def test_free_text_answer() -> None:
    params = {
        "model": "m",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello. How do I reset it? Thanks."}],
    }
    answer = model.build_answer(params)
    assert answer.content == [{"type": "text", "text": "Hello. How do I reset it?"}]
    assert answer.stop_reason == "end_turn"


def test_token_estimate_and_cache_prefix() -> None:
    system = [{"type": "text", "text": "s" * 4000, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    params = {"model": "m", "system": system, "messages": [{"role": "user", "content": "u" * 400}]}
    accounting = model.account_prompt(params)
    assert accounting.cache_prefix_tokens == 1000
    assert accounting.total_tokens == 1100
    assert accounting.cache_ttl_seconds == 3600
    other = model.account_prompt({**params, "model": "other"})
    assert other.cache_key != accounting.cache_key
    no_cache = model.account_prompt({"model": "m", "messages": params["messages"]})
    assert no_cache.cache_key is None and no_cache.total_tokens == 100


def test_schema_tokens_count_as_input() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with_schema = {**base, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    assert model.account_prompt(with_schema).total_tokens > model.account_prompt(base).total_tokens


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"max_tokens": 1, "messages": []}, "model: Field required"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"model": "m", "max_tokens": 1}, "messages: Field required"),
        ({"model": "m", "max_tokens": True, "messages": [{"role": "user", "content": "x"}]}, "max_tokens:"),
        ({"model": "m", "max_tokens": 1, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_validate_params(params: dict[str, Any], problem: str) -> None:
    found = model.validate_params(params)
    assert found is not None and found.startswith(problem)


def test_valid_params_pass() -> None:
    assert (
        model.validate_params({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
        is None
    )


SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["billing", "bug"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 5},
        "note": {"type": "string"},
    },
    "required": ["label", "score", "note"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("kind", ["non_json", "wrong_type", "bad_enum", "missing_field"])
def test_broken_answers_are_invalid_in_the_named_way(kind: str) -> None:
    params = {
        "model": "m",
        "max_tokens": 500,
        "messages": [{"role": "user", "content": "invoice problem"}],
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
    }
    answer = model.build_answer(params, invalid_kind=kind, id_seed="k")
    assert answer.invalid_kind == kind
    text = answer.content[0]["text"]
    if kind == "non_json":
        with pytest.raises(ValueError):
            json.loads(text)
        return
    value = json.loads(text)
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(value, SCHEMA)
    validator = {"wrong_type": "type", "bad_enum": "enum", "missing_field": "required"}[kind]
    assert info.value.validator == validator


def test_bad_enum_without_enum_falls_back_to_wrong_type() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    value, applied = model.break_answer({"n": 1}, schema, [], "bad_enum", "k")
    assert applied == "wrong_type" and not isinstance(value["n"], int)


def test_stable_helpers() -> None:
    assert model.stable_hash("a", 1) == model.stable_hash("a", 1) != model.stable_hash("a", 2)
    assert 0 <= model.stable_fraction("x") < 1
    token = model.stable_token(24, "seed")
    assert re.fullmatch(r"[A-Za-z0-9]{24}", token) and token == model.stable_token(24, "seed")


def test_stemming_groups_word_forms() -> None:
    assert model.stem("invoices") == model.stem("invoiced") == model.stem("invoice")
    assert model.stem("escalation") == model.stem("escalate") == model.stem("escalated")
    assert model.stem("shipping") == model.stem("ship")
    # "please" in a complaint is not a positive word.
    assert model.Evidence("Please refund me now").score("positive") == 0


TRIAGE_LABELS = ["billing", "account_access", "bug", "feature_request", "shipping"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Defects described without the word "error": symptoms, contractions typed without apostrophes.
        ("Since the update the sync freezes and the report shows the wrong total.", "bug"),
        ("The dashboard doesnt load, just a blank page and a spinner.", "bug"),
        # A login mentioned in passing does not make it an access problem.
        ("After logging in, the export button does nothing. It happens every time.", "bug"),
        ("Is there a way to export in bulk? It would save us hours.", "feature_request"),
        ("I ordered a scanner but received the wrong item, how do I send it back?", "shipping"),
    ],
)
def test_weighted_evidence_reads_symptoms_not_just_keywords(text: str, expected: str) -> None:
    schema = {"type": "object", "properties": {"category": {"enum": TRIAGE_LABELS}}}
    assert model.answer_for_schema(schema, text).value["category"] == expected


PRIORITY_SCHEMA = {
    "type": "object",
    "properties": {
        "priority": {"enum": ["low", "medium", "high", "urgent"]},
        "escalate": {"type": "boolean"},
    },
    "required": ["priority", "escalate"],
}


@pytest.mark.parametrize(
    ("text", "priority", "escalate"),
    [
        # Negation: "not urgent" is evidence for low, never for urgent.
        ("Not urgent at all, whenever you get a chance.", "low", False),
        # A named deadline makes it high; "by <someone> on <date>" is not a deadline.
        ("Please fix the report by Friday, our accountant needs it.", "high", False),
        ("The payment was taken by the bank on 2026-02-02.", "medium", False),
        # What makes a ticket escalate also makes it urgent, so the two agree.
        ("Our lawyer will be in touch about this data loss.", "urgent", True),
        # Weak words alone (a job title, "switch to") do not flip a boolean.
        ("My manager asked me to switch to monthly billing.", "medium", False),
    ],
)
def test_priority_negation_deadlines_and_escalation(text: str, priority: str, escalate: bool) -> None:
    value = model.answer_for_schema(PRIORITY_SCHEMA, text).value
    assert (value["priority"], value["escalate"]) == (priority, escalate)


def test_a_labels_own_words_beat_the_topic_lexicon_of_one_of_its_words() -> None:
    # "delivery" brings the whole shipping lexicon (arrived, damaged, item ...) to late_delivery,
    # but damaged_item names exactly what the text says.
    schema = {"properties": {"reason": {"enum": ["duplicate_charge", "damaged_item", "late_delivery"]}}}
    pick = lambda text: model.answer_for_schema(schema, text).value["reason"]  # noqa: E731
    assert pick("The item arrived damaged.") == "damaged_item"
    assert pick("Delivery was a week late.") == "late_delivery"
    assert pick("You charged me twice for one order.") == "duplicate_charge"

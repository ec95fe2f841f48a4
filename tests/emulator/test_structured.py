"""Structured output and forced tools through the SDK: answers validate and follow the evidence."""

from __future__ import annotations

import enum
import json
from datetime import date
from typing import Any, Literal

import anthropic
import pytest
from pydantic import BaseModel, Field

from airflow_provider_fable.emulator import EmulatorSettings, FaultSettings

from .helpers import text_params

# These tests check that answers validate; breaking description-only hints (on by default, like
# a real model now and then) has its own test in test_fidelity.py.
EMULATOR_SETTINGS = EmulatorSettings(faults=FaultSettings(description_break_rate=0))


class Category(str, enum.Enum):
    billing = "billing"
    account_access = "account_access"
    bug = "bug"
    feature_request = "feature_request"
    shipping = "shipping"
    other = "other"


class Contact(BaseModel):
    email: str | None = None
    note: str = Field(max_length=40)


class Ticket(BaseModel):
    category: Category
    priority: Literal["low", "medium", "high", "urgent"]
    sentiment: Literal["positive", "negative", "neutral"]
    escalate: bool
    summary: str = Field(min_length=5, max_length=80)
    tags: list[str] = Field(min_length=1, max_length=3)
    confidence: float = Field(ge=0, le=1)
    follow_up_days: int = Field(ge=1, le=14)
    contact: Contact | None = None
    due: date | None = None


SCHEMA = anthropic.transform_schema(Ticket)
SYSTEM = (
    "You triage support tickets. Categories: billing (invoices, refunds), account_access (login, "
    "password), bug (errors, crashes), feature_request, shipping (delivery, tracking), other."
)
FEW_SHOT = [
    {"role": "user", "content": "My parcel never arrived and tracking is stuck."},
    {
        "role": "assistant",
        "content": json.dumps(
            {
                "category": "shipping",
                "priority": "high",
                "sentiment": "negative",
                "escalate": False,
                "summary": "Parcel never arrived.",
                "tags": ["parcel"],
                "confidence": 0.9,
                "follow_up_days": 2,
            }
        ),
    },
]

CASES = {
    "invoice": ("Hi, my last invoice charged me twice for the same month. Can you refund one?", "billing"),
    "login": (
        "I can't log in: the password reset link says it expired and I'm locked out.",
        "account_access",
    ),
    "crash": ("The desktop app crashes with an error every time I open the reports page.", "bug"),
    "feature": (
        "It would be great if you could add a dark mode. Just a suggestion, no rush.",
        "feature_request",
    ),
    "shipping": ("My package was shipped ten days ago but the courier tracking shows nothing.", "shipping"),
}


def _structured_params(text: str) -> dict[str, Any]:
    return {
        "model": "claude-fable-5",
        "max_tokens": 1024,
        "system": SYSTEM,
        "messages": [*FEW_SHOT, {"role": "user", "content": f"Ticket:\n{text}"}],
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}},
    }


@pytest.fixture(scope="module")
def structured_results(client: anthropic.Anthropic) -> dict[str, Any]:
    requests = [{"custom_id": cid, "params": _structured_params(text)} for cid, (text, _) in CASES.items()]
    batch = client.messages.batches.create(requests=requests)
    client.messages.batches.retrieve(batch.id)
    return {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}


@pytest.mark.parametrize("custom_id", list(CASES))
def test_answer_validates_and_follows_evidence(structured_results: dict[str, Any], custom_id: str) -> None:
    result = structured_results[custom_id]
    assert result.type == "succeeded"
    message = result.message
    assert message.stop_reason == "end_turn"
    ticket = Ticket.model_validate_json(message.content[0].text)
    assert ticket.category.value == CASES[custom_id][1]


def test_invoice_ticket_is_billing_despite_shipping_few_shot(structured_results: dict[str, Any]) -> None:
    ticket = Ticket.model_validate_json(structured_results["invoice"].message.content[0].text)
    assert ticket.category is Category.billing
    assert ticket.summary.startswith("Hi, my last invoice charged me twice")


def test_priority_sentiment_and_escalation_evidence(client: anthropic.Anthropic) -> None:
    angry = "Our production is down, this outage is unacceptable! I'm furious and talking to our lawyer. Fix it asap."
    calm = "Whenever you have time: a minor typo on the pricing page. No rush, thanks, great product!"
    batch = client.messages.batches.create(
        requests=[
            {"custom_id": "angry", "params": _structured_params(angry)},
            {"custom_id": "calm", "params": _structured_params(calm)},
        ]
    )
    client.messages.batches.retrieve(batch.id)
    tickets = {
        r.custom_id: Ticket.model_validate_json(r.result.message.content[0].text)
        for r in client.messages.batches.results(batch.id)
    }
    assert tickets["angry"].priority == "urgent"
    assert tickets["angry"].sentiment == "negative"
    assert tickets["angry"].escalate is True
    assert tickets["calm"].priority == "low"
    assert tickets["calm"].sentiment == "positive"
    assert tickets["calm"].escalate is False


def test_no_evidence_is_stable_and_prefers_fallback_labels(client: anthropic.Anthropic) -> None:
    params = _structured_params("Hello.")
    first = client.messages.create(**params).content[0].text
    second = client.messages.create(**params).content[0].text
    assert first == second
    ticket = Ticket.model_validate_json(first)
    assert ticket.category is Category.other
    assert ticket.priority == "medium"
    assert ticket.sentiment == "neutral"


def test_sdk_parse_helper_works(client: anthropic.Anthropic) -> None:
    parsed = client.messages.parse(
        model="claude-fable-5",
        max_tokens=1024,
        messages=[{"role": "user", "content": CASES["invoice"][0]}],
        output_format=Ticket,
    )
    assert isinstance(parsed.parsed_output, Ticket)
    assert parsed.parsed_output.category is Category.billing


class Refund(BaseModel):
    order_id: str = Field(min_length=3, max_length=20)
    amount: float = Field(gt=0, lt=10_000)
    reason: Literal["duplicate_charge", "damaged_item", "late_delivery", "other"]
    notify_customer: bool


def test_forced_tool_gets_tool_use_with_valid_input(client: anthropic.Anthropic) -> None:
    tool = {
        "name": "issue_refund",
        "description": "Refund an order.",
        "input_schema": Refund.model_json_schema(),  # untransformed: exclusive bounds, lengths
    }
    message = client.messages.create(
        **text_params("I was billed twice (duplicate charge) for order 1234, please refund me."),
        tools=[tool],
        tool_choice={"type": "tool", "name": "issue_refund"},
    )
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use"
    assert block.name == "issue_refund"
    assert block.id.startswith("toolu_")
    refund = Refund.model_validate(block.input)
    assert refund.reason == "duplicate_charge"


def test_forced_tool_in_a_batch(client: anthropic.Anthropic) -> None:
    tool = {"name": "issue_refund", "input_schema": anthropic.transform_schema(Refund)}
    params = text_params(
        "The item arrived damaged, refund please.",
        tools=[tool],
        tool_choice={"type": "tool", "name": "issue_refund"},
    )
    batch = client.messages.batches.create(requests=[{"custom_id": "t1", "params": params}])
    client.messages.batches.retrieve(batch.id)
    (result,) = list(client.messages.batches.results(batch.id))
    block = result.result.message.content[0]
    assert block.type == "tool_use"
    assert Refund.model_validate(block.input).reason == "damaged_item"


def test_tool_choice_naming_a_missing_tool_is_errored(client: anthropic.Anthropic) -> None:
    params = text_params("x", tools=[{"name": "a", "input_schema": {"type": "object"}}])
    params["tool_choice"] = {"type": "tool", "name": "b"}
    batch = client.messages.batches.create(requests=[{"custom_id": "t", "params": params}])
    client.messages.batches.retrieve(batch.id)
    (result,) = list(client.messages.batches.results(batch.id))
    assert result.result.type == "errored"
    assert "tool_choice" in result.result.error.error.message


def test_small_max_tokens_truncates_like_the_api(client: anthropic.Anthropic) -> None:
    params = _structured_params(CASES["invoice"][0])
    params["max_tokens"] = 5
    message = client.messages.create(**params)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5
    with pytest.raises(ValueError):
        json.loads(message.content[0].text)

"""Decide, for every result line, whether the answer is accepted or rejected and why.

An answer is accepted only if it parses as JSON and validates against the job's pydantic output
model, including the model's own cross-field invariants (``model_validator``). Everything else is
rejected with a short machine-friendly ``reason`` (for grouping and reruns) and a human ``detail``
naming the field and the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.results import (
    CANCELED,
    ERRORED,
    EXPIRED,
    SUCCEEDED,
    BatchResult,
    Usage,
)

#: Reasons a rerun might fix (transient API trouble) versus ones that need a human or a prompt fix.
RETRYABLE_REASONS = frozenset({"errored", "expired", "canceled", "truncated"})


@dataclass(slots=True)
class Accepted:
    record_id: str
    data: dict[str, Any]
    usage: Usage


@dataclass(slots=True)
class Rejected:
    record_id: str
    reason: str
    detail: str
    raw: str | None
    usage: Usage

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE_REASONS


Outcome = Accepted | Rejected


def _describe(exc: ValidationError) -> tuple[str, str]:
    """Turn a pydantic ValidationError into (reason, detail) naming field and rule."""
    parts = []
    reason = "schema"
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<model>"
        if not err.get("loc"):
            reason = "invariant"
        got = err.get("input")
        got_txt = "" if loc == "<model>" else f" (got {json.dumps(got, default=str)[:60]})"
        parts.append(f"{loc}: {err.get('msg')}{got_txt}")
    return reason, "; ".join(parts)


def validate_result(result: BatchResult, output_model: type[BaseModel]) -> Outcome:
    """Classify one parsed result line against the output model."""
    record_id = ids.decode(result.custom_id)
    usage = result.usage
    if result.type == ERRORED:
        detail = f"{result.error_type or 'error'}: {result.error_message or 'no message'}"
        return Rejected(record_id, "errored", detail, None, usage)
    if result.type in (EXPIRED, CANCELED):
        return Rejected(record_id, result.type, f"request {result.type} before processing", None, usage)
    if result.type != SUCCEEDED:
        return Rejected(record_id, "unknown_result", f"result type {result.type!r}", None, usage)
    raw = result.text
    if result.stop_reason == "refusal":
        return Rejected(record_id, "refusal", "the model declined to answer", raw, usage)
    if result.stop_reason == "max_tokens":
        return Rejected(record_id, "truncated", "answer cut off at max_tokens; raise max_tokens", raw, usage)
    if result.tool_input is not None:
        raw = json.dumps(result.tool_input, ensure_ascii=False)
    elif raw is None or not raw.strip():
        return Rejected(record_id, "empty_answer", "the answer has no text", raw, usage)
    try:
        # Strict JSON validation: "yes" is not a boolean and 2.5 is not an integer.
        instance = output_model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            return Rejected(record_id, "invalid_json", f"answer is not JSON: {errors[0]['msg']}", raw, usage)
        reason, detail = _describe(exc)
        return Rejected(record_id, reason, detail, raw, usage)
    return Accepted(record_id, instance.model_dump(mode="json", by_alias=True), usage)

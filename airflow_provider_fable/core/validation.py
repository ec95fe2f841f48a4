"""Decide, for every result line, whether the answer is accepted or rejected and why.

An answer is accepted only if it parses as JSON and validates against the job's pydantic output
model, including the model's own cross-field invariants (``model_validator``). Everything else is
rejected with a short machine-friendly ``reason`` (for grouping and reruns) and a human ``detail``
naming the field and the rule.

Speed matters here (a result file can hold millions of answers): the model's compiled validator
and serializer are looked up once per model and called directly, the answer text is validated
straight from its JSON, and the accepted data is the serializer's JSON-mode output (enums as
values, Decimals as exact strings, nested values as plain lists/dicts) ready for the sinks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
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

#: Reasons a rerun might fix: transient API trouble, and answers the model may get right when
#: asked again (sampling varies: broken JSON, a wrong enum, a violated invariant, a cut answer).
#: Not retryable: ``refusal`` (the model declined: the prompt or record needs a human),
#: ``unknown_result`` and ``unstorable`` (a valid answer the destination column cannot hold: the
#: same answer would fail again; fix the table or the model's field types).
RETRYABLE_REASONS = frozenset(
    {"errored", "expired", "canceled", "truncated", "invalid_json", "empty_answer", "schema", "invariant"}
)


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


class _Compiled:
    """The output model's pydantic-core validator and serializer, fetched once per model.

    ``model_validate_json`` + ``model_dump`` cost about twice as much per call as the compiled
    objects they wrap; over a million answers that is seconds.
    """

    __slots__ = ("validate_json", "to_python")

    def __init__(self, output_model: type[BaseModel]) -> None:
        self.validate_json = output_model.__pydantic_validator__.validate_json
        self.to_python = output_model.__pydantic_serializer__.to_python


_COMPILED: dict[type[BaseModel], _Compiled] = {}


def _compiled(output_model: type[BaseModel]) -> _Compiled:
    compiled = _COMPILED.get(output_model)
    if compiled is None:
        compiled = _COMPILED[output_model] = _Compiled(output_model)
    return compiled


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
    kind = result.type
    if kind != SUCCEEDED:
        if kind == ERRORED:
            detail = f"{result.error_type or 'error'}: {result.error_message or 'no message'}"
            return Rejected(record_id, "errored", detail, None, usage)
        if kind in (EXPIRED, CANCELED):
            return Rejected(record_id, kind, f"request {kind} before processing", None, usage)
        return Rejected(record_id, "unknown_result", f"result type {kind!r}", None, usage)
    raw = result.text
    stop = result.stop_reason
    if stop == "refusal":
        return Rejected(record_id, "refusal", "the model declined to answer", raw, usage)
    if stop == "max_tokens":
        return Rejected(record_id, "truncated", "answer cut off at max_tokens; raise max_tokens", raw, usage)
    if result.tool_input is not None:
        # Strict mode only accepts enum members as JSON strings, so tool input is validated as
        # JSON too (orjson makes that round trip cheap; tool answers are the rare path).
        try:
            raw = orjson.dumps(result.tool_input).decode()
        except orjson.JSONEncodeError:  # beyond orjson (ints over 64 bits, lone surrogates)
            raw = json.dumps(result.tool_input, ensure_ascii=False)
    elif raw is None or not raw.strip():
        return Rejected(record_id, "empty_answer", "the answer has no text", raw, usage)
    compiled = _compiled(output_model)
    try:
        # Strict JSON validation: "yes" is not a boolean and 2.5 is not an integer.
        instance = compiled.validate_json(raw, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            return Rejected(record_id, "invalid_json", f"answer is not JSON: {errors[0]['msg']}", raw, usage)
        reason, detail = _describe(exc)
        return Rejected(record_id, reason, detail, raw, usage)
    return Accepted(record_id, compiled.to_python(instance, mode="json", by_alias=True), usage)

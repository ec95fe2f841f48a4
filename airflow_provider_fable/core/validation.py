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
import math
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

import msgspec
import orjson
from pydantic import BaseModel, ValidationError

from airflow_provider_fable.core.results import (
    CANCELED,
    ERRORED,
    EXPIRED,
    MISSING,
    SUCCEEDED,
    UNPARSEABLE,
    BatchResult,
    Usage,
    error_type_retryable,
)

#: Reasons a rerun might fix: transient API trouble, and answers the model may get right when
#: asked again (sampling varies: broken JSON, a wrong enum, a violated invariant, a cut answer).
#: Also retryable: ``unparseable_result`` (the results file held a line for the record that is
#: not a result object) and ``missing_result`` (it held none): the answer was lost on the way.
#: Not retryable: ``refusal`` (the model declined: the prompt or record needs a human),
#: ``errored_not_retryable`` (an API error no retry can fix: invalid request, unknown model,
#: permission, authentication, billing; see ``results.ERROR_TYPE_RETRYABLE``),
#: ``unknown_result`` and ``unstorable`` (a valid answer the destination column cannot hold: the
#: same answer would fail again; fix the table or the model's field types).
RETRYABLE_REASONS = frozenset(
    {
        "errored", "expired", "canceled", "truncated", "invalid_json", "empty_answer", "schema",
        "invariant", "unparseable_result", "missing_result",
    }
)  # fmt: skip


class Accepted(msgspec.Struct):
    record_id: str
    data: dict[str, Any]
    usage: Usage


class Rejected(msgspec.Struct):
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
    objects they wrap; over a million answers that is seconds. ``dump`` is the JSON-mode dump:
    for a flat model of plain fields a generated attribute reader (``_attribute_dump``, half the
    serializer's cost: str enums otherwise go through ``Enum.value``'s Python property), checked
    against the serializer on the first instance; the serializer itself otherwise.
    """

    __slots__ = ("validate_json", "to_python", "fast", "dump")

    def __init__(self, output_model: type[BaseModel]) -> None:
        self.validate_json = output_model.__pydantic_validator__.validate_json
        self.to_python = output_model.__pydantic_serializer__.to_python
        self.fast = _attribute_dump(output_model)
        self.dump: Callable[[BaseModel], dict[str, Any]] = self._first_dump

    def _serialize(self, instance: BaseModel) -> dict[str, Any]:
        data: dict[str, Any] = self.to_python(instance, mode="json", by_alias=True)
        return data

    def _first_dump(self, instance: BaseModel) -> dict[str, Any]:
        """The serializer's dump; keeps the generated reader only if it gives the same dict."""
        data = self._serialize(instance)
        fast = self.fast
        if fast is not None and (mine := fast(instance)) == data and list(mine) == list(data):
            self.dump = fast
        else:
            self.fast = None  # something the reader does not know about: serializer only
            self.dump = self._serialize
        return data


def _plain_kind(annotation: Any, enum_values: bool) -> str | None:
    """How a field's value becomes its JSON-mode dump: "same", "enum", "float" or None (unknown)."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation, optional = args[0], True
    if annotation in (str, int, bool):
        return "same"
    if annotation is float:
        return "float"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        values = [m.value for m in annotation]
        if not all(type(v) in (str, int) for v in values):
            return None
        if enum_values:
            return "same"
        return "enum_opt" if optional else "enum"
    return None


def _attribute_dump(output_model: type[BaseModel]) -> Callable[[BaseModel], dict[str, Any]] | None:
    """A generated ``instance -> JSON-mode dict`` for flat models of str/int/bool/float/enum fields.

    None (use the serializer) for anything it might dump differently: other field types, custom
    serializers, computed or excluded fields, extra fields, non-default float rendering.
    """
    config = output_model.model_config
    decorators = output_model.__pydantic_decorators__
    if (
        config.get("extra") == "allow"
        or config.get("ser_json_inf_nan", "null") != "null"
        or output_model.model_computed_fields
        or decorators.field_serializers
        or decorators.model_serializers
        or getattr(output_model, "__pydantic_root_model__", False)
    ):
        return None
    enum_values = bool(config.get("use_enum_values"))
    parts = []
    for name, info in output_model.model_fields.items():
        if info.exclude or not name.isidentifier() or any(
            # constraints only (min_length, ge, pattern ...): they validate, they do not serialize
            type(m).__module__ != "annotated_types" and type(m).__name__ != "_PydanticGeneralMetadata"
            for m in info.metadata
        ):
            return None
        kind = _plain_kind(info.annotation, enum_values)
        if kind is None:
            return None
        key = info.serialization_alias or info.alias or name
        read = f"o.{name}"
        if kind == "enum":
            read = f"o.{name}._value_"
        elif kind == "enum_opt":
            read = f"(None if (v := o.{name}) is None else v._value_)"
        elif kind == "float":
            read = f"(v if (v := o.{name}) is None or _finite(v) else None)"
        parts.append(f"{key!r}: {read}")
    source = f"lambda o: {{{', '.join(parts)}}}"
    return eval(source, {"_finite": math.isfinite})  # type: ignore[no-any-return]  # noqa: S307 - built from identifiers


_COMPILED: dict[type[BaseModel], _Compiled] = {}


def _compiled(output_model: type[BaseModel]) -> _Compiled:
    compiled = _COMPILED.get(output_model)
    if compiled is None:
        compiled = _COMPILED[output_model] = _Compiled(output_model)
    return compiled


def _describe(exc: ValidationError, errors: list[Any] | None = None) -> tuple[str, str]:
    """Turn a pydantic ValidationError into (reason, detail) naming field and rule."""
    parts = []
    reason = "schema"
    for err in exc.errors(include_url=False) if errors is None else errors:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<model>"
        if not err.get("loc"):
            reason = "invariant"
        got = err.get("input")
        got_txt = "" if loc == "<model>" else f" (got {json.dumps(got, default=str)[:60]})"
        parts.append(f"{loc}: {err.get('msg')}{got_txt}")
    return reason, "; ".join(parts)


def validate_result(result: BatchResult, output_model: type[BaseModel]) -> Outcome:
    """Classify one parsed result line against the output model."""
    validate = _VALIDATORS.get(output_model)
    if validate is None:
        validate = _VALIDATORS[output_model] = validator_for(output_model)
    return validate(result)


_VALIDATORS: dict[type[BaseModel], Callable[[BatchResult], Outcome]] = {}


def validator_for(output_model: type[BaseModel]) -> Callable[[BatchResult], Outcome]:
    """``validate_result`` bound to one output model: what a load calls per line.

    The compiled validator and dump are looked up once instead of per line.
    """
    compiled = _compiled(output_model)
    validate_json = compiled.validate_json

    def validate(result: BatchResult) -> Outcome:
        # ``ids.decode`` without the ledger's mapping is the identity; the load operator maps
        # encoded custom_ids to record ids before results get here.
        record_id = result.custom_id
        usage = result.usage
        if result.type != SUCCEEDED:
            return _not_succeeded(result, record_id)
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
            except orjson.JSONEncodeError:  # beyond orjson (ints over 64 bits, lone surrogates, depth)
                try:
                    raw = json.dumps(result.tool_input, ensure_ascii=False)
                except RecursionError:  # nested deeper than any answer of the model can be
                    detail = "tool input nested too deeply to validate"
                    return Rejected(record_id, "invalid_json", detail, None, usage)
        elif not raw or raw.isspace():  # no text, or only whitespace (what ``strip`` removes)
            return Rejected(record_id, "empty_answer", "the answer has no text", raw, usage)
        try:
            # Strict JSON validation: "yes" is not a boolean and 2.5 is not an integer.
            instance = validate_json(raw, strict=True)
        except ValidationError as exc:
            return _invalid(exc, record_id, raw, usage)
        return Accepted(record_id, compiled.dump(instance), usage)

    return validate


def _not_succeeded(result: BatchResult, record_id: str) -> Rejected:
    kind, usage = result.type, result.usage
    if kind == ERRORED:
        detail = f"{result.error_type or 'error'}: {result.error_message or 'no message'}"
        reason = "errored" if error_type_retryable(result.error_type) else "errored_not_retryable"
        return Rejected(record_id, reason, detail, None, usage)
    if kind in (EXPIRED, CANCELED):
        return Rejected(record_id, kind, f"request {kind} before processing", None, usage)
    if kind == UNPARSEABLE:
        detail = f"the results file's line for this record is not a result object: {result.error_message}"
        return Rejected(record_id, "unparseable_result", detail[:500], None, usage)
    if kind == MISSING:
        detail = "the batch's results file has no line for this record (its answer was lost)"
        return Rejected(record_id, "missing_result", detail, None, usage)
    return Rejected(record_id, "unknown_result", f"result type {kind!r}", None, usage)


def _invalid(exc: ValidationError, record_id: str, raw: str, usage: Usage) -> Rejected:
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return Rejected(record_id, "invalid_json", f"answer is not JSON: {errors[0]['msg']}", raw, usage)
    reason, detail = _describe(exc, errors)  # ``errors()`` builds new dicts each call: once
    return Rejected(record_id, reason, detail, raw, usage)

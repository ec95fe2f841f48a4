"""The BatchJob spec: everything that turns one source record into one Messages request.

It is a pydantic model so a spec can be validated once, up front, before a single request is
built or paid for, and so it can be fingerprinted (the same spec + the same records must build
byte-identical requests, which is what makes retries and re-runs safe).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import string
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_provider_fable.core.errors import JobSpecError

DEFAULT_MODEL = "claude-sonnet-4-5"


def import_output_model(ref: type[BaseModel] | str) -> type[BaseModel]:
    """Resolve ``"package.module:Class"`` (or ``package.module.Class``) to a pydantic model class.

    Operators accept a dotted path so a DAG file can name its output model without importing
    it at parse time.
    """
    if isinstance(ref, type):
        if not issubclass(ref, BaseModel):
            raise JobSpecError(f"output_model {ref!r} is not a pydantic BaseModel subclass")
        return ref
    if not isinstance(ref, str) or not ref:
        raise JobSpecError(f"output_model must be a pydantic model class or a dotted path, got {ref!r}")
    module_name, _, attr = ref.partition(":") if ":" in ref else ref.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise JobSpecError(f"cannot import output_model {ref!r}: {exc}") from exc
    return import_output_model(obj)


def template_fields_of(template: str) -> list[str]:
    """Names used by a ``str.format`` template, e.g. ``"{subject}: {body}"`` -> subject, body."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise JobSpecError(
            f"prompt_template is not a valid format string ({exc}); write literal braces as {{{{ and }}}}"
        ) from exc
    names = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise JobSpecError("prompt_template must use named fields like {body}, not positional {}")
        names.append(field_name.split(".")[0].split("[")[0])
    return names


class FewShotExample(BaseModel):
    """One worked example: an input record and the answer we want for it."""

    model_config = ConfigDict(extra="forbid")

    record: dict[str, Any]
    answer: dict[str, Any]


class BatchJob(BaseModel):
    """Spec of one backlog job. Validated once; turned into requests by ``core.requests``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    prompt_template: str
    output_model: Any = Field(description="pydantic model class or dotted import path")
    id_field: str = "id"
    model: str = DEFAULT_MODEL
    system_prompt: str | None = None
    few_shot_examples: list[FewShotExample] = Field(default_factory=list)
    max_tokens: int = Field(default=1024, ge=1, le=128_000)
    #: Must stay unset: API version 2026-10-21, which the anthropic SDK 2.x sends, rejects
    #: ``temperature`` (even 0.0) with a 400, so every request of the batch would end errored.
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    cache_prompt_prefix: bool = True

    @field_validator("output_model")
    @classmethod
    def _resolve_output_model(cls, value: Any) -> type[BaseModel]:
        return import_output_model(value)

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if not value.strip():
            raise JobSpecError("prompt_template is empty")
        template_fields_of(value)
        return value

    @field_validator("temperature")
    @classmethod
    def _no_temperature(cls, value: float | None) -> float | None:
        # Refused here, before anything is paid for, rather than as N errored results later.
        if value is not None:
            raise JobSpecError(
                f"temperature={value}: the Messages API version 2026-10-21 (sent by anthropic SDK 2.x) "
                "rejects temperature, top_p and top_k, even at their defaults; leave temperature unset"
            )
        return value

    @model_validator(mode="after")
    def _check_examples(self) -> BatchJob:
        for i, example in enumerate(self.few_shot_examples):
            try:
                self.output_model.model_validate(example.answer)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise JobSpecError(
                    f"few_shot_examples[{i}].answer does not validate against "
                    f"{self.output_model.__name__}: {exc}"
                ) from exc
        return self

    @property
    def template_fields(self) -> list[str]:
        return template_fields_of(self.prompt_template)

    def output_schema(self) -> dict[str, Any]:
        """JSON schema of the output model, as pydantic emits it (before API transformation)."""
        return self.output_model.model_json_schema()

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes a request: same fingerprint, same requests."""
        payload = self.model_dump(exclude={"output_model"}, mode="json")
        payload["output_model"] = f"{self.output_model.__module__}.{self.output_model.__qualname__}"
        payload["output_schema"] = self.output_schema()
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

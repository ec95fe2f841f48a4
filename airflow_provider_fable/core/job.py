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
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_provider_fable.core.errors import JobSpecError

DEFAULT_MODEL = "claude-fable-5"

#: What to do with a record whose template field is missing, None or NaN (see ``core.requests``).
MissingFieldPolicy = Literal["error", "skip", "empty"]


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
    return list(_template_fields(template))


@lru_cache(maxsize=64)
def _template_fields(template: str) -> tuple[str, ...]:
    """Parsed once per template: every record's missing-field check asks for them."""
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
    return tuple(names)


def recursive_ref(schema: dict[str, Any]) -> list[str] | None:
    """The first ``$ref`` cycle of a JSON schema (definition names), or None when there is none.

    A self-referencing pydantic model (``children: list["Node"]``) has one; the Messages API
    refuses such a structured-output schema, so this is checked before anything is built or paid.
    """
    defs = {
        f"#/{key}/{name}": sub
        for key in ("$defs", "definitions")
        for name, sub in schema.get(key, {}).items()
    }

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for k, v in node.items() if k not in ("$defs", "definitions") for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    def walk(ref: str, stack: list[str]) -> list[str] | None:
        if ref in stack:
            return [r.rsplit("/", 1)[-1] for r in stack[stack.index(ref) :]] + [ref.rsplit("/", 1)[-1]]
        for nxt in refs(defs.get(ref, {})):
            found = walk(nxt, [*stack, ref])
            if found:
                return found
        return None

    for ref in refs(schema):
        found = walk(ref, [])
        if found:
            return found
    return None


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
    #: TTL of the shared prefix's cache entry. A batch runs for minutes to hours, longer than the
    #: 5-minute default, so "1h" keeps the prefix cached across the whole batch (writes cost 2x
    #: input instead of 1.25x, reads 0.1x either way).
    cache_ttl: Literal["5m", "1h"] = "1h"
    #: A missing/None/NaN template field: ``error`` (default) fails before anything is paid for,
    #: ``skip`` leaves the record out (reported), ``empty`` renders it as an empty string.
    on_missing_field: MissingFieldPolicy = "error"

    @field_validator("output_model")
    @classmethod
    def _resolve_output_model(cls, value: Any) -> type[BaseModel]:
        model = import_output_model(value)
        cycle = recursive_ref(model.model_json_schema())
        if cycle:
            raise JobSpecError(
                f"output_model {model.__name__} is recursive ({' -> '.join(cycle)}): the API's "
                "structured outputs do not support recursive schemas, so every request would end "
                "errored. Bound the nesting with distinct models (e.g. Node -> ChildNode -> LeafNode)"
            )
        return model

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if not value.strip():
            raise JobSpecError("prompt_template is empty")
        template_fields_of(value)
        return value

    @field_validator("prompt_template", "system_prompt")
    @classmethod
    def _check_encodable(cls, value: str | None, info: Any) -> str | None:
        """A lone surrogate in shared text would fail every request at the spool, naming nothing."""
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
                raise JobSpecError(
                    f"{info.field_name} has {bad} at character {exc.start}: a lone surrogate that "
                    "cannot be encoded as UTF-8"
                ) from None
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
        schema: dict[str, Any] = self.output_model.model_json_schema()
        return schema

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes a request: same fingerprint, same requests.

        The output model counts by its JSON schema (what the request sends), never by its
        ``__module__``: Airflow names a DAG file's module after the file's absolute path
        (``unusual_prefix_<sha1(path)>_<stem>``), so the same DAG mounted elsewhere on another
        worker, or a new versioned-bundle path, would otherwise become a new job and pay again.
        """
        payload = self.model_dump(exclude={"output_model"}, mode="json")
        payload["output_schema"] = self.output_schema()
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def legacy_fingerprint(self) -> str:
        """The fingerprint of provider versions before issue #18 (it hashed the model's module path).

        Only used to find jobs an older provider registered, so their in-flight batches are
        re-attached instead of paid again (``Ledger.resolve_job``).
        """
        payload = self.model_dump(exclude={"output_model"}, mode="json")
        payload["output_model"] = f"{self.output_model.__module__}.{self.output_model.__qualname__}"
        payload["output_schema"] = self.output_schema()
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

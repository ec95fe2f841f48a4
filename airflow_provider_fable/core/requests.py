"""Record -> Message Batches request (``{"custom_id", "params"}``).

The output schema goes out as structured output (``output_config.format`` with a JSON schema
transformed by the SDK's ``transform_schema``), so the model is constrained to the shape the
validator will check. The shared prefix (system prompt + few-shot turns) carries a
``cache_control`` breakpoint: across thousands of requests it is written once and read cheaply.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.errors import RecordError
from airflow_provider_fable.core.job import BatchJob, template_fields_of
from airflow_provider_fable.core.unique_ids import UniqueIds


def cache_control(job: BatchJob) -> dict[str, str]:
    """The breakpoint marker for the shared prefix, with the job's TTL ("5m" or "1h")."""
    return {"type": "ephemeral", "ttl": job.cache_ttl}


@lru_cache(maxsize=32)
def _api_schema(schema_json: str) -> dict[str, Any]:
    from anthropic import transform_schema  # lazy: the SDK is heavy to import

    return transform_schema(json.loads(schema_json))


def api_output_schema(job: BatchJob) -> dict[str, Any]:
    """The output model's schema in the form the API accepts for structured output."""
    return _api_schema(json.dumps(job.output_schema(), sort_keys=True))


def is_missing(value: Any) -> bool:
    """None, NaN (float or numpy) and pandas' NA/NaT: a value that carries nothing to ask about."""
    if value is None:
        return True
    if value.__class__ is str:  # the usual field: decided without the numeric checks
        return False
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return bool(value != value)
        except (TypeError, ValueError):  # pragma: no cover - exotic numeric types
            return False
    return type(value).__name__ in ("NAType", "NaTType")


@lru_cache(maxsize=64)
def _unique_fields(template: str) -> tuple[str, ...]:
    """A template's fields, each once, in order: asked for every record (parsed once per template)."""
    return tuple(dict.fromkeys(template_fields_of(template)))


def missing_template_fields(job: BatchJob, record: Mapping[str, Any]) -> list[str]:
    """Template fields the record lacks or holds as None/NaN, in template order."""
    return [f for f in _unique_fields(job.prompt_template) if f not in record or is_missing(record[f])]


def render_prompt(job: BatchJob, record: Mapping[str, Any], record_id: Any = None) -> str:
    """Fill the prompt template from the record, naming the record and field when one is missing.

    A field that is absent, None or NaN would render as "" or "nan": the model would then answer
    about nothing and the answer would pass validation. Unless the job says ``on_missing_field=
    "empty"``, that is an error here, before anything is paid for. (``"skip"`` is decided by
    :func:`build_requests`, which leaves such records out before calling this.)
    """
    missing = missing_template_fields(job, record)
    if missing and job.on_missing_field != "empty":
        field = missing[0]
        state = "has no such field" if field not in record else f"has {field}={record[field]!r}"
        raise RecordError(
            record_id,
            "template.missing_field",
            f"prompt_template uses {{{field}}} but the record {state} (fields: "
            f"{', '.join(sorted(map(str, record)))}); fix the source, or pass "
            'on_missing_field="skip" or "empty"',
        )
    try:
        # The view (a copy of the record that renders None/NaN as "") only when there is
        # such a value to render: every other record formats straight from its own mapping.
        prompt = job.prompt_template.format_map(_RecordView(record) if missing else record)
    except KeyError as exc:
        raise RecordError(
            record_id,
            "template.missing_field",
            f"prompt_template uses {{{exc.args[0]}}} but the record has no such field "
            f"(fields: {', '.join(sorted(map(str, record)))})",
        ) from None
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise RecordError(record_id, "template.format", f"cannot fill prompt_template: {exc}") from None
    _check_encodable(job, record, record_id, prompt)
    return prompt


def _check_encodable(job: BatchJob, record: Mapping[str, Any], record_id: Any, prompt: str) -> None:
    """A lone surrogate (legal in JSON text, e.g. ``"\\ud800"``) cannot be sent as UTF-8.

    Found here it is a record error naming the field and the character, instead of a raw
    UnicodeEncodeError from the spool writer that names no record at all.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f"character {exc.start} of the prompt"
        for name in dict.fromkeys(job.template_fields):
            value = record.get(name)
            text = value if isinstance(value, str) else str(value)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as inner:
                where = f"field {name!r}, character {inner.start}"
                break
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
        raise RecordError(
            record_id,
            "text.unencodable",
            f"{where} is {bad}, a lone surrogate that cannot be encoded as UTF-8; "
            "fix the source text (it usually comes from a broken emoji or a bad \\u escape)",
        ) from None


class _RecordView(dict[str, Any]):
    """Record view for ``format_map``: a missing value (None/NaN) renders as an empty string.

    Only reached for such values under ``on_missing_field="empty"``; otherwise they were refused.
    """

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        return "" if is_missing(value) else value


def prefix_messages(job: BatchJob) -> list[dict[str, Any]]:
    """Few-shot turns shared by every request (user record -> assistant JSON answer)."""
    turns: list[dict[str, Any]] = []
    for example in job.few_shot_examples:
        turns.append({"role": "user", "content": render_prompt(job, example.record, "few_shot")})
        answer = job.output_model.model_validate(example.answer).model_dump(mode="json", by_alias=True)
        turns.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    if turns and job.cache_prompt_prefix:
        last = turns[-1]
        last["content"] = [{"type": "text", "text": last["content"], "cache_control": cache_control(job)}]
    return turns


def base_params(job: BatchJob) -> dict[str, Any]:
    """Params every request of the job shares; built once per job, not once per record."""
    params: dict[str, Any] = {
        "model": job.model,
        "max_tokens": job.max_tokens,
        "output_config": {"format": {"type": "json_schema", "schema": api_output_schema(job)}},
    }
    if job.temperature is not None:
        params["temperature"] = job.temperature
    if job.system_prompt:
        block: dict[str, Any] = {"type": "text", "text": job.system_prompt}
        # With few-shot turns the breakpoint sits on the last example, covering the system too.
        if job.cache_prompt_prefix and not job.few_shot_examples:
            block["cache_control"] = cache_control(job)
        params["system"] = [block]
    return params


def build_request(
    job: BatchJob,
    record: Mapping[str, Any],
    *,
    shared: dict[str, Any] | None = None,
    prefix: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One request for one record. ``shared``/``prefix`` let callers reuse per-job parts."""
    if job.id_field not in record:
        raise RecordError(None, "id.missing", f"record has no id field {job.id_field!r}")
    record_id = record[job.id_field]
    custom_id = ids.encode(record_id)
    params = dict(shared if shared is not None else base_params(job))
    turns = prefix if prefix is not None else prefix_messages(job)
    params["messages"] = [*turns, {"role": "user", "content": render_prompt(job, record, record_id)}]
    return {"custom_id": custom_id, "params": params}


@dataclass
class SkippedRecord:
    """A record left out under ``on_missing_field="skip"``: reported, never silently dropped."""

    record_id: Any
    position: int
    fields: list[str]

    def as_dict(self) -> dict[str, Any]:
        record_id = (
            self.record_id if isinstance(self.record_id, (str, int, type(None))) else str(self.record_id)
        )
        return {"record_id": record_id, "position": self.position, "fields": self.fields}


def build_requests(
    job: BatchJob,
    records: Iterable[Mapping[str, Any]],
    *,
    skipped: list[SkippedRecord] | None = None,
) -> Iterator[dict[str, Any]]:
    """Requests for many records, checking custom_id uniqueness across the whole run.

    Under ``on_missing_field="skip"`` a record with a missing template field is left out and
    appended to ``skipped`` (pass a list to see them; the submit operator reports them).
    """
    shared = base_params(job)
    prefix = prefix_messages(job)
    seen = UniqueIds()  # ~12 bytes a native id (core.unique_ids), not a dict entry
    id_field = job.id_field
    try:
        for position, record in enumerate(records, 1):
            if job.on_missing_field == "skip":
                missing = missing_template_fields(job, record)
                if missing:
                    if skipped is not None:
                        skipped.append(SkippedRecord(record.get(id_field), position, missing))
                    continue
            try:
                request = build_request(job, record, shared=shared, prefix=prefix)
            except RecordError as exc:
                raise exc.at(position) from None
            seen.add(request["custom_id"], position, record.get(id_field))
            yield request
        seen.finish()
    finally:
        seen.close()  # a source abandoned half way leaves no spilled bucket files behind

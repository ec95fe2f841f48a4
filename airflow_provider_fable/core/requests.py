"""Record -> Message Batches request (``{"custom_id", "params"}``).

The output schema goes out as structured output (``output_config.format`` with a JSON schema
transformed by the SDK's ``transform_schema``), so the model is constrained to the shape the
validator will check. The shared prefix (system prompt + few-shot turns) carries a
``cache_control`` breakpoint: across thousands of requests it is written once and read cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.errors import RecordError
from airflow_provider_fable.core.job import BatchJob

_CACHE = {"type": "ephemeral"}


@lru_cache(maxsize=32)
def _api_schema(schema_json: str) -> dict[str, Any]:
    from anthropic import transform_schema  # lazy: the SDK is heavy to import

    return transform_schema(json.loads(schema_json))


def api_output_schema(job: BatchJob) -> dict[str, Any]:
    """The output model's schema in the form the API accepts for structured output."""
    return _api_schema(json.dumps(job.output_schema(), sort_keys=True))


def render_prompt(job: BatchJob, record: Mapping[str, Any], record_id: Any = None) -> str:
    """Fill the prompt template from the record, naming the record and field when one is missing."""
    try:
        return job.prompt_template.format_map(_RecordView(record))
    except KeyError as exc:
        raise RecordError(
            record_id,
            "template.missing_field",
            f"prompt_template uses {{{exc.args[0]}}} but the record has no such field "
            f"(fields: {', '.join(sorted(map(str, record)))})",
        ) from None
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise RecordError(record_id, "template.format", f"cannot fill prompt_template: {exc}") from None


class _RecordView(dict):
    """Record view for ``format_map``: None renders as an empty string rather than 'None'."""

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        return "" if value is None else value


def prefix_messages(job: BatchJob) -> list[dict[str, Any]]:
    """Few-shot turns shared by every request (user record -> assistant JSON answer)."""
    turns: list[dict[str, Any]] = []
    for example in job.few_shot_examples:
        turns.append({"role": "user", "content": render_prompt(job, example.record, "few_shot")})
        answer = job.output_model.model_validate(example.answer).model_dump(mode="json", by_alias=True)
        turns.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    if turns and job.cache_prompt_prefix:
        last = turns[-1]
        last["content"] = [{"type": "text", "text": last["content"], "cache_control": _CACHE}]
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
            block["cache_control"] = _CACHE
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


def build_requests(job: BatchJob, records: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """Requests for many records, checking custom_id uniqueness across the whole run."""
    shared = base_params(job)
    prefix = prefix_messages(job)
    seen: dict[str, str] = {}
    for position, record in enumerate(records, 1):
        try:
            request = build_request(job, record, shared=shared, prefix=prefix)
        except RecordError as exc:
            raise exc.at(position) from None
        custom_id = request["custom_id"]
        if custom_id in seen:
            real = ids.record_id_text(record.get(job.id_field))
            if seen[custom_id] == real:
                raise RecordError(real, "custom_id.duplicate", "two source records share this id", position)
            raise RecordError(
                real,
                "custom_id.collision",
                f"its custom_id {custom_id!r} is also the custom_id of record {seen[custom_id]!r}",
                position,
            )
        seen[custom_id] = ids.record_id_text(record.get(job.id_field))
        yield request

"""FableBatchSubmitOperator: source records -> one request per record -> Message Batches.

Every request is built and checked before the first batch is created, so a bad record (missing
id, id unusable as custom_id, a field the template needs) fails the task before anything is
paid for, with the record and the rule named. Requests are split into batches under the API's
limits (100,000 requests / 256 MB). The task returns a small manifest for XCom.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from airflow.sdk import BaseHook, BaseOperator

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.job import DEFAULT_MODEL, BatchJob
from airflow_provider_fable.core.requests import build_requests
from airflow_provider_fable.core.sharding import MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH, shard_requests
from airflow_provider_fable.core.sources import iter_records, iter_sql
from airflow_provider_fable.hooks.fable import FableHook


def sqlalchemy_engine(conn_id: str) -> Any:
    """A SQLAlchemy engine for any Airflow SQL connection (sqlite, postgres, ...)."""
    hook = BaseHook.get_connection(conn_id).get_hook()
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise FableError(
            f"connection {conn_id!r} is not a SQL connection (its hook has no SQLAlchemy engine)"
        )
    return hook.get_sqlalchemy_engine()


class FableBatchSubmitOperator(BaseOperator):
    """Submit one Messages request per source record as Message Batches.

    Records come from exactly one of ``records`` (list of dicts, DataFrame, or a .csv/.jsonl path)
    or ``sql`` run on ``sql_conn_id``.

    :param prompt_template: ``str.format`` template filled from each record, e.g. ``"{subject}\\n{body}"``.
    :param output_model: pydantic model (or dotted path) of the answer; sent as structured output.
    :param id_field: record field whose value becomes the ``custom_id``.
    :param system_prompt: system prompt shared by every request (cached when long enough).
    :param few_shot_examples: ``[{"record": {...}, "answer": {...}}]`` turns placed before each record.
    :param model: model name; defaults to the connection's ``default_model`` extra, then ``claude-sonnet-4-5``.
    :param sql: query returning the records (templated). :param sql_conn_id: its connection.
    :param sql_parameters: bind parameters for ``sql`` (templated).
    :return: manifest ``{"batch_ids", "request_count", "model", "job_fingerprint", "shards"}``.
    """

    template_fields: Sequence[str] = ("sql", "sql_parameters")
    template_ext: Sequence[str] = (".sql",)
    ui_color = "#e8b594"

    def __init__(
        self,
        *,
        prompt_template: str,
        output_model: Any,
        id_field: str = "id",
        system_prompt: str | None = None,
        few_shot_examples: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int = 1024,
        temperature: float | None = 0.0,
        cache_prompt_prefix: bool = True,
        records: Any = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        sql_parameters: dict[str, Any] | None = None,
        fable_conn_id: str = FableHook.default_conn_name,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
        max_bytes_per_batch: int = MAX_BATCH_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (records is None) == (sql is None):
            raise ValueError(f"{self.task_id}: pass exactly one of records= or sql=")
        if sql is not None and not sql_conn_id:
            raise ValueError(f"{self.task_id}: sql= needs sql_conn_id=")
        self.prompt_template = prompt_template
        self.output_model = output_model
        self.id_field = id_field
        self.system_prompt = system_prompt
        self.few_shot_examples = few_shot_examples or []
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.cache_prompt_prefix = cache_prompt_prefix
        self.records = records
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.sql_parameters = sql_parameters
        self.fable_conn_id = fable_conn_id
        self.max_requests_per_batch = max_requests_per_batch
        self.max_bytes_per_batch = max_bytes_per_batch

    def build_job(self, hook: FableHook | None = None) -> BatchJob:
        model = self.model or (hook.default_model if hook else None) or DEFAULT_MODEL
        return BatchJob(
            prompt_template=self.prompt_template,
            output_model=self.output_model,
            id_field=self.id_field,
            model=model,
            system_prompt=self.system_prompt,
            few_shot_examples=self.few_shot_examples,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            cache_prompt_prefix=self.cache_prompt_prefix,
        )

    def iter_source(self) -> Iterator[dict[str, Any]]:
        if self.sql is not None:
            return iter_sql(sqlalchemy_engine(self.sql_conn_id), self.sql, self.sql_parameters)
        return iter_records(self.records)

    def execute(self, context: Any) -> dict[str, Any]:
        hook = FableHook(self.fable_conn_id)
        job = self.build_job(hook)
        # Build and check every request before paying for any of them.
        shards = list(
            shard_requests(
                build_requests(job, self.iter_source()),
                max_requests=self.max_requests_per_batch,
                max_bytes=self.max_bytes_per_batch,
            )
        )
        total = sum(len(s) for s in shards)
        if not total:
            self.log.warning("The source returned no records; nothing to submit")
            return {
                "batch_ids": [],
                "request_count": 0,
                "model": job.model,
                "job_fingerprint": job.fingerprint(),
                "shards": [],
            }
        self.log.info(
            "Submitting %d requests for model %s in %d batch(es) (job %s)",
            total,
            job.model,
            len(shards),
            job.fingerprint(),
        )
        created: list[dict[str, Any]] = []
        for n, shard in enumerate(shards, 1):
            try:
                batch = hook.create_batch(shard)
            except FableError as exc:
                done = [c["batch_id"] for c in created]
                raise FableError(
                    f"creating batch {n}/{len(shards)} failed after {len(done)} batch(es) were created "
                    f"({', '.join(done) or 'none'}); those are running and billed - do not resubmit "
                    f"their records. Cause: {exc}"
                ) from exc
            created.append({"batch_id": batch.id, "requests": len(shard)})
            self.log.info("Batch %d/%d: %s (%d requests)", n, len(shards), batch.id, len(shard))
        return {
            "batch_ids": [c["batch_id"] for c in created],
            "request_count": total,
            "model": job.model,
            "job_fingerprint": job.fingerprint(),
            "shards": created,
        }

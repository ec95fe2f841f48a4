"""FableBatchSubmitOperator: source records -> one request per record -> Message Batches.

Every request is built and checked before the first batch is created, so a bad record (missing
id, id unusable as custom_id, a field the template needs) fails the task before anything is
paid for, with the record and the rule named. Requests are split into batches under the API's
limits (100,000 requests / 256 MB) and spooled to a temporary file, so memory holds one shard at
a time, not the whole backlog. The task returns a small manifest for XCom.

Retry safety: creates are never retried blindly (see ``FableHook.create_batch``), but a task
retry after a partial submit would create new batches; until the submit ledger exists, give
this task ``retries=0`` (the example DAG does).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

from airflow.sdk import BaseOperator

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.job import DEFAULT_MODEL, BatchJob
from airflow_provider_fable.core.requests import build_requests
from airflow_provider_fable.core.sharding import MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH, shard_requests
from airflow_provider_fable.core.sources import iter_records, iter_sql
from airflow_provider_fable.hooks.fable import FableHook
from airflow_provider_fable.hooks.sql import sqlalchemy_engine
from airflow_provider_fable.links import FableBatchLink


class FableBatchSubmitOperator(BaseOperator):
    """Submit one Messages request per source record as Message Batches.

    Records come from exactly one of ``records`` (list of dicts, DataFrame, a .csv/.jsonl path, or
    a callable returning one of those, called at execute time) or ``sql`` run on ``sql_conn_id``.

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
    operator_extra_links = (FableBatchLink(),)

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

    def iter_source(self, engine: Any = None) -> Iterator[dict[str, Any]]:
        if self.sql is not None:
            return iter_sql(engine, self.sql, self.sql_parameters)
        return iter_records(self.records)

    def _spool(self, job: BatchJob, engine: Any, spool: IO[bytes]) -> list[tuple[int, int]]:
        """Build and check every request, writing shards to ``spool``; returns (offset, count) per shard.

        Only one shard is in memory at a time, and nothing is sent until every record has passed.
        """
        shards: list[tuple[int, int]] = []
        built = build_requests(job, self.iter_source(engine))
        for shard in shard_requests(
            built, max_requests=self.max_requests_per_batch, max_bytes=self.max_bytes_per_batch
        ):
            shards.append((spool.tell(), len(shard)))
            for request in shard:
                spool.write(json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode())
                spool.write(b"\n")
        return shards

    def execute(self, context: Any) -> dict[str, Any]:
        hook = FableHook(self.fable_conn_id)
        job = self.build_job(hook)
        engine = sqlalchemy_engine(self.sql_conn_id) if self.sql is not None else None
        try:
            with tempfile.TemporaryFile(prefix="fable-requests-") as spool:
                shards = self._spool(job, engine, spool)
                return self._submit(hook, job, spool, shards)
        finally:
            hook.close()
            if engine is not None:
                engine.dispose()

    def _submit(
        self, hook: FableHook, job: BatchJob, spool: IO[bytes], shards: list[tuple[int, int]]
    ) -> dict[str, Any]:
        total = sum(count for _, count in shards)
        manifest: dict[str, Any] = {
            "batch_ids": [],
            "request_count": total,
            "model": job.model,
            "job_fingerprint": job.fingerprint(),
            "shards": [],
        }
        if not total:
            self.log.warning("The source returned no records; nothing to submit")
            return manifest
        self.log.info(
            "Submitting %d requests for model %s in %d batch(es) (job %s)",
            total, job.model, len(shards), manifest["job_fingerprint"],
        )  # fmt: skip
        for n, (offset, count) in enumerate(shards, 1):
            spool.seek(offset)
            requests = [json.loads(spool.readline()) for _ in range(count)]
            try:
                batch = hook.create_batch(requests)
            except FableError as exc:
                done = manifest["batch_ids"]
                raise FableError(
                    f"creating batch {n}/{len(shards)} failed after {len(done)} batch(es) were created "
                    f"({', '.join(done) or 'none'}); those are running and billed - load them rather "
                    f"than resubmitting their records. Cause: {exc}"
                ) from exc
            manifest["batch_ids"].append(batch.id)
            manifest["shards"].append({"batch_id": batch.id, "requests": count})
            self.log.info("Batch %d/%d: %s (%d requests)", n, len(shards), batch.id, count)
        return manifest

"""FableValidateLoadOperator: stream batch results, validate each answer, load good rows.

Accepted rows are upserted on the record id (re-running the task loads nothing twice); every
other result goes to the rejects table with a reason and a detail naming the field and rule.
Rows are written in chunks as the results stream in, so a million-line result file never sits in
memory, and what was written before a failure stays written. The work itself is
``core.loading.load_batch``; this class only wires the connection and the database to it.

Ledger (see docs/ledger.md): for batches the submit operator recorded, result custom_ids are
mapped back to the real record ids (encoded ids), answers from a batch that is no longer a
record's current batch are dropped (an older batch never overwrites a newer answer), and every
record's verdict (accepted / rejected, reason, retryable) is written to the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_fable import DEFAULT_CONN_ID
from airflow_provider_fable.operators.guarded import LoadGuardrailsMixin, opt_int
from airflow_provider_fable.operators.observe import LineageLoadMixin, ObservedLoadMixin
from airflow_provider_fable.retries import fail_fast

if TYPE_CHECKING:  # imported where used, so parsing a DAG file that names this operator stays cheap
    from airflow.sdk import Context

    from airflow_provider_fable.core.ledger import Ledger
    from airflow_provider_fable.core.ledger_bulk import VerdictPipe
    from airflow_provider_fable.core.loading import LoadStats, RecordOutcome, ResultScreen
    from airflow_provider_fable.core.results import BatchResult
    from airflow_provider_fable.core.sinks import ResultSink
    from airflow_provider_fable.hooks.fable import FableHook


#: Seconds a failed batch load waits for the verdicts of its committed chunks (a ledger stuck on
#: a lock must not hold the error back).
_FAILED_VERDICTS_WAIT = 10.0


def _selected_results(
    results: Iterable[BatchResult], mapping: dict[str, str], selected: set[str], counter: list[int]
) -> Iterator[BatchResult]:
    """Results of records the submit run selected (a batch it shares with other records).

    A pilot whose sample sits in an older full batch re-attaches to it; its load must load the
    sample, not the whole batch. Results of other records are counted, not loaded: they belong
    to the run that created the batch, whose own load loads them.
    """
    for result in results:
        if mapping.get(result.custom_id, result.custom_id) not in selected:
            counter[0] += 1
            continue
        yield result


class FableValidateLoadOperator(ObservedLoadMixin, LineageLoadMixin, LoadGuardrailsMixin, BaseOperator):
    """Validate every result of the given batches and load them into a SQL database.

    :param batch_ids: ids, or the submit/sensor manifest (``{"batch_ids": [...]}``). Templated.
    :param output_model: the pydantic model the answers must satisfy (class or dotted path).
    :param destination_conn_id: Airflow SQL connection (sqlite or postgres).
    :param table: destination table, created from the output model if missing.
    :param id_column: primary-key column holding the record id.
    :param rejects_table: defaults to ``<table>_rejects``.
    :param id_column_type: ``"text"`` or ``"integer"`` for a new table's id column (match the
        source id so incremental queries compare like with like); default: follow an existing
        table, else text.
    :param max_reject_rate: fail the task (after loading) when rejects exceed this share. Not
        applied to a rerun of failed records (the submit manifest says ``rerun``): see
        ``max_reject_rate_rerun``.
    :param max_reject_rate_rerun: the reject-rate limit of a rerun (``rerun=`` in the submit
        manifest); default None: not checked, since a rerun sends exactly the records that failed
        and a high reject share is expected. Templated.
    :param needs_review_after: a record whose last N outcomes (this job and the jobs it reruns)
        are the same reject becomes ``needs_review`` in the ledger and no rerun sends it again
        (default 3; 0/None: never).
    :param max_share: ``{"field": {"value": share}}``: fail (after loading) when more than this
        share of accepted rows has the value, e.g. ``{"category": {"other": 0.15}}``. Templated
        (a share may be ``"{{ params.x }}"``; an empty/None share means no limit).
    :param min_share: same shape; fail when fewer than this share of accepted rows have the value.
    :param min_accepted: fail (after loading) when fewer rows were accepted.
    :param fail_when_all_rejected: fail when every result was rejected (default True).
    :param qa_size: rows in the QA review table ``<table>_qa`` (0 = no QA sample).
    :param qa_seed: seed of the QA sample (default: the submit's, else 0).
    :param qa_table: QA table name (default ``<table>_qa``).
    :param submit_manifest: the submit task's manifest (``submit.output``; templated): gives the
        estimate for "estimate vs actual" and the input excerpts for the QA table, and limits
        the load to that submit's records (a batch it shares with other records loads only its
        own; the rest are counted as ``not_selected``). An ``estimate_only`` manifest: nothing
        is loaded.
    :param prices: price overrides over the connection's ``prices`` extra and the default table.
    :param parquet_path: also (or, without ``destination_conn_id``, only) write the accepted rows
        to this Parquet file, streamed one row group per chunk: a local path, an fsspec URL
        (``s3://...``) or an ``ObjectStoragePath``. Needs the ``[parquet]`` extra. Templated.
    :param parquet_rejects_path: where to write the rejects as Parquet (optional). Templated.
    :param db_retry_seconds: how long a transient error of the ledger or the destination (refused
        or lost connection, server shutting down, SQLite file locked) is retried inside the task
        before it fails, as ``core.dbretry`` (default: ``FABLE_DB_RETRY_SECONDS``, else 75 s).
        With ``parquet_path`` a batch's load is not run again inside the task (the file would get
        its rows twice): the task fails and its retry writes the file anew.
    :return: counts, reject reasons, value distributions, token usage, cost, estimate, QA table;
        also pushed as XCom ``summary`` when a guardrail fails the task.
    """

    template_fields: Sequence[str] = (
        "batch_ids",
        "table",
        "rejects_table",
        "submit_manifest",
        "max_reject_rate",
        "max_reject_rate_rerun",
        "min_accepted",
        "max_share",
        "min_share",
        "parquet_path",
        "parquet_rejects_path",
    )
    ui_color = "#c6e0b4"

    def __init__(
        self,
        *,
        batch_ids: Any,
        output_model: Any,
        destination_conn_id: str | None = None,
        table: str | None = None,
        id_column: str = "id",
        rejects_table: str | None = None,
        fable_conn_id: str = DEFAULT_CONN_ID,
        chunk_size: int = 10_000,
        id_column_type: str | None = None,
        max_reject_rate: float | None = None,
        ledger_conn_id: str | None = None,
        max_share: dict[str, dict[str, float]] | None = None,
        min_share: dict[str, dict[str, float]] | None = None,
        min_accepted: int | None = None,
        fail_when_all_rejected: bool = True,
        qa_size: int = 50,
        qa_seed: int | None = None,
        qa_table: str | None = None,
        submit_manifest: Any = None,
        prices: dict[str, Any] | None = None,
        parquet_path: Any = None,
        parquet_rejects_path: Any = None,
        max_reject_rate_rerun: float | str | None = None,
        needs_review_after: int | None = 3,
        db_retry_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.db_retry_seconds = db_retry_seconds
        if destination_conn_id is None and parquet_path is None:
            raise ValueError("give destination_conn_id (a SQL table), parquet_path, or both")
        if destination_conn_id is not None and not table:
            raise ValueError("a SQL destination needs a table")
        self.parquet_path = parquet_path
        self.parquet_rejects_path = parquet_rejects_path
        self.ledger_conn_id = ledger_conn_id
        self.batch_ids = batch_ids
        self.output_model = output_model
        self.destination_conn_id = destination_conn_id
        self.table = table
        self.id_column = id_column
        self.rejects_table = rejects_table
        self.fable_conn_id = fable_conn_id
        self.chunk_size = chunk_size
        self.id_column_type = id_column_type
        # Guardrails (operators/guarded.py): checked after the rows are loaded.
        self.max_reject_rate = max_reject_rate
        self.max_share = max_share
        self.min_share = min_share
        self.min_accepted = min_accepted
        self.fail_when_all_rejected = fail_when_all_rejected
        self.qa_size = qa_size
        self.qa_seed = qa_seed
        self.qa_table = qa_table
        self.submit_manifest = submit_manifest
        self.prices = prices
        self.max_reject_rate_rerun = max_reject_rate_rerun
        self.needs_review_after = needs_review_after
        self._fable_default_outlets()  # lineage: an AssetAlias for the table (operators/observe.py)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_fable.core.job import import_output_model
        from airflow_provider_fable.hooks.fable import FableHook
        from airflow_provider_fable.hooks.ledger import open_ledger
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        with fail_fast():
            model_cls = import_output_model(self.output_model)
            self._check_guardrail_config(model_cls)
        hook = FableHook(self.fable_conn_id)
        from airflow_provider_fable.core.dbretry import retry_transient_db

        engine = sqlalchemy_engine(self.destination_conn_id) if self.destination_conn_id else None
        ledger = self._before_load(
            lambda: retry_transient_db(
                lambda: open_ledger(self.ledger_conn_id, self.fable_conn_id, self.log),
                what="opening the job ledger",
                budget=self.db_retry_seconds,
                logger=self.log,
            )
        )
        try:
            with fail_fast():  # a guardrail breach or a bad spec fails now, not after the retries
                return self._load(hook, engine, model_cls, ledger, context)
        finally:
            hook.close()
            if engine is not None:
                engine.dispose()
            ledger.engine.dispose()

    def _before_load(self, step: Any) -> Any:
        """``step()``; a database error there (after retries) says that nothing was loaded yet."""
        from airflow_provider_fable.core.dbretry import DatabaseUnavailableError, is_database_error, short

        try:
            return step()
        except Exception as exc:
            if not is_database_error(exc):
                raise
            raise DatabaseUnavailableError(
                f"the load could not start: database error ({short(exc)}). Nothing was loaded yet; "
                "the batches' results stay available, a retry of this task loads them."
            ) from exc

    def _with_parquet(self, sink: ResultSink | None, model_cls: Any) -> Any:
        """The sink ``load_batch`` writes to: the SQL table, a Parquet file, or both."""
        if self.parquet_path is None:
            return sink
        from airflow_provider_fable.core.parquet import ParquetSink, TeeSink

        lake = ParquetSink(
            self.parquet_path,
            id_column=self.id_column,
            output_model=model_cls,
            rejects_path=self.parquet_rejects_path,
            id_type=sink.id_type if sink is not None else self.id_column_type or "text",
        )
        return lake if sink is None else TeeSink(sink, lake)

    def _load(
        self, hook: FableHook, engine: Any, model_cls: Any, ledger: Ledger | None = None, context: Any = None
    ) -> dict[str, Any]:
        from airflow_provider_fable.core.cost import merge_prices
        from airflow_provider_fable.core.loading import LoadStats
        from airflow_provider_fable.core.manifest import normalise_batch_ids
        from airflow_provider_fable.core.sinks import ResultSink

        if self._is_estimate_only():
            self.log.info("The submit was estimate-only: no batch was created, nothing to load")
            return {"estimate_only": True, "records": 0, "accepted": 0, "rejected": 0, "cost_usd": 0.0}
        sink = None
        if engine is not None:
            sink = ResultSink(
                engine,
                table=self.table or "",
                id_column=self.id_column,
                output_model=model_cls,
                rejects_table=self.rejects_table,
                id_type=self.id_column_type,
            )
            from airflow_provider_fable.core.dbretry import retry_transient_db

            self._before_load(
                lambda: retry_transient_db(
                    sink.ensure_tables, what="preparing the destination tables", budget=self.db_retry_seconds,
                    logger=self.log,
                )
            )  # fmt: skip
        target = self._with_parquet(sink, model_cls)
        lake = getattr(target, "lake", target) if self.parquet_path is not None else None
        stats = LoadStats(prices=merge_prices(hook.price_overrides, self.prices))
        batch_ids = normalise_batch_ids(self.batch_ids)
        stale = [0]
        self._spend: dict[str, Any] = {"not_selected": [0], "actual": 0.0, "reattached": 0.0, "batches": []}
        try:
            self._load_batches(hook, model_cls, ledger, target, stats, stale)
        except BaseException:
            if lake is not None:
                lake.abort()  # no half-written file; the SQL rows already committed stay
            raise
        if lake is not None:
            lake.close()
        if stale[0]:
            self.log.warning(
                "Dropped %d answer(s) from batches that are no longer their record's current batch "
                "(a newer batch replaced them; loading them would overwrite newer answers)",
                stale[0],
            )
        summary = {
            **stats.summary(),
            "table": self.table if sink is not None else None,
            "rejects_table": sink.rejects.name if sink is not None else None,
            "stale_dropped": stale[0],
            **self._spend_summary(stats),
        }
        if self.parquet_path is not None:
            summary["parquet_path"] = str(self.parquet_path)
            if self.parquet_rejects_path is not None:
                summary["parquet_rejects_path"] = str(self.parquet_rejects_path)
        u = stats.usage
        self.log.info(
            "Loaded %d accepted rows into %s; %d rejected %s; tokens in=%d out=%d cache_write=%d "
            "cache_read=%d; cost $%s",
            stats.accepted, self.table or self.parquet_path, stats.rejected, dict(stats.reasons.most_common(5)),
            u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens,
            summary["cost_usd"],
        )  # fmt: skip
        self._fable_after_load(ledger, batch_ids, summary, context)  # operators/observe.py
        return self._finish_load(engine, sink, batch_ids, summary, context)

    def _load_batches(
        self,
        hook: FableHook,
        model_cls: Any,
        ledger: Ledger | None,
        target: Any,
        stats: LoadStats,
        stale: list[int],
    ) -> None:
        import copy

        from airflow_provider_fable.core.dbretry import (
            DatabaseUnavailableError,
            is_database_error,
            retry_transient_db,
            short,
        )
        from airflow_provider_fable.core.manifest import normalise_batch_ids

        loaded: list[str] = []
        for batch_id in normalise_batch_ids(self.batch_ids):
            # Records of this batch committed so far (this attempt): to the destination, to the ledger.
            committed = [0, 0, 0]  # [to the destination, to the ledger, counted at all]
            best = [0, 0, 0]  # the most any attempt of this batch committed
            before = (copy.deepcopy(stats.__dict__), stale[0])

            def again(
                before: tuple[dict[str, Any], int] = before,
                committed: list[int] = committed,
                best: list[int] = best,
            ) -> None:
                # A new attempt loads the whole batch again (idempotent upserts): undo its counts.
                stats.__dict__.update(copy.deepcopy(before[0]))
                stale[0] = before[1]
                # What an earlier attempt committed stays committed (the next one writes it again).
                best[:] = [max(best[0], committed[0]), max(best[1], committed[1]), max(best[2], committed[2])]
                committed[:] = [0, 0, 0]

            try:
                retry_transient_db(
                    lambda batch_id=batch_id, committed=committed: self._load_one(  # type: ignore[misc]
                        hook, model_cls, ledger, target, stats, stale, batch_id, committed
                    ),
                    what=f"loading batch {batch_id}",
                    # A Parquet file is a stream (row groups appended): a batch written twice
                    # would be there twice, so with one the task fails and its retry rewrites it.
                    budget=self.db_retry_seconds if self.parquet_path is None else 0,
                    on_retry=again,
                    logger=self.log,
                )
            except Exception as exc:
                if not is_database_error(exc):
                    raise
                done = ", ".join(loaded) if loaded else "none"
                rows, verdicts, counted = (max(a, b) for a, b in zip(best, committed, strict=True))
                of_batch = (
                    f"Of batch {batch_id}, {rows} record(s) were committed to the destination and "
                    f"{verdicts} verdict(s) to the job ledger before the error; they stay."
                    if counted  # counted through the ledger path's outcome reports
                    else f"Of batch {batch_id}, the chunks committed before the error stay committed."
                )
                raise DatabaseUnavailableError(
                    f"loading batch {batch_id} failed on a database error ({short(exc)}). Batches fully "
                    f"loaded before it: {done}. {of_batch} A retry of this task loads the batch again: "
                    "nothing is written twice and nothing is paid again."
                ) from exc
            loaded.append(batch_id)
            self.log.info(
                "Batch %s loaded; running totals: %d accepted, %d rejected",
                batch_id,
                stats.accepted,
                stats.rejected,
            )

    # -- issue #17: this submit's records only; each batch's cost counted once per job ----------
    def _load_manifest(self) -> dict[str, Any]:
        """The submit manifest this load serves: ``submit_manifest``, else ``batch_ids`` when it is one."""
        manifest = self._submit_manifest()
        if not manifest and isinstance(self.batch_ids, dict) and "job_fingerprint" in self.batch_ids:
            manifest = self.batch_ids
        return manifest

    def _is_estimate_only(self) -> bool:
        from airflow_provider_fable.core.manifest import flag

        return flag(self._load_manifest().get("estimate_only"), "estimate_only") or bool(
            isinstance(self.batch_ids, dict) and flag(self.batch_ids.get("estimate_only"), "estimate_only")
        )

    def _selection(self, ledger: Ledger, batch_id: str) -> set[str] | None:
        """The records the submit re-attached to ``batch_id`` when it shares it (None: load it whole)."""
        manifest = self._load_manifest()
        for shard in manifest.get("shards") or ():
            if shard.get("batch_id") == batch_id and shard.get("partial"):
                return ledger.selected_records(manifest["job_fingerprint"], manifest["run_key"], batch_id)
        return None

    def _count_spend(
        self,
        ledger: Ledger | None,
        submission: Any,
        batch_id: str,
        stats: LoadStats,
        cost_before: float | None,
        measured: ResultScreen,
        partial: bool,
    ) -> None:
        """New spend or already counted: the ledger counts each batch's cost once per job.

        The first load of a batch in its job counts it (and records the measured output tokens
        every later estimate of the job uses); any later load of it, typically a run that
        re-attached to it, reports its cost as ``reattached_cost_usd``, not new spend. A load of
        part of a shared batch (a pilot's sample) does not count it: the batch's own run does.
        """
        spend = self._spend
        cost = None if stats.cost_usd is None or cost_before is None else stats.cost_usd - cost_before
        new = True
        if submission is not None and ledger is not None:
            if partial:
                new = False
            else:
                manifest = self._load_manifest()
                new = ledger.count_batch_usage(
                    submission.job_id, batch_id, succeeded=measured.succeeded,
                    output_tokens=measured.output_tokens, cost_usd=cost, model=manifest.get("model"),
                    run_key=manifest.get("run_key") or submission.run_key, pilot=bool(manifest.get("pilot")),
                )  # fmt: skip
        key = "actual" if new else "reattached"
        spend[key] = None if cost is None or spend[key] is None else spend[key] + cost
        if not new:
            spend["batches"].append(batch_id)
            self.log.info(
                "Batch %s was already counted for its job (re-attached): its cost is not new spend", batch_id
            )

    def _spend_summary(self, stats: LoadStats) -> dict[str, Any]:
        spend = self._spend
        return {
            "not_selected": spend["not_selected"][0],
            "actual_cost_usd": None if spend["actual"] is None else round(spend["actual"], 6),
            "reattached_cost_usd": None if spend["reattached"] is None else round(spend["reattached"], 6),
            "reattached_batches": spend["batches"],
        }

    def _load_one(
        self,
        hook: FableHook,
        model_cls: Any,
        ledger: Ledger | None,
        target: Any,
        stats: LoadStats,
        stale: list[int],
        batch_id: str,
        committed: list[int],
    ) -> None:
        """Download, validate and load one batch (run again whole after a database outage)."""
        from airflow_provider_fable.core.loading import ResultScreen, load_batch

        results: Iterable[BatchResult] = hook.iter_results(batch_id)
        on_outcomes = None
        pipe: VerdictPipe | None = None
        submission = ledger.submission_for_batch(batch_id) if ledger is not None else None
        mapping = ledger.custom_id_map(batch_id) if submission is not None and ledger is not None else None
        selected: set[str] | None = None
        not_selected = [0]
        if mapping is not None and ledger is not None:
            selected = self._selection(ledger, batch_id)
            if selected is not None:  # a batch the submit shares with other runs' records (#17)
                results = _selected_results(results, mapping, selected, not_selected)
                # Completeness is judged on this run's records only: the others are not missing.
                mapping = {cid: rid for cid, rid in mapping.items() if rid in selected}
        # Completeness by custom_id (records the ledger has in this batch with no line become
        # ``missing_result`` rejects); answers of records a newer batch took over are dropped.
        screen = ResultScreen(batch_id, mapping, stats)
        results = screen(results)
        if submission is not None and ledger is not None:
            job_id = submission.job_id
            committed[2] = 1
            review_after = opt_int(self.needs_review_after, "needs_review_after")

            from airflow_provider_fable.core.ledger_bulk import VerdictPipe, VerdictWriter, sqlite_file

            # = ledger.record_outcomes, at load speed (core/ledger_bulk.py), from a thread, so the
            # ledger stores a chunk's verdicts while the next chunk is validated: PostgreSQL's
            # server, or SQLite's C code (GIL released) on a ledger file of its own.
            verdicts = VerdictWriter(ledger, job_id, batch_id, review_after=review_after)

            def stored(n: int) -> None:
                committed[1] += n

            if verdicts.postgres:
                pipe = VerdictPipe(verdicts, on_written=stored)
            elif (ledger_file := sqlite_file(ledger.engine)) is not None and ledger_file != sqlite_file(
                getattr(target, "engine", None)
            ):
                # Pieces of chunks come from the destination's writer process: up to a chunk's
                # worth queued, merged into one transaction (a commit is a few fsyncs).
                pipe = VerdictPipe(verdicts, on_written=stored, depth=4)

            def on_outcomes(outcomes: list[RecordOutcome]) -> None:
                committed[0] += len(outcomes)  # reported once their chunk is committed
                if pipe is not None:
                    pipe.put(outcomes)
                    return
                verdicts.write(outcomes)
                stored(len(outcomes))
        else:
            self.log.info("Batch %s is not in the job ledger (submitted elsewhere): loaded as is", batch_id)
        cost_before = stats.cost_usd
        try:
            load_batch(
                results,
                batch_id=batch_id,
                output_model=model_cls,
                sink=target,
                stats=stats,
                chunk_size=self.chunk_size,
                on_outcomes=on_outcomes,
            )
        except BaseException:
            if pipe is not None:  # the verdicts of the chunks committed before the error
                pipe.close(wait=_FAILED_VERDICTS_WAIT)
            raise
        if pipe is not None:
            pipe.close()  # every verdict stored before the batch counts as loaded
        if screen.dropped and submission is not None and ledger is not None:
            # Dropped lines are rare: tell a record a newer batch took over (stale, expected
            # after a rerun) from a custom_id this job never sent (an anomaly of the file).
            known = ledger.known_custom_ids(submission.job_id, screen.dropped)
            unknown = [str(c) for c in screen.dropped if str(c) not in known]
            stale[0] += len(screen.dropped) - len(unknown)
            if unknown:
                stats.unknown_custom_ids += len(unknown)
                self.log.warning(
                    "Batch %s: %d result line(s) carry a custom_id this batch never had (e.g. %s); "
                    "skipped, nothing written for them",
                    batch_id, len(unknown), ", ".join(unknown[:5]),
                )  # fmt: skip
        # Last, once the batch is in (a database retry of the batch runs all of the above again).
        self._count_spend(ledger, submission, batch_id, stats, cost_before, screen, selected is not None)
        self._spend["not_selected"][0] += not_selected[0]

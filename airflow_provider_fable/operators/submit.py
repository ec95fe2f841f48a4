"""FableBatchSubmitOperator: source records -> one request per record -> Message Batches, exactly once.

Every request is built and checked before the first batch is created, so a bad record (missing
id, duplicate id, a field the template needs) fails the task before anything is paid for, with the
record and the rule named. Requests are split into batches under the API's limits (100,000
requests / 256 MB) and spooled to a temporary file (``core.spool``); each create body is streamed
from the spool, so memory stays flat in the number of records (never a shard of dicts).

Exactly-once (see docs/ledger.md): every record's state lives in the job ledger
(``core.ledger``). Before each paid ``create`` the shard's *intent* is written; right after it, the
batch id. A retry, a cleared task or a re-run of the same data interval finds the records' batches
and re-attaches to them (same manifest, nothing created); only records that never got a batch are
sent. An intent left without a batch id (a crash, a lost create response) is reconciled against
the API's batch list before anything new is sent. ``rerun="failed"``/``"retryable"`` takes the
records to send again from the ledger; ``skip_done`` leaves out records the job already accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_fable import DEFAULT_CONN_ID
from airflow_provider_fable.links import FableBatchLink
from airflow_provider_fable.operators.guarded import SubmitGuardrailsMixin
from airflow_provider_fable.operators.observe import LineageSubmitMixin
from airflow_provider_fable.retries import fail_fast

if TYPE_CHECKING:  # everything else is imported where it is used, so a DAG file that imports
    # this operator pays only for the lines above at parse time (bench/dag_parse.py)
    from airflow.sdk import Context

    from airflow_provider_fable.core.id_map import IdMap
    from airflow_provider_fable.core.job import BatchJob
    from airflow_provider_fable.core.ledger import Ledger, RecordState
    from airflow_provider_fable.core.requests import SkippedRecord
    from airflow_provider_fable.core.spool import SpooledShard
    from airflow_provider_fable.hooks.fable import FableHook

RERUN_MODES = ("failed", "retryable", "unaccepted")
#: Test-only fault seam: ``after_intent:N``, ``after_create:N``, ``after_state_store:N``,
#: ``after_ledger:N`` or ``between_shards:N`` SIGKILLs the process at that point of shard N
#: (1-based), exactly like an OOM kill or a lost worker would; with a ``raise:`` prefix it raises
#: there instead (so Airflow's own retry can be watched in-process). Either fires on the first
#: try only (Airflow's ``try_number``, which holds across worker processes), so a deployment with
#: the variable set sees its retries succeed. Unset in every real deployment.
KILL_ENV = "FABLE_FAULT_KILL_AT"
_STATE_KEY = "fable_batches"  # task state store key: {shard digest: batch id}
#: Records per ledger look-up while selecting (their requests are held meanwhile, ~2 KB each):
#: one round trip per 5,000 records (PostgreSQL: one ``= ANY`` array; SQLite: IN lists of 500).
_LEDGER_CHUNK = 5000
#: How many records left out by ``on_missing_field="skip"`` the manifest lists by id (all are counted).
_SKIPPED_IN_MANIFEST = 100
#: A rerun's selection up to this many ids is held as one set (~100 bytes an id); past it the
#: ledger is asked per chunk of records instead (``_Submission._rerun_ids``).
_RERUN_SET_MAX = 200_000
#: How every spooled request line starts (``build_request`` puts the custom_id first).
_CUSTOM_ID_HEAD = b'{"custom_id":"'


def _kill_point(name: str, shard: int, try_number: int = 1) -> None:
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    if try_number > 1:
        return
    if wanted == f"{name}:{shard}":
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"raise:{name}:{shard}":
        from airflow_provider_fable.core.errors import FableError

        class InjectedFault(FableError):
            """Raised at a ``raise:`` fault point (tests only)."""

        raise InjectedFault(f"injected fault at {name} of shard {shard} ({KILL_ENV})")


def run_key_of(context: Any) -> str:
    """dag_id/run_id/task_id/map_index of the running task (``adhoc`` outside a task)."""
    ti = context.get("ti") if hasattr(context, "get") else None
    if ti is None:
        return "adhoc"
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{getattr(ti, 'map_index', -1)}"


class _StateStore:
    """Airflow >= 3.3's task state store when the context has one; a no-op otherwise.

    The ledger is the source of truth. The state store is a second, platform-native copy of the
    batch ids of this task instance: on a retry it settles an orphaned intent of the same task
    without listing batches.
    """

    def __init__(self, context: Any) -> None:
        self._store = context.get("task_state_store") if hasattr(context, "get") else None

    def get(self) -> dict[str, str]:
        if self._store is None:
            return {}
        try:
            return dict(self._store.get(_STATE_KEY) or {})
        except Exception:  # noqa: BLE001 - the store is an optimisation; the ledger decides
            return {}

    def put(self, digest: str, batch_id: str) -> None:
        if self._store is None:
            return
        try:
            from airflow.sdk.execution_time.context import NEVER_EXPIRE

            value = {**self.get(), digest: batch_id}
            self._store.set(_STATE_KEY, value, retention=NEVER_EXPIRE)
        except Exception:  # noqa: BLE001
            return


class FableBatchSubmitOperator(LineageSubmitMixin, SubmitGuardrailsMixin, BaseOperator):
    """Submit one Messages request per source record as Message Batches, exactly once per job.

    Records come from exactly one of ``records`` (list of dicts, DataFrame, a .csv/.jsonl path, or
    a callable returning one of those, called at execute time) or ``sql`` run on ``sql_conn_id``.

    :param prompt_template: ``str.format`` template filled from each record, e.g. ``"{subject}\\n{body}"``.
    :param output_model: pydantic model (or dotted path) of the answer; sent as structured output.
    :param id_field: record field whose value becomes the ``custom_id`` (encoded when the API's
        rule refuses it; the ledger keeps the mapping).
    :param system_prompt: system prompt shared by every request (cached when long enough).
    :param few_shot_examples: ``[{"record": {...}, "answer": {...}}]`` turns placed before each record.
    :param model: model name (templated); defaults to the connection's ``default_model`` extra,
        then ``claude-fable-5``.
    :param sql: query returning the records (templated). :param sql_conn_id: its connection.
    :param sql_parameters: bind parameters for ``sql`` (templated).
    :param cache_ttl: TTL of the shared prefix's prompt cache, ``"1h"`` (default) or ``"5m"``.
    :param sample: pilot: submit only a seeded random sample of N records spread over the whole
        source (templated; 0/None = the full run). The manifest says ``pilot``.
    :param sample_seed: seed of the pilot sample and of the estimate's request sample.
    :param max_cost_usd: fail before the first create when the estimate is above this (templated).
    :param prices: price overrides ``{model: {"input": .., "output": .., ...}}`` (USD/MTok) over
        the connection's ``prices`` extra and the default table (``core.cost``).
    :param estimate_sample: requests counted with ``count_tokens`` for the estimate (0 = no estimate).
    :param output_tokens_per_request: output tokens per request for the estimate, instead of the
        mean the ledger measured on this job's earlier loads (templated).
    :param estimate_only: count, estimate and log the run's cost, then stop: no intent, no batch,
        nothing paid (templated, so a Param can drive it). The manifest says ``estimate_only`` and
        lists no batch; the sensor and the load pass it through doing nothing. Over
        ``max_cost_usd`` it reports ``over_budget`` instead of failing.
    :param qa_excerpts: how many input excerpts to record for the load's QA sample (0 = none).
    :param qa_seed: seed of the QA sample (must match the load's ``qa_seed``; both default to 0).
    :param ledger_conn_id: SQL connection of the job ledger; default: the fable connection's
        ``ledger_conn_id`` extra, else an embedded SQLite under AIRFLOW_HOME (one machine only).
    :param rerun: ``"failed"`` or ``"retryable"``: send only the source records that ``rerun_job``
        rejected (all, or only retryable rejects) in the ledger. ``"unaccepted"``: send every
        selected record this job has not accepted (its rejects *and* records it never saw) and
        leave out the ones it accepted; for a later stage of a multi-stage DAG, where a rerun
        brings records that earlier runs never got this far. Templated.
    :param rerun_job: fingerprint (or a submit manifest) of the job whose rejects to rerun;
        defaults to this job. Pass the first job's manifest to rerun its failures with another model.
    :param skip_done: leave out records this job has already accepted.
    :param resubmit: send every selected record again even when it already has a batch (pays again).
    :param orphan_policy: ``"fail"`` (default) or ``"resubmit"``: what to do with an intent that
        never recorded its batch when several listed batches could be it.
    :param on_missing_field: a record whose template field is missing, None or NaN: ``"error"``
        (default: the task fails naming record and field, before anything is paid for), ``"skip"``
        (left out, listed in the manifest's ``missing_field_skipped`` and logged) or ``"empty"``
        (rendered as "").
    :param destination_conn_id: when set, a pre-flight check runs before the first create: the
        SQL connection the load task will write to exists and is supported, ``destination_table``
        and ``destination_id_column`` are valid names and the output model is storable there.
    :return: manifest ``{"batch_ids", "request_count", "model", "job_fingerprint", "shards",
        "submitted", "attached", "skipped", "run_key", "rerun", "pilot", "estimate",
        "qa_excerpts"}`` (+ ``missing_field_skipped``, ``needs_review_skipped``, ``estimate_only``).
        A shard re-attached to a batch that holds other records too says ``"partial": true``: the
        run's records in it are in the ledger, and a load given this manifest loads only those.
    """

    template_fields: Sequence[str] = (
        "sql",
        "sql_parameters",
        "rerun",
        "rerun_job",
        "model",
        "sample",
        "max_cost_usd",
        "output_tokens_per_request",
        "estimate_only",
    )
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
        temperature: float | None = None,
        cache_prompt_prefix: bool = True,
        records: Any = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        sql_parameters: dict[str, Any] | None = None,
        fable_conn_id: str = DEFAULT_CONN_ID,
        max_requests_per_batch: int | None = None,
        max_bytes_per_batch: int | None = None,
        ledger_conn_id: str | None = None,
        rerun: str | None = None,
        rerun_job: Any = None,
        skip_done: bool = False,
        resubmit: bool = False,
        orphan_policy: str = "fail",
        on_missing_field: str = "error",
        destination_conn_id: str | None = None,
        destination_table: str | None = None,
        destination_id_column: str = "id",
        destination_rejects_table: str | None = None,
        cache_ttl: str = "1h",
        sample: int | str | None = None,
        sample_seed: int = 0,
        max_cost_usd: float | str | None = None,
        prices: dict[str, Any] | None = None,
        estimate_sample: int = 50,
        output_tokens_per_request: float | None = None,
        qa_excerpts: int = 100,
        qa_seed: int = 0,
        estimate_only: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (records is None) == (sql is None):
            raise ValueError(f"{self.task_id}: pass exactly one of records= or sql=")
        if sql is not None and not sql_conn_id:
            raise ValueError(f"{self.task_id}: sql= needs sql_conn_id=")
        if orphan_policy != "fail":
            from airflow_provider_fable.core.ledger import ORPHAN_POLICIES

            if orphan_policy not in ORPHAN_POLICIES:
                raise ValueError(f"{self.task_id}: orphan_policy must be one of {ORPHAN_POLICIES}")
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
        # None: the API's limits (core.sharding), resolved when the shards are cut.
        self.max_requests_per_batch = max_requests_per_batch
        self.max_bytes_per_batch = max_bytes_per_batch
        self.ledger_conn_id = ledger_conn_id
        self.rerun = rerun
        self.rerun_job = rerun_job
        self.skip_done = skip_done
        self.resubmit = resubmit
        self.orphan_policy = orphan_policy
        if on_missing_field not in ("error", "skip", "empty"):
            raise ValueError(f"{self.task_id}: on_missing_field must be 'error', 'skip' or 'empty'")
        self.on_missing_field = on_missing_field
        if destination_conn_id and not destination_table:
            raise ValueError(f"{self.task_id}: destination_conn_id= needs destination_table=")
        self.destination_conn_id = destination_conn_id
        self.destination_table = destination_table
        self.destination_id_column = destination_id_column
        self.destination_rejects_table = destination_rejects_table
        self.skipped: list[SkippedRecord] = []
        # Guardrails (operators/guarded.py): pilot, estimate, budget cap, QA excerpts.
        self.cache_ttl = cache_ttl
        self.sample = sample
        self.sample_seed = sample_seed
        self.max_cost_usd = max_cost_usd
        self.prices = prices
        self.estimate_sample = estimate_sample
        self.output_tokens_per_request = output_tokens_per_request
        self.qa_excerpts = qa_excerpts
        self.qa_seed = qa_seed
        self.estimate_only = estimate_only

    def build_job(self, hook: FableHook | None = None) -> BatchJob:
        from airflow_provider_fable.core.job import DEFAULT_MODEL, BatchJob

        model = self.model or (hook.default_model if hook else None) or DEFAULT_MODEL
        return BatchJob(
            prompt_template=self.prompt_template,
            output_model=self.output_model,
            id_field=self.id_field,
            model=model,
            system_prompt=self.system_prompt,
            few_shot_examples=self.few_shot_examples,  # type: ignore[arg-type]  # validated by pydantic
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            cache_prompt_prefix=self.cache_prompt_prefix,
            on_missing_field=self.on_missing_field,  # type: ignore[arg-type]  # validated by pydantic
            cache_ttl=self.cache_ttl,  # type: ignore[arg-type]
        )

    def iter_source(self, engine: Any = None) -> Iterator[dict[str, Any]]:
        from airflow_provider_fable.core.sources import iter_records, iter_sql

        if self.sql is not None:
            records = iter_sql(engine, self.sql, self.sql_parameters)
        else:
            records = iter_records(self.records)
        return self._excerpt_tap(self._sampled(records))

    def preflight(self, job: BatchJob) -> None:
        """Destination checks the load task would otherwise hit after paying (see ``core.preflight``)."""
        from airflow_provider_fable.hooks.sql import preflight_destination

        if self.destination_conn_id:
            preflight_destination(
                self.destination_conn_id,
                table=self.destination_table or "",
                output_model=job.output_model,
                id_column=self.destination_id_column,
                rejects_table=self.destination_rejects_table,
            )

    # ------------------------------------------------------------------ execute
    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_fable.hooks.fable import FableHook
        from airflow_provider_fable.hooks.ledger import open_ledger
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        hook = FableHook(self.fable_conn_id)
        with fail_fast():  # a bad spec or a destination the load cannot write: no retry helps
            job = self.build_job(hook)
            self.preflight(job)
        from airflow_provider_fable.core.dbretry import retry_transient_db

        engine = sqlalchemy_engine(self.sql_conn_id) if self.sql is not None else None  # type: ignore[arg-type]  # checked with sql
        ledger = retry_transient_db(
            lambda: open_ledger(self.ledger_conn_id, self.fable_conn_id, self.log),
            what="opening the job ledger",
            logger=self.log,
        )  # nothing is paid yet: after the retries, the driver's error says enough
        try:
            submission = _Submission(self, context, hook, job, ledger)
            try:
                with fail_fast():  # a bad record, spec or budget fails now, not after the retries
                    return submission.run(self.iter_source(engine))
            except Exception as exc:
                from airflow_provider_fable.core.dbretry import (
                    DatabaseUnavailableError,
                    is_transient_db_error,
                    short,
                )

                # An outage (not, say, an error in the source query): say what was paid for.
                if isinstance(exc, DatabaseUnavailableError) or not is_transient_db_error(exc):
                    raise
                made = ", ".join(getattr(submission, "created", [])) or "none"
                raise DatabaseUnavailableError(
                    f"the submit failed on a database error ({short(exc)}). Batches this try created "
                    f"(paid for): {made}. A retry of this task attaches to them instead of paying again."
                ) from exc
        finally:
            hook.close()
            ledger.engine.dispose()
            if engine is not None:
                engine.dispose()


def _rerun_job_id(value: Any, default: str) -> str:
    if value is None or value == "":
        return default
    if isinstance(value, dict):
        value = value.get("job_fingerprint")
    if not isinstance(value, str) or not value:
        raise ValueError(f"rerun_job must be a job fingerprint or a submit manifest, got {value!r}")
    return value


class _Submission:
    """One execution of the submit operator: select, reconcile, attach or send, record."""

    def __init__(
        self, op: FableBatchSubmitOperator, context: Any, hook: FableHook, job: BatchJob, ledger: Ledger
    ):
        from airflow_provider_fable.core.ledger import ACCEPTED, NEEDS_REVIEW, PENDING, REJECTED

        self.op, self.log, self.hook, self.job, self.ledger = op, op.log, hook, job, ledger
        self.context = context
        # The new (path-independent) fingerprint, or the id an older provider registered the job
        # under, so its in-flight batches re-attach (docs/ledger.md, "The job fingerprint").
        self.job_id = ledger.resolve_job(job.fingerprint(), job.legacy_fingerprint())
        self.claim: Any = None  # the job's submit claim while run() holds it
        self.run_key = run_key_of(context)
        ti = context.get("ti") if hasattr(context, "get") else None
        self.try_number = int(getattr(ti, "try_number", 1) or 1)
        self.state_store = _StateStore(context)
        settings = getattr(hook, "_settings", {}) or {}
        self.api = hook.base_url + (
            f"#{settings.get('workspace_id')}" if settings.get("workspace_id") else ""
        )
        self.rerun = op.rerun or None  # a template may render "" for "no rerun"
        if self.rerun is not None and self.rerun not in RERUN_MODES:
            raise ValueError(f"{op.task_id}: rerun must be one of {RERUN_MODES} or None, got {op.rerun!r}")
        self.rerun_of = _rerun_job_id(op.rerun_job, self.job_id) if self.rerun else None
        if self.rerun_of and self.rerun_of != self.job_id:
            self.rerun_of = ledger.resolve_job(self.rerun_of)  # a fingerprint aliased to a legacy id
        if self.rerun == "unaccepted" and self.rerun_of != self.job_id:
            raise ValueError(f"{op.task_id}: rerun='unaccepted' reruns this job only; drop rerun_job")
        self._rerun_set: set[str] | None = None  # the rerun's selection, when small (_rerun_ids)
        self._rerun_read = False
        self._statuses = (ACCEPTED, PENDING, REJECTED)  # read once per record by _decide
        self._needs_review = NEEDS_REVIEW

    # -- selection ---------------------------------------------------------------------------
    def _rerun_chosen(self, record_ids: Sequence[str], states: dict[str, RecordState]) -> set[str]:
        """Which of ``record_ids`` this rerun selects: the rerun job's rejects (not superseded;
        retryable ones only under ``rerun="retryable"``), plus, for a retry of this very task,
        the records its earlier try already sent again (their latest submission is this run's).

        Both are read from the chunk's ledger states when the rerun is of this job (the usual
        case: no query beyond the look-up). The rejects of another job (``rerun_job``): up to
        ``_RERUN_SET_MAX`` are read once into a set; beyond, the ledger is asked per chunk
        (``Ledger.rerun_selected``), so memory stays flat however many records failed.
        """
        from airflow_provider_fable.core.ledger import REJECTED

        assert self.rerun_of is not None
        retryable = self.rerun == "retryable"
        chosen = {rid for rid, st in states.items() if st.run_key == self.run_key}
        if self.rerun_of == self.job_id:
            chosen.update(
                rid
                for rid, st in states.items()
                if st.status == REJECTED and st.superseded_by is None and (st.retryable or not retryable)
            )
            return chosen
        if not self._rerun_read:
            self._rerun_set = self.ledger.rerun_ids(
                self.rerun_of, retryable_only=retryable, limit=_RERUN_SET_MAX
            )
            self._rerun_read = True
        if self._rerun_set is not None:
            chosen.update(rid for rid in record_ids if rid in self._rerun_set)
        else:
            chosen |= self.ledger.rerun_selected(self.rerun_of, record_ids, retryable_only=retryable)
        return chosen

    def _decide(self, state: RecordState | None) -> str:
        """``send``, ``attach`` or ``skip`` for one selected record."""
        ACCEPTED, PENDING, REJECTED = self._statuses  # noqa: N806 - the ledger's constants
        if (
            state is not None
            and state.status == ACCEPTED
            and (self.op.skip_done or self.rerun == "unaccepted")
        ):
            return "skip"
        if state is not None and state.status == self._needs_review and self.rerun:
            return "review"  # failed the same way too often: a person decides, not a rerun
        if self.op.resubmit:
            return "send"
        if state is None or state.status == PENDING or not state.batch_id or state.api != self.api:
            return "send"
        if self.rerun_of == self.job_id and state.status == REJECTED:
            return "send"  # rerun of this job's own rejects: that is the point
        return "attach"

    def _selected(
        self, requests: Iterator[tuple[dict[str, Any], dict[str, Any]]], plan: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        """Requests that must be sent; attach/skip decisions are counted in ``plan`` on the way."""
        from airflow_provider_fable.core import ids

        self._encoded_ids: IdMap = plan["ids"]  # custom_id -> record id, for messages
        # "unaccepted" selects nothing from the ledger: every source record is decided on its state.
        rerun = bool(self.rerun_of) and self.rerun != "unaccepted"
        # A job the ledger has no record of (its first submit: under the claim no one else adds
        # any meanwhile) has no state to look up: every record is sent, without a query per chunk.
        known = self.ledger.has_records(self.job_id)
        buf: list[tuple[str, dict[str, Any]]] = []

        def flush() -> Iterator[dict[str, Any]]:
            nonlocal buf
            chunk = [rid for rid, _ in buf]
            states = self.ledger.record_states(self.job_id, chunk) if known else {}
            if rerun:
                chosen = self._rerun_chosen(chunk, states)
                plan["not_selected"] += sum(1 for rid in chunk if rid not in chosen)
                buf = [(rid, request) for rid, request in buf if rid in chosen]
            for rid, request in buf:
                state = states.get(rid)
                verdict = self._decide(state)
                if verdict == "send":
                    if rid != request["custom_id"]:
                        plan["ids"][request["custom_id"]] = rid  # only encoded ids need remembering
                    yield request
                elif verdict == "attach":
                    assert state is not None and state.batch_id
                    plan["attached"][state.batch_id] = plan["attached"].get(state.batch_id, 0) + 1
                    self._remember_attached(plan, state.batch_id, rid)
                elif verdict == "review":
                    plan["needs_review"] += 1
                else:
                    plan["skipped"] += 1
            buf.clear()

        for request, record in requests:
            rid = ids.record_id_text(record.get(self.job.id_field))
            buf.append((rid, request))
            if len(buf) >= _LEDGER_CHUNK:
                yield from flush()
        if buf:
            yield from flush()

    def _remember_attached(self, plan: dict[str, Any], batch_id: str, record_id: str) -> None:
        """Keep the ids re-attached to ``batch_id`` until they are all of it (then one flag).

        A batch this run re-attaches to in full is loaded whole; one it shares with records the
        run did not select (a pilot whose sample sits in an older full batch) gets its selection
        written to the ledger, so the run's load loads only these. Ids are dropped as soon as a
        batch is known to be attached in full: a retry re-attaching a million records holds none.
        """
        sizes: dict[str, int] = plan["batch_sizes"]
        if batch_id not in sizes:
            sub = self.ledger.submission_for_batch(batch_id)
            sizes[batch_id] = sub.request_count if sub is not None else -1
        ids: dict[str, list[str] | None] = plan["attached_ids"]
        held = ids.setdefault(batch_id, [])
        if held is None:
            return
        held.append(record_id)
        if len(held) == sizes[batch_id]:
            ids[batch_id] = None  # every request of the batch is this run's

    # -- orphans -----------------------------------------------------------------------------
    def _reconcile(self) -> None:
        from airflow_provider_fable.core.ledger import CLOCK_SKEW
        from airflow_provider_fable.hooks.ledger import batch_candidates

        intents = self.ledger.open_intents(self.job_id, api=self.api)
        if not intents:
            return
        known = self.state_store.get()
        since = min(i.intent_at for i in intents) - CLOCK_SKEW
        candidates = None
        for intent in intents:
            if intent.run_key == self.run_key and intent.digest in known:
                self.ledger.write_batch(
                    intent.id, known[intent.digest], state="adopted", note="task state store"
                )
                self.log.info(
                    "Shard %d: batch %s found in the task state store", intent.shard, known[intent.digest]
                )
                continue
            if candidates is None:
                candidates = list(batch_candidates(self.hook, since))
            adopted = self.ledger.reconcile(intent, candidates, policy=self.op.orphan_policy)
            if adopted:
                self.log.warning(
                    "Shard %d of run %s never recorded its batch; adopted %s (created after the intent, "
                    "%d requests, unclaimed)", intent.shard, intent.run_key, adopted, intent.request_count,
                )  # fmt: skip
            else:
                self.log.warning(
                    "Shard %d of run %s never recorded a batch and no batch matches it; its records "
                    "will be sent again", intent.shard, intent.run_key,
                )  # fmt: skip

    def _settle_unloaded(self, job_id: str) -> None:
        """Give a verdict to the requests of ended, never-loaded batches that got no answer.

        A wait fails when every request of its batches expired (or errored, or was canceled), so
        no load runs and the records stay ``submitted``: neither accepted nor rejects, and a
        ``rerun="failed"``/``"retryable"`` found nothing to send and succeeded silently. Here
        each such request becomes the reject the load would have written (``expired``,
        ``canceled``, ``errored``; same classification as the load's), so the rerun sends it.
        Answers that did come back are left for the batch's load: they are never paid twice.
        """
        from airflow_provider_fable.core.errors import FableError
        from airflow_provider_fable.core.ledger import REJECTED, Outcome
        from airflow_provider_fable.core.results import SUCCEEDED
        from airflow_provider_fable.core.validation import _not_succeeded

        for batch_id in self.ledger.unloaded_batches(job_id, api=self.api):
            try:
                batch = self.hook.retrieve_batch(batch_id)
            except FableError as exc:
                self.log.warning(
                    "Could not check unloaded batch %s (%s); its records stay as they are", batch_id, exc
                )
                continue
            counts = batch.request_counts
            lost = (counts.errored or 0) + (counts.expired or 0) + (counts.canceled or 0)
            if batch.processing_status != "ended" or not lost:
                continue
            ids = self.ledger.custom_id_map(batch_id)
            outcomes = []
            for result in self.hook.iter_results(batch_id):
                record_id = ids.get(result.custom_id)
                if record_id is None or result.type == SUCCEEDED:
                    continue
                reject = _not_succeeded(result, record_id)
                outcomes.append(
                    Outcome(record_id, result.custom_id, REJECTED, reject.reason, reject.retryable, batch_id)
                )
            if not outcomes:
                continue  # settled by an earlier rerun; what is left are answers for the load
            self.ledger.record_outcomes(job_id, batch_id, outcomes)
            self.log.warning(
                "Batch %s ended with %d request(s) expired, errored or canceled and was never loaded "
                "(its wait failed): recorded %d of them as rejects, so this rerun can send them",
                batch_id, lost, len(outcomes),
            )  # fmt: skip

    # -- run ---------------------------------------------------------------------------------
    def run(self, source: Iterator[dict[str, Any]]) -> dict[str, Any]:
        from airflow_provider_fable.core.manifest import flag

        if flag(self.op.estimate_only, "estimate_only"):
            return self._estimate_only(source)
        job, ledger = self.job, self.ledger
        ledger.register_job(
            self.job_id,
            model=job.model,
            spec={
                "prompt_template": job.prompt_template,
                "output_model": f"{job.output_model.__module__}.{job.output_model.__qualname__}",
                "id_field": job.id_field,
                "max_tokens": job.max_tokens,
                "temperature": job.temperature,
                "system_prompt_sha256": hashlib.sha256((job.system_prompt or "").encode()).hexdigest()[:16],
                "few_shot_examples": len(job.few_shot_examples),
            },
            parent_job=self.rerun_of if self.rerun_of and self.rerun_of != self.job_id else None,
        )
        plan = self._plan()
        # One submitter of a job at a time, across runs and DAGs (docs/ledger.md): another run of
        # the same job waits here, then finds this one's batches and attaches to them.
        with ledger.claim(self.job_id, run_key=self.run_key, on_wait=self._waiting) as claim:
            self.claim = claim
            self._reconcile()
            if self.rerun_of:
                self._settle_unloaded(self.rerun_of)
            with tempfile.TemporaryFile(prefix="fable-requests-") as spool:
                try:
                    shards = self._spool(self._selected(self._paired(source), plan), spool)
                    # Guardrails (operators/guarded.py): estimate, log it, refuse over max_cost_usd,
                    # all before the first intent or create; then pilot / estimate / QA excerpts
                    # into the manifest.
                    guarded = self.op._estimate_before_submit(
                        self.hook,
                        job,
                        spool,
                        [(shard.offset, shard.count) for shard in shards],
                        ledger=ledger,
                    )
                    manifest = self._submit(spool, shards, plan)
                finally:
                    plan["ids"].close()
        self.op._after_submit(job, manifest, guarded, self.context)
        return manifest

    def _waiting(self, holder: str) -> None:
        self.log.info(
            "Job %s is being submitted by %s; waiting for it to finish, then its batches are "
            "attached instead of paid again. (SQLite ledger only: a holder on another host that is "
            "gone for good is released with DELETE FROM fable_job_claims WHERE job_id = '%s'.)",
            self.job_id, holder, self.job_id,
        )  # fmt: skip

    @staticmethod
    def _plan() -> dict[str, Any]:
        from airflow_provider_fable.core.id_map import IdMap

        # "ids": encoded custom_id -> record id, in bounded memory (core.id_map; close it after).
        return {
            "ids": IdMap(), "attached": {}, "skipped": 0, "not_selected": 0, "needs_review": 0,
            "attached_ids": {}, "batch_sizes": {},
        }  # fmt: skip

    def _estimate_only(self, source: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """Select, build and estimate as a real run would, then stop before any intent or create.

        Nothing is written to the ledger and nothing is paid (``count_tokens`` is free): the
        manifest carries the estimate and no batch, so the wait and the load do nothing.
        """
        plan = self._plan()
        with tempfile.TemporaryFile(prefix="fable-requests-") as spool:
            try:
                shards = self._spool(self._selected(self._paired(source), plan), spool)
                guarded = self.op._estimate_before_submit(
                    self.hook, self.job, spool, [(shard.offset, shard.count) for shard in shards],
                    ledger=self.ledger, enforce_budget=False,
                )  # fmt: skip
            finally:
                plan["ids"].close()
        new = sum(shard.count for shard in shards)
        manifest: dict[str, Any] = {
            "estimate_only": True,
            "batch_ids": [],
            "request_count": 0,
            "would_submit": new,
            "would_attach": sum(plan["attached"].values()),
            "model": self.job.model,
            "job_fingerprint": self.job_id,
            "shards": [],
            "submitted": 0,
            "attached": 0,
            "skipped": plan["skipped"],
            "run_key": self.run_key,
            "rerun": self.rerun,
            **guarded,
        }
        if plan["needs_review"]:
            manifest["needs_review_skipped"] = plan["needs_review"]
        est = guarded.get("estimate") or {}
        cost = est.get("cost_usd")
        self.log.warning(
            "Estimate only: nothing was submitted or paid. %d request(s) would be sent on %s "
            "(%d re-attached), projected cost %s%s",
            new, self.job.model, manifest["would_attach"],
            "unknown" if cost is None else f"${cost:,.4f}",
            " - OVER max_cost_usd" if guarded.get("over_budget") else "",
        )  # fmt: skip
        return manifest

    def _paired(self, source: Iterator[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(request, record) pairs; every record is checked before the first create."""
        from airflow_provider_fable.core.requests import build_requests

        records: list[dict[str, Any]] = []

        def remember() -> Iterator[dict[str, Any]]:
            for record in source:
                records.append(record)
                yield record

        self.op.skipped = []
        for request in build_requests(self.job, remember(), skipped=self.op.skipped):
            # The record just consumed is the last one; records skipped before it are dropped too.
            record = records[-1]
            records.clear()
            yield request, record

    def _spool(self, requests: Iterator[dict[str, Any]], spool: IO[bytes]) -> list[SpooledShard]:
        """Write the shards to ``spool`` (``core.spool``: one request in memory at a time)."""
        from airflow_provider_fable.core.sharding import MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH
        from airflow_provider_fable.core.spool import spool_requests

        return spool_requests(
            requests,
            spool,
            max_requests=self.op.max_requests_per_batch or MAX_REQUESTS_PER_BATCH,
            max_bytes=self.op.max_bytes_per_batch or MAX_BATCH_BYTES,
            check=self._context_guard(),
        )

    def _context_guard(self) -> Any:
        """Refuses requests over the model's context window (``core.cost.ContextWindowGuard``)."""
        from airflow_provider_fable.core.cost import ContextWindowGuard, context_window

        window = context_window(self.job.model)
        if window is None:
            return None
        return ContextWindowGuard(
            window,
            self.job.max_tokens,
            self.hook.count_tokens,
            name_of=lambda custom_id: self._encoded_ids.get(custom_id, custom_id),
            warn=self.log.warning,
        )

    def _shard_rows(
        self, spool: IO[bytes], shard: SpooledShard, plan: dict[str, Any]
    ) -> tuple[list[tuple[str, str, str]], str, int]:
        """Ledger rows (record id, custom_id, request hash), shard digest and byte size, line by line.

        Only the small rows are kept, so the shard is never held as a list of dicts (the body
        itself is streamed by ``iter_body``). The request hash is the sha256 of the request's
        line as sent (``core.spool.serialise``: one serialisation per request, so the same
        request has the same line). Each line starts with its custom_id (``build_request`` puts
        it first), read there; a line that does not is parsed as JSON. At 1M records this was
        a JSON parse and a key-sorted re-serialisation per request, ~25 s of the submit.
        """
        from airflow_provider_fable.core.ids import ENCODED_PREFIX

        spool.seek(shard.offset)
        digest = hashlib.sha256()
        rows = []
        size = 0
        ids = plan["ids"]
        sha256 = hashlib.sha256
        head = len(_CUSTOM_ID_HEAD)
        for _ in range(shard.count):
            line = spool.readline()
            digest.update(line)
            size += len(line)
            end = line.find(b'"', head) if line.startswith(_CUSTOM_ID_HEAD) else -1
            raw = line[head:end] if end > 0 else b"\\"
            custom_id = raw.decode() if b"\\" not in raw else str(json.loads(line)["custom_id"])
            rows.append((custom_id, custom_id, sha256(line.rstrip(b"\n")).hexdigest()))
        # Encoded custom_ids back to their record ids, the shard's at once (a few probes of the
        # id map's scratch file per 500 ids once it spilled; none for native ids).
        encoded = [row[1] for row in rows if row[1].startswith(ENCODED_PREFIX)]
        if encoded:
            real = ids.get_many(encoded)
            rows = [(real.get(cid, cid), cid, digest_) for _, cid, digest_ in rows]
        return rows, digest.hexdigest(), size

    def _ended_incomplete(self, attached: dict[str, int]) -> list[str]:
        """Re-attached batches that already ended with canceled or expired requests.

        Typically an earlier try's wait was marked failed (its batches canceled) or timed out.
        Their records were never loaded, so they are neither accepted nor rejects that a
        ``rerun="failed"`` would pick up; the wait would fail on them again and again. Listed in
        the manifest, the wait lets them through as partial, the load stores what came back and
        rejects the rest as ``canceled``/``expired`` (retryable), and a ``rerun="failed"`` run
        sends exactly those, without paying twice for the answers that did come back.
        """
        from airflow_provider_fable.core.errors import FableError

        ended: list[str] = []
        for batch_id in attached:
            try:
                batch = self.hook.retrieve_batch(batch_id)
            except FableError as exc:  # a check, not a step: the wait will read the batch again
                self.log.warning(
                    "Could not check re-attached batch %s (%s); if it already ended canceled or "
                    "expired, the wait fails on it and the next run checks again", batch_id, exc,
                )  # fmt: skip
                continue
            counts = batch.request_counts
            lost = (counts.canceled or 0) + (counts.expired or 0)
            if batch.processing_status == "ended" and lost:
                ended.append(batch_id)
                self.log.warning(
                    "Re-attached batch %s had already ended with %d canceled and %d expired "
                    "request(s) (an earlier try was canceled or ran out of time): its answers are "
                    "loaded, the rest become retryable rejects; send those again with a "
                    "rerun='failed' run (the example DAGs: params mode=failed)",
                    batch_id, counts.canceled or 0, counts.expired or 0,
                )  # fmt: skip
        return ended

    def _ledger_step(self, what: str, created: list[str], step: Callable[[], Any]) -> Any:
        """A ledger write of the submit, retried through transient outages (``core.dbretry``);
        when it still fails, the error names the batches this try created (paid for), which the
        next try finds in the ledger or adopts from the API's batch list instead of paying again."""
        from airflow_provider_fable.core.dbretry import (
            DatabaseUnavailableError,
            is_database_error,
            retry_transient_db,
            short,
        )

        try:
            return retry_transient_db(step, what=what, logger=self.log)
        except Exception as exc:
            if not is_database_error(exc):
                raise
            made = ", ".join(created) if created else "none"
            raise DatabaseUnavailableError(
                f"{what} failed: the job ledger is unavailable ({short(exc)}). Batches this try created "
                f"(paid for): {made}. A retry of this task attaches to them (from the ledger, or by "
                "reconciling its intents against the API's batch list) instead of paying again."
            ) from exc

    def _check_model(self) -> None:
        """An unknown model fails every request: refuse it before the first create (not retried)."""
        from airflow_provider_fable.hooks.fable import UnknownModelError
        from airflow_provider_fable.retries import not_retried

        try:
            self.hook.check_model(self.job.model)
        except UnknownModelError as exc:
            raise not_retried(exc) from None

    def _submit(self, spool: IO[bytes], shards: list[SpooledShard], plan: dict[str, Any]) -> dict[str, Any]:
        from airflow_provider_fable.core.errors import FableError
        from airflow_provider_fable.core.spool import iter_body

        job = self.job
        attached: dict[str, int] = plan["attached"]
        new = sum(shard.count for shard in shards)
        manifest: dict[str, Any] = {
            "batch_ids": list(attached),
            "request_count": new + sum(attached.values()),
            "model": job.model,
            "job_fingerprint": self.job_id,
            "shards": [{"batch_id": b, "requests": n, "attached": True} for b, n in attached.items()],
            "submitted": new,
            "attached": sum(attached.values()),
            "skipped": plan["skipped"],
            "run_key": self.run_key,
            "rerun": self.rerun,
        }
        if plan["needs_review"]:
            manifest["needs_review_skipped"] = plan["needs_review"]
            self.log.warning(
                "Left out %d record(s) marked needs_review in the ledger (the same reject on their "
                "last outcomes); Ledger.needs_review(job) lists them", plan["needs_review"],
            )  # fmt: skip
        for shard in manifest["shards"]:
            held = plan["attached_ids"].get(shard["batch_id"])
            if held:  # shared with records this run did not select: the load loads only these
                self.ledger.record_selection(self.job_id, self.run_key, shard["batch_id"], held)
                shard["partial"] = True
        missing = self.op.skipped
        if missing:
            manifest["missing_field_skipped"] = {
                "count": len(missing),
                "records": [m.as_dict() for m in missing[:_SKIPPED_IN_MANIFEST]],
            }
            self.log.warning(
                "Left out %d record(s) with a missing/None/NaN template field (on_missing_field='skip'): %s",
                len(missing),
                ", ".join(f"{m.record_id!r} (#{m.position}: {', '.join(m.fields)})" for m in missing[:20])
                + (" ..." if len(missing) > 20 else ""),
            )
        if attached:
            self.log.info(
                "Re-attached %d record(s) to %d batch(es) already created for job %s: %s",
                manifest["attached"], len(attached), self.job_id, ", ".join(attached),
            )  # fmt: skip
            ended = self._ended_incomplete(attached)
            if ended:
                manifest["ended_incomplete"] = ended
        if not new:
            if not attached:
                self.log.warning("No records to submit (source empty or all skipped)")
            return manifest
        self._check_model()
        self.log.info(
            "Submitting %d requests for model %s in %d batch(es) (job %s)",
            new,
            job.model,
            len(shards),
            self.job_id,
        )
        created: list[str] = []
        self.created = created  # named by ``FableBatchSubmitOperator.execute`` if the ledger fails
        for n, shard in enumerate(shards, 1):
            count = shard.count
            rows, digest, size = self._shard_rows(spool, shard, plan)
            intent = self._ledger_step(
                f"writing the intent of shard {n}/{len(shards)}", created,
                lambda rows=rows, n=n, size=size, digest=digest: self.ledger.write_intent(  # type: ignore[misc]
                    self.job_id, run_key=self.run_key, shard=n, records=rows, byte_size=size,
                    model=job.model, api=self.api, digest=digest,
                ),
            )  # fmt: skip
            del rows
            _kill_point("after_intent", n, self.try_number)
            self.claim.verify()  # a lost claim (ledger session ended) pays nothing more
            try:
                batch = self.hook.create_batch_from_body(
                    lambda shard=shard: iter_body(spool, shard),  # type: ignore[misc]
                    count=count,
                    size=shard.body_bytes,
                )
            except FableError as exc:
                done = (
                    f"after {len(created)} batch(es) were created ({', '.join(created)})"
                    if created
                    else "before this task had created any batch"
                )
                raise FableError(
                    f"creating batch {n}/{len(shards)} failed {done}. The ledger holds this shard's intent: a retry "
                    f"re-attaches to what exists and reconciles this shard against the API's batch list "
                    f"(orphan_policy={self.op.orphan_policy!r}) before paying again. Cause: {exc}"
                ) from exc
            _kill_point("after_create", n, self.try_number)
            self.state_store.put(digest, batch.id)
            _kill_point("after_state_store", n, self.try_number)
            self._ledger_step(
                f"recording batch {batch.id} (shard {n}/{len(shards)})", [*created, batch.id],
                lambda intent=intent, batch=batch: self.ledger.write_batch(intent.id, batch.id),  # type: ignore[misc]
            )  # fmt: skip
            _kill_point("after_ledger", n, self.try_number)
            created.append(batch.id)
            manifest["batch_ids"].append(batch.id)
            manifest["shards"].append({"batch_id": batch.id, "requests": count, "attached": False})
            self.log.info("Batch %d/%d: %s (%d requests)", n, len(shards), batch.id, count)
            if n < len(shards):
                _kill_point("between_shards", n, self.try_number)
        return manifest

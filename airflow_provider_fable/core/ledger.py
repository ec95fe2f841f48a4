"""The job ledger: where a backlog's state lives, and what makes submission exactly-once.

Why a ledger: the Batches API has no idempotency key, so a retried or cleared submit task cannot
ask the API "did I already create this?". The ledger answers instead. Before every paid ``create``
the submit operator writes an *intent* (which records, how many requests, when); right after the
create it writes the batch id. A later try finds the batch (re-attach) or, when the process died
between the two writes, reconciles the intent against the API's list of batches (orphans).

It also answers "which records are done, which failed and why" without reading the destination:
every record of every job has one current row (status ``pending/submitted/accepted/rejected``) and
the load appends an outcome row per (record, batch), so history survives reruns.

Pure SQLAlchemy Core, no Airflow import: the operators hand it an engine. SQLite and PostgreSQL.
Tables are created on first use; ``SCHEMA_VERSION`` is stored in ``fable_ledger_meta``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

SCHEMA_VERSION = 1

#: Record statuses. ``pending``: an intent names it, no batch yet. ``submitted``: in a created
#: batch, not loaded. ``accepted``/``rejected``: the load's verdict for its current batch.
PENDING, SUBMITTED, ACCEPTED, REJECTED = "pending", "submitted", "accepted", "rejected"
#: A rejected record that failed the same way on its last ``review_after`` outcomes (this job and
#: the jobs it reruns): no rerun selects it again until a person looks (``Ledger.needs_review``).
NEEDS_REVIEW = "needs_review"
#: Rejects that say nothing about the record (the batch was canceled or expired): never counted
#: toward ``needs_review``.
_NOT_THE_RECORDS_FAULT = ("canceled", "expired")
#: Submission states. ``intent`` has no batch id yet; ``created`` got one from the create call;
#: ``adopted`` got one from orphan reconciliation; ``abandoned`` is an intent known to have made
#: no batch (or given up under ``orphan_policy="resubmit"``).
INTENT, CREATED, ADOPTED, ABANDONED = "intent", "created", "adopted", "abandoned"
ORPHAN_POLICIES = ("fail", "resubmit")
#: How far before an intent a batch's ``created_at`` may lie and still be its batch (clock skew
#: between the worker and the API).
CLOCK_SKEW = timedelta(minutes=2)
_CHUNK = 500  # ids per IN (...) query: under SQLite's bound-parameter limit with room to spare
#: Ids per PostgreSQL look-up: one ``= ANY(%s)`` array parameter, so no bound-parameter limit;
#: big enough that a million-record look-up is a hundred round trips, not two thousand.
_PG_CHUNK = 10_000
#: PostgreSQL advisory lock key serialising the ledger's ``create_all`` (any constant bigint; it
#: only has to differ from the per-job claim keys, which are hashed under another prefix).
_SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"fable-ledger:schema").digest()[:8], "big", signed=True)
_SQLITE_SCHEMA_TRIES = 20
#: Server-side keepalive of the PostgreSQL claim session (seconds): a dead host's claim is freed
#: after about idle + interval x count.
_CLAIM_KEEPALIVE = (
    "SET tcp_keepalives_idle = 60",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 6",
)


#: The PostgreSQL intent path's staging table (temporary: per session, emptied at commit).
_RECORD_STAGE = sa.table(
    "fable_record_stage",
    sa.column("record_id", sa.Text),
    sa.column("custom_id", sa.Text),
    sa.column("request_digest", sa.Text),
)
#: Index on ``fable_records.submission_id``: ``write_batch`` settles a shard's records by it. A
#: ledger created before it existed gains it on first use (``Ledger.ensure_schema``).
_SUBMISSION_INDEX = "ix_fable_records_submission_id"


def _pg_copy(
    conn: sa.Connection, target: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """``COPY target (columns) FROM STDIN`` of ``rows`` on ``conn``'s own transaction.

    Why COPY: a multi-row INSERT of 100,000 ledger rows is parsed, planned and bound as SQL;
    COPY streams them in text format, several times faster on the server and on the client.
    The text is rendered by ``core.sinks``' COPY encoder (the destination's, same escaping).
    psycopg2 (``copy_expert``) and psycopg 3 (``cursor.copy``).
    """
    from airflow_provider_fable.core.sinks import _copy_text

    data = _copy_text(rows).encode()  # bytes: a StringIO would hold it as 4 bytes a character
    if not data:
        return
    sql = f"COPY {target} ({', '.join(columns)}) FROM STDIN"
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if hasattr(cursor, "copy_expert"):
            cursor.copy_expert(sql, io.BytesIO(data), size=1 << 20)
        else:
            with cursor.copy(sql) as copy:
                copy.write(data)
    finally:
        cursor.close()


from airflow_provider_fable.exceptions import ClaimLostError as ClaimLostError  # noqa: E402  (moved there)
from airflow_provider_fable.exceptions import LedgerError as LedgerError  # noqa: E402  (moved there)


def _intent_upsert(stmt: Any) -> Any:
    """A record's intent row, inserted or (sent again) reset to pending under the new submission:
    the one upsert of ``write_intent``, per-row on SQLite and from the stage on PostgreSQL."""
    return stmt.on_conflict_do_update(
        index_elements=["job_id", "record_id"],
        set_={
            "custom_id": stmt.excluded.custom_id,
            "status": PENDING,
            "submission_id": stmt.excluded.submission_id,
            "request_digest": stmt.excluded.request_digest,
            "model": stmt.excluded.model,
            "updated_at": stmt.excluded.updated_at,
        },
    )


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ts(value: datetime) -> str:
    """Timestamps are stored as fixed-width UTC ISO text: sortable and identical on both dialects."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _tables(meta: sa.MetaData) -> dict[str, sa.Table]:
    text, integer = sa.Text, sa.BigInteger
    tables = {
        "meta": sa.Table(
            "fable_ledger_meta",
            meta,
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", text),
        ),
        "jobs": sa.Table(
            "fable_jobs",
            meta,
            sa.Column("job_id", sa.String(64), primary_key=True),  # the BatchJob fingerprint
            sa.Column("model", text, nullable=False),
            sa.Column("spec", text),  # JSON summary: template, output model, id field, max_tokens...
            sa.Column("parent_job", sa.String(64)),  # the job whose failures this one reruns
            sa.Column("created_at", text, nullable=False),
        ),
        "submissions": sa.Table(
            "fable_submissions",
            meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("job_id", sa.String(64), nullable=False, index=True),
            sa.Column("run_key", text, nullable=False),  # dag_id/run_id/task_id/map_index
            sa.Column("api", text),  # base URL (+ workspace) the batch lives on
            sa.Column("digest", sa.String(64)),  # sha256 of the shard's request lines
            sa.Column("shard", sa.Integer, nullable=False),
            sa.Column("request_count", integer, nullable=False),
            sa.Column("byte_size", integer, nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("batch_id", sa.String(128), unique=True),
            sa.Column("intent_at", text, nullable=False),
            sa.Column("batch_at", text),
            sa.Column("note", text),
        ),
        "records": sa.Table(
            "fable_records",
            meta,
            sa.Column("job_id", sa.String(64), primary_key=True),
            sa.Column("record_id", text, primary_key=True),
            sa.Column("custom_id", sa.String(64), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("batch_id", sa.String(128), index=True),
            sa.Column("submission_id", sa.Integer),
            sa.Column("request_digest", sa.String(64)),
            sa.Column("reason", text),
            sa.Column("retryable", sa.Boolean),
            sa.Column("attempts", sa.Integer, nullable=False, default=0),
            sa.Column("model", text),
            sa.Column("superseded_by", sa.String(64)),  # a child job accepted it later
            sa.Column("created_at", text, nullable=False),
            sa.Column("updated_at", text, nullable=False),
            sa.Index(_SUBMISSION_INDEX, "submission_id"),
        ),
        "outcomes": sa.Table(
            "fable_record_outcomes",
            meta,
            sa.Column("job_id", sa.String(64), primary_key=True),
            sa.Column("record_id", text, primary_key=True),
            sa.Column("batch_id", sa.String(128), primary_key=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("reason", text),
            sa.Column("retryable", sa.Boolean),
            sa.Column("superseded", sa.Boolean, nullable=False, default=False),
            sa.Column("at", text, nullable=False),
        ),
        # Issue #17 additions (new tables only: existing ledgers gain them on first use, the schema
        # version stays). What a load measured and counted per (job, batch): the measured output
        # tokens every later estimate of the job uses, and which batch's cost was already counted.
        "usage": sa.Table(
            "fable_batch_usage",
            meta,
            sa.Column("job_id", sa.String(64), primary_key=True),
            sa.Column("batch_id", sa.String(128), primary_key=True),
            sa.Column("model", text),
            sa.Column("run_key", text),  # the load's submit run (when the load was given it)
            sa.Column("pilot", sa.Boolean, nullable=False, default=False),
            sa.Column("succeeded", integer, nullable=False),  # results with usage (the mean's count)
            sa.Column("output_tokens", integer, nullable=False),  # their output tokens, summed
            sa.Column("cost_usd", sa.Float),
            sa.Column("at", text, nullable=False),
        ),
        # Records a run re-attached to a batch it shares with other records (a pilot whose sample
        # sits in an older full batch): the load of that run loads only these.
        "selection": sa.Table(
            "fable_run_selection",
            meta,
            sa.Column("job_id", sa.String(64), primary_key=True),
            sa.Column("run_key", text, primary_key=True),
            sa.Column("batch_id", sa.String(128), primary_key=True),
            sa.Column("record_id", text, primary_key=True),
        ),
    }
    # Room on each page of fable_records for the load's verdict (status, reason...: no indexed
    # column) to be a HOT update, written beside the row without touching its indexes. New
    # PostgreSQL ledgers only. An ALTER after CREATE, not ``postgresql_with=``: SQLAlchemy
    # accepts that table option only from 2.1, and the floor is 2.0.50 (docs/compatibility.md).
    sa.event.listen(
        tables["records"],
        "after_create",
        sa.DDL("ALTER TABLE %(fullname)s SET (fillfactor = 70)").execute_if(dialect="postgresql"),  # type: ignore[no-untyped-call]
    )
    return tables


def _exactly_once_tables(meta: sa.MetaData) -> dict[str, sa.Table]:
    """Tables added for issue #18 (new tables only: existing ones keep their columns)."""
    return {
        # A job registered under the pre-#18 path-dependent fingerprint keeps its id: the new
        # fingerprint points at it, so in-flight jobs re-attach instead of paying again.
        "aliases": sa.Table(
            "fable_job_aliases",
            meta,
            sa.Column("alias", sa.String(64), primary_key=True),  # the new fingerprint
            sa.Column("job_id", sa.String(64), nullable=False),  # the job's id in the ledger
            sa.Column("created_at", sa.Text, nullable=False),
        ),
        # Who holds a job's submit claim. On SQLite the row *is* the claim; on PostgreSQL the
        # claim is a session advisory lock and the row only says who holds it (for the log).
        "claims": sa.Table(
            "fable_job_claims",
            meta,
            sa.Column("job_id", sa.String(64), primary_key=True),
            sa.Column("owner", sa.Text, nullable=False),  # host:pid:start:token
            sa.Column("run_key", sa.Text),
            sa.Column("claimed_at", sa.Text, nullable=False),
        ),
    }


def _process_start(pid: int) -> str:
    """Start time (clock ticks since boot) of a process, '' when unknown: tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _owner_token() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}:{uuid.uuid4().hex[:12]}"


def _owner_is_dead(owner: str) -> bool:
    """Whether the process behind a claim is provably gone: only decidable on the same host.

    A claim of another host is never judged dead here (the embedded SQLite ledger is one machine
    only); the wait log says how to remove it by hand.
    """
    host, _, rest = owner.partition(":")
    pid_text, _, rest = rest.partition(":")
    start, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):  # killed, not yet reaped by its parent
            return True
    except (OSError, IndexError):
        return False
    return bool(start) and _process_start(pid) not in ("", start)  # the pid was reused


class JobClaim:
    """A held submit claim of one job (``Ledger.claim``). ``verify`` before each paid create."""

    def __init__(self, ledger: Ledger, job_id: str, owner: str, conn: Any = None) -> None:
        self.ledger, self.job_id, self.owner, self._conn = ledger, job_id, owner, conn

    def verify(self) -> None:
        """Raise ``LedgerError`` when the claim was lost (its database session ended): pay nothing.

        On PostgreSQL the advisory lock lives as long as the session that took it; a ledger
        outage ends the session, and another submitter may now hold the claim.
        """
        try:
            if self._conn is not None:
                self._conn.execute(sa.select(sa.literal(1))).scalar_one()
                return
            c = self.ledger.claims.c
            with self.ledger.engine.connect() as conn:
                holder = conn.execute(sa.select(c.owner).where(c.job_id == self.job_id)).scalar()
        except sa.exc.SQLAlchemyError as exc:
            raise ClaimLostError(
                f"lost the submit claim of job {self.job_id} ({type(exc).__name__}); nothing more is "
                "created by this try, a retry re-attaches to what exists"
            ) from exc
        if holder != self.owner:
            raise ClaimLostError(
                f"lost the submit claim of job {self.job_id} (now held by {holder!r}); nothing more is "
                "created by this try, a retry re-attaches to what exists"
            )


@dataclass(frozen=True)
class Submission:
    id: int
    job_id: str
    run_key: str
    shard: int
    request_count: int
    byte_size: int
    state: str
    batch_id: str | None
    intent_at: datetime
    api: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class RecordState:
    record_id: str
    custom_id: str
    status: str
    batch_id: str | None
    request_digest: str | None
    retryable: bool | None
    superseded_by: str | None
    api: str | None  # where its current batch lives
    run_key: str | None  # the run that last submitted it


@dataclass(frozen=True)
class Outcome:
    """One load verdict; the field names match ``core.loading.RecordOutcome``."""

    record_id: str
    custom_id: str
    status: str
    reason: str | None
    retryable: bool
    batch_id: str


@dataclass(frozen=True)
class BatchCandidate:
    """What orphan reconciliation needs from a listed batch (the hook adapts the SDK's object)."""

    id: str
    created_at: datetime
    request_count: int


class Ledger:
    """The ledger on one SQLAlchemy engine. Cheap to build; ``ensure_schema`` runs once per object."""

    def __init__(self, engine: sa.engine.Engine, *, schema: str | None = None) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"the ledger supports sqlite and postgresql, not {engine.dialect.name!r}")
        self.engine = engine
        self.metadata = sa.MetaData(schema=schema)
        t = _tables(self.metadata)
        self.meta, self.jobs, self.submissions = t["meta"], t["jobs"], t["submissions"]
        self.records, self.outcomes = t["records"], t["outcomes"]
        self.usage, self.selection = t["usage"], t["selection"]
        x = _exactly_once_tables(self.metadata)
        self.aliases, self.claims = x["aliases"], x["claims"]
        self._ready = False
        #: PostgreSQL: rows this object wrote per table since its last ANALYZE, and the next
        #: threshold (``_analyze_after``).
        self._written: dict[str, int] = {}
        self._analyze_at: dict[str, int] = {}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Ledger:
        return cls(sa.create_engine(url), **kwargs)

    # ------------------------------------------------------------------ schema
    def ensure_schema(self) -> Ledger:
        """Create the tables when missing; refuse a ledger written by a newer schema version."""
        if self._ready:
            return self
        self._create_tables()
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(
                    self._insert(self.meta)
                    .values(key="schema_version", value=str(SCHEMA_VERSION))
                    .on_conflict_do_nothing()
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger has schema version {row[0]}, newer than this provider's {SCHEMA_VERSION}; "
                    "upgrade airflow-provider-fable on this worker"
                )
        self._ready = True
        return self

    def _create_tables(self) -> None:
        """``create_all``, safe when several tasks open a fresh ledger at the same moment.

        Two concurrent ``CREATE TABLE`` of one name fail on PostgreSQL with ``UniqueViolation ...
        pg_type_typname_nsp_index`` (``checkfirst`` looks before either has committed), and on
        SQLite with "table ... already exists" or "database is locked". PostgreSQL: one
        transaction holding a transaction-level advisory lock, so the others wait and then find
        the tables. SQLite (no advisory locks): the loser tries again and then finds them.
        """
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
                self.metadata.create_all(conn, checkfirst=True)
                self._submission_index().create(conn, checkfirst=True)
            return
        for attempt in range(_SQLITE_SCHEMA_TRIES):
            try:
                with self.engine.begin() as conn:
                    self.metadata.create_all(conn, checkfirst=True)
                    self._submission_index().create(conn, checkfirst=True)
                return
            except sa.exc.OperationalError as exc:
                text = str(exc.orig)
                if attempt + 1 == _SQLITE_SCHEMA_TRIES or not ("already exists" in text or "locked" in text):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _submission_index(self) -> sa.Index:
        """``fable_records.submission_id``'s index: ``create_all`` makes it with a new table only,
        so a ledger from before it existed gets it here (once; later calls find it)."""
        return next(i for i in self.records.indexes if i.name == _SUBMISSION_INDEX)

    def schema_version(self) -> int:
        self.ensure_schema()
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")
                ).scalar_one()
            )

    def _insert(self, table: sa.Table) -> Any:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]  # same call, other dialect
        return insert(table)

    # ------------------------------------------------------------------ jobs
    def register_job(
        self, job_id: str, *, model: str, spec: dict[str, Any] | None = None, parent_job: str | None = None
    ) -> None:
        """Record the job once (same fingerprint = same job; later calls change nothing)."""
        self.ensure_schema()
        row = {
            "job_id": job_id,
            "model": model,
            "spec": json.dumps(spec or {}, sort_keys=True, default=str),
            "parent_job": parent_job,
            "created_at": _ts(utcnow()),
        }
        with self.engine.begin() as conn:
            conn.execute(self._insert(self.jobs).values(**row).on_conflict_do_nothing())
            if parent_job:
                conn.execute(
                    sa.update(self.jobs)
                    .where(self.jobs.c.job_id == job_id, self.jobs.c.parent_job.is_(None))
                    .values(parent_job=parent_job)
                )

    def job(self, job_id: str) -> dict[str, Any] | None:
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.jobs).where(self.jobs.c.job_id == job_id)).mappings().first()
        return dict(row) if row else None

    def resolve_job(self, job_id: str, legacy_id: str | None = None) -> str:
        """The ledger's id for a job whose fingerprint is ``job_id``.

        Normally ``job_id`` itself. A job that an older provider registered under its
        path-dependent fingerprint (``BatchJob.legacy_fingerprint``) and that has no rows under
        the new one keeps its old id: the new fingerprint becomes an alias of it (in
        ``fable_job_aliases``), so its batches are re-attached, also by workers whose DAG folder
        lies elsewhere (their legacy fingerprint differs, the new one does not).
        """
        self.ensure_schema()
        a, j = self.aliases.c, self.jobs.c
        with self.engine.begin() as conn:
            target = conn.execute(sa.select(a.job_id).where(a.alias == job_id)).scalar()
            if target:
                return str(target)
            if not legacy_id or legacy_id == job_id:
                return job_id
            known = set(conn.execute(sa.select(j.job_id).where(j.job_id.in_([job_id, legacy_id]))).scalars())
            if job_id in known or legacy_id not in known:
                return job_id
            conn.execute(
                self._insert(self.aliases)
                .values(alias=job_id, job_id=legacy_id, created_at=_ts(utcnow()))
                .on_conflict_do_nothing()
            )
            return str(conn.execute(sa.select(a.job_id).where(a.alias == job_id)).scalar_one())

    @contextmanager
    def claim(
        self,
        job_id: str,
        *,
        run_key: str | None = None,
        on_wait: Callable[[str], None] | None = None,
        poll: float = 0.5,
    ) -> Iterator[JobClaim]:
        """Hold the job's submit claim: one submitter of a job at a time decides, intends and creates.

        Without it, two runs of the same job at once (two DAG runs, two DAGs with the same
        submit, mapped tasks of one job) each saw the records as unsent and each paid, and a
        sibling's live intent looked orphaned. Holding the claim across "reconcile, decide what
        to send, write intents, create, record batch ids", the second submitter waits, then finds
        the first's batches and attaches. And every open intent a holder sees belongs to a
        submitter that no longer holds the claim (finished or dead), so settling it is safe.

        PostgreSQL: a session-level advisory lock keyed on the job, on a connection of its own
        (released when the process dies: the session ends with it). SQLite: a row in
        ``fable_job_claims`` written in one statement; a row whose process is provably gone (same
        host, pid dead or reused) is taken over. ``on_wait`` is told once who holds it.
        """
        self.ensure_schema()
        owner = _owner_token()
        c = self.claims.c
        told = False

        def waiting() -> None:
            nonlocal told
            if told or on_wait is None:
                return
            told = True
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(self.claims).where(c.job_id == job_id)).first()
            who = (
                f"run {row.run_key} (process {row.owner}, since {row.claimed_at})"
                if row
                else "another submit"
            )
            on_wait(who)

        row = {"job_id": job_id, "owner": owner, "run_key": run_key}
        if self.engine.dialect.name == "postgresql":
            key = int.from_bytes(
                hashlib.sha256(b"fable-ledger:job:" + job_id.encode()).digest()[:8], "big", signed=True
            )
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                # A worker host that vanishes sends no FIN: the server would keep its session
                # (and the claim) until TCP keepalive gives up, 2 h by default. Ask for ~2 min.
                for setting in _CLAIM_KEEPALIVE:
                    try:
                        conn.exec_driver_sql(setting)
                    except sa.exc.SQLAlchemyError:  # a pooler may refuse SET: keep the server's
                        break
                while not conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar_one():
                    waiting()
                    time.sleep(poll)
                stmt = self._insert(self.claims).values(**row, claimed_at=_ts(utcnow()))
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["job_id"],
                        set_={k: stmt.excluded[k] for k in ("owner", "run_key", "claimed_at")},
                    )
                )
                try:
                    yield JobClaim(self, job_id, owner, conn)
                finally:
                    try:
                        conn.execute(sa.delete(self.claims).where(c.job_id == job_id, c.owner == owner))
                        conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
                    except sa.exc.SQLAlchemyError:
                        pass  # the session is gone, and the lock with it
            finally:
                conn.close()
            return
        while True:
            try:
                with self.engine.begin() as conn:
                    got = conn.execute(
                        self._insert(self.claims)
                        .values(**row, claimed_at=_ts(utcnow()))
                        .on_conflict_do_nothing()
                    ).rowcount
                    if got == 1:
                        break
                    holder = conn.execute(sa.select(c.owner).where(c.job_id == job_id)).scalar()
                    if holder is not None and _owner_is_dead(holder):
                        conn.execute(sa.delete(self.claims).where(c.job_id == job_id, c.owner == holder))
                        continue
            except sa.exc.OperationalError as exc:
                if "locked" not in str(exc.orig):
                    raise
                # Another writer holds the file (a big intent, a load's verdicts): try again.
            waiting()
            time.sleep(poll)
        try:
            yield JobClaim(self, job_id, owner)
        finally:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(self.claims).where(c.job_id == job_id, c.owner == owner))

    # ------------------------------------------------------------------ records
    def record_states(self, job_id: str, record_ids: Iterable[str]) -> dict[str, RecordState]:
        """Current rows of the given records in ``job_id`` (absent ids: never seen by this job)."""
        self.ensure_schema()
        c, s = self.records.c, self.submissions.c
        out: dict[str, RecordState] = {}
        ids = list(dict.fromkeys(record_ids))
        pg = self.engine.dialect.name == "postgresql"
        with self.engine.connect() as conn:
            for part in _chunks(ids, _PG_CHUNK if pg else _CHUNK):
                rows = conn.execute(
                    self._for_ids(
                        sa.select(
                            c.record_id, c.custom_id, c.status, c.batch_id, c.request_digest, c.retryable,
                            c.superseded_by, s.api, s.run_key,
                        )
                        .select_from(self.records.outerjoin(self.submissions, s.id == c.submission_id))
                        .where(c.job_id == job_id),
                        part,
                    )
                )  # fmt: skip
                for r in rows:
                    out[r.record_id] = RecordState(*r)
        return out

    def _for_ids(self, query: sa.Select[Any], ids: Sequence[str], column: Any = None) -> sa.Select[Any]:
        """``query`` restricted to the records ``ids`` (``column``: their id column, by default
        ``fable_records.record_id``; the query must name the job(s), the key's first column).

        SQLite: ``record_id IN (?, ...)``. PostgreSQL: the ids are one array parameter, unnested
        and joined LATERAL to ``query`` (fenced with ``OFFSET 0``), so each id is one probe of
        the primary key (job, record) whatever the table's statistics say. Why not ``IN``/``=
        ANY``: right after a big submit the table has no statistics yet, the planner guesses a
        few thousand rows for the job, finds scanning them all cheaper than probing thousands of
        ids, and every look-up then reads every record of the job (quadratic: the 1M-record
        look-up that never finished). The probe plan is linear.
        """
        column = self.records.c.record_id if column is None else column
        if self.engine.dialect.name != "postgresql":
            return query.where(column.in_(ids))
        from sqlalchemy.dialects.postgresql import ARRAY

        probe = (
            sa.func.unnest(sa.bindparam(None, list(ids), type_=ARRAY(sa.Text)))
            .table_valued("rid")
            .render_derived("probe")
        )
        hit = query.where(column == probe.c.rid).offset(0).lateral("hit")
        return sa.select(*hit.c).select_from(probe).join(hit, sa.true())

    def has_records(self, job_id: str) -> bool:
        """Whether the ledger holds any record of ``job_id`` (a first submit: no look-up needed)."""
        self.ensure_schema()
        c = self.records.c
        with self.engine.connect() as conn:
            return conn.execute(sa.select(c.record_id).where(c.job_id == job_id).limit(1)).first() is not None

    def rerun_ids(
        self, rerun_of: str, *, retryable_only: bool = False, job_id: str | None = None,
        run_key: str | None = None, limit: int | None = None,
    ) -> set[str] | None:  # fmt: skip
        """Every id a ``rerun=`` run selects (see ``rerun_selected``) as one set, or None when
        there are more than ``limit``: then the caller asks ``rerun_selected`` per chunk.

        Why both: two scans build the set fast (a rerun usually selects a few thousand rejects),
        but a set of millions of ids costs hundreds of MB; past ``limit`` the database answers
        per chunk instead and memory stays flat.
        """
        self.ensure_schema()
        c, s = self.records.c, self.submissions.c
        failed = sa.select(c.record_id).where(
            c.job_id == rerun_of, c.status == REJECTED, c.superseded_by.is_(None)
        )
        if retryable_only:
            failed = failed.where(c.retryable.is_(True))
        queries = [failed]
        if job_id is not None and run_key is not None:
            queries.append(
                sa.select(c.record_id)
                .select_from(self.records.join(self.submissions, s.id == c.submission_id))
                .where(c.job_id == job_id, s.run_key == run_key)
            )
        out: set[str] = set()
        seen = 0
        with self.engine.connect() as conn:
            for q in queries:
                if limit is not None:
                    q = q.limit(limit - seen + 1)
                for part in conn.execute(q).scalars().partitions(10_000):
                    out.update(part)
                    seen += len(part)
                if limit is not None and seen > limit:
                    return None
        return out

    def rerun_selected(
        self, rerun_of: str, record_ids: Sequence[str], *, retryable_only: bool = False,
        job_id: str | None = None, run_key: str | None = None,
    ) -> set[str]:  # fmt: skip
        """Which of ``record_ids`` a ``rerun=`` run selects: rejected in ``rerun_of`` (only
        retryable rejects on request, not superseded), or last submitted by ``run_key`` in
        ``job_id`` (a retry of the rerun finds what its earlier try already sent again).

        The same ids as ``set(failed(rerun_of)) | set(record_ids_of_run(job_id, run_key))``
        restricted to ``record_ids``, asked chunk by chunk: the submit no longer builds a set of
        every failed id (a million ids held in a Python set), the database answers per chunk.
        """
        self.ensure_schema()
        c, s = self.records.c, self.submissions.c
        pg = self.engine.dialect.name == "postgresql"
        out: set[str] = set()
        ids = list(dict.fromkeys(record_ids))
        with self.engine.connect() as conn:
            for part in _chunks(ids, _PG_CHUNK if pg else _CHUNK):
                failed = sa.select(c.record_id).where(
                    c.job_id == rerun_of, c.status == REJECTED, c.superseded_by.is_(None)
                )
                if retryable_only:
                    failed = failed.where(c.retryable.is_(True))
                out.update(conn.execute(self._for_ids(failed, part)).scalars())
                if job_id is not None and run_key is not None:
                    mine = (
                        sa.select(c.record_id)
                        .select_from(self.records.join(self.submissions, s.id == c.submission_id))
                        .where(c.job_id == job_id, s.run_key == run_key)
                    )
                    out.update(conn.execute(self._for_ids(mine, part)).scalars())
        return out

    def record_ids(
        self, job_id: str, *, statuses: Sequence[str] | None = None, retryable: bool | None = None,
        include_superseded: bool = False,
    ) -> list[str]:  # fmt: skip
        """Record ids of a job, filtered by status (and retryable flag), in id order."""
        self.ensure_schema()
        c = self.records.c
        q = sa.select(c.record_id).where(c.job_id == job_id).order_by(c.record_id)
        if statuses:
            q = q.where(c.status.in_(list(statuses)))
        if retryable is not None:
            q = q.where(c.retryable.is_(retryable))
        if not include_superseded:
            q = q.where(c.superseded_by.is_(None))
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def record_ids_of_run(self, job_id: str, run_key: str) -> list[str]:
        """Records of a job whose latest submission was made by ``run_key`` (a retry's own work)."""
        self.ensure_schema()
        c, s = self.records.c, self.submissions.c
        q = (
            sa.select(c.record_id)
            .select_from(self.records.join(self.submissions, s.id == c.submission_id))
            .where(c.job_id == job_id, s.run_key == run_key)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def unloaded_batches(self, job_id: str, *, api: str | None = None) -> list[str]:
        """Batches holding records of the job that no load has given a verdict (``submitted``).

        A rerun asks: a batch whose wait failed (every request expired, errored or was canceled)
        is never loaded, so its records would stay ``submitted``, never rejects a rerun picks.
        """
        self.ensure_schema()
        c, s = self.records.c, self.submissions.c
        q = (
            sa.select(c.batch_id)
            .select_from(self.records.join(self.submissions, s.id == c.submission_id))
            .where(c.job_id == job_id, c.status == SUBMITTED, c.batch_id.is_not(None))
            .distinct()
            .order_by(c.batch_id)
        )
        if api is not None:
            q = q.where(s.api == api)
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def failed(self, job_id: str, *, retryable_only: bool = False) -> list[str]:
        """Ids the job has rejected (only retryable ones on request), not accepted by a later rerun."""
        return self.record_ids(job_id, statuses=[REJECTED], retryable=True if retryable_only else None)

    def summary(self, job_id: str) -> dict[str, int]:
        """Record counts by status for a job (superseded rejects counted apart)."""
        self.ensure_schema()
        c = self.records.c
        q = (
            sa.select(c.status, (c.superseded_by.is_not(None)).label("sup"), sa.func.count())
            .where(c.job_id == job_id)
            .group_by(c.status, c.superseded_by.is_not(None))
        )
        out: dict[str, int] = {}
        with self.engine.connect() as conn:
            for status, sup, n in conn.execute(q):
                key = f"{status}_superseded" if sup else status
                out[key] = out.get(key, 0) + int(n)
        return out

    def history(self, record_id: str) -> list[dict[str, Any]]:
        """Every load verdict ever recorded for a record id, across jobs, oldest first."""
        self.ensure_schema()
        o = self.outcomes.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(self.outcomes).where(o.record_id == record_id).order_by(o.at)
            ).mappings()
            return [dict(r) for r in rows]

    # ------------------------------------------------------------------ submissions
    def _submission(self, row: Any) -> Submission:
        return Submission(
            id=row.id, job_id=row.job_id, run_key=row.run_key, shard=row.shard,
            request_count=row.request_count, byte_size=row.byte_size, state=row.state,
            batch_id=row.batch_id, intent_at=_parse_ts(row.intent_at), api=row.api, digest=row.digest,
        )  # fmt: skip

    def write_intent(
        self,
        job_id: str,
        *,
        run_key: str,
        shard: int,
        records: Sequence[tuple[str, str, str]],
        byte_size: int,
        model: str,
        api: str | None = None,
        digest: str | None = None,
    ) -> Submission:
        """Write the intent of one shard *before* its create: one submission row plus its records.

        ``records`` is ``(record_id, custom_id, request_digest)`` per request. Records already
        known to the job move to ``pending`` under this submission; their previous batch id is
        kept until the new one exists, so the load's staleness check stays right meanwhile.
        """
        self.ensure_schema()
        now = _ts(utcnow())
        with self.engine.begin() as conn:
            sub_id = conn.execute(
                sa.insert(self.submissions)
                .values(
                    job_id=job_id, run_key=run_key, shard=shard, request_count=len(records),
                    byte_size=byte_size, state=INTENT, intent_at=now, api=api, digest=digest,
                )
                .returning(self.submissions.c.id)
            ).scalar_one()  # fmt: skip
            pg = self.engine.dialect.name == "postgresql"
            if pg:
                self._write_records_staged(conn, job_id, sub_id, records, model, now)
            else:
                # SQLite: the same upsert as one prepared statement over plain tuples. Through
                # SQLAlchemy's executemany of dicts each row paid its parameter processing
                # (~3 s per million intents); the DB-API cursor binds tuples in C.
                conn.exec_driver_sql(
                    self._sqlite_intent_sql(),
                    [
                        (job_id, rid, cid, PENDING, sub_id, digest, 0, model, now, now)
                        for rid, cid, digest in records
                    ],
                )
            row = conn.execute(sa.select(self.submissions).where(self.submissions.c.id == sub_id)).one()
        if pg:
            self._analyze_after(self.records, len(records))
        return self._submission(row)

    def _sqlite_intent_sql(self) -> str:
        """``_intent_upsert`` as SQLite text with positional parameters (same columns, same rule)."""
        target = self.engine.dialect.identifier_preparer.format_table(self.records)
        return (
            f"INSERT INTO {target} (job_id, record_id, custom_id, status, submission_id, request_digest, "
            "attempts, model, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (job_id, record_id) DO UPDATE SET custom_id = excluded.custom_id, "
            f"status = '{PENDING}', submission_id = excluded.submission_id, "
            "request_digest = excluded.request_digest, model = excluded.model, updated_at = excluded.updated_at"
        )

    def _write_records_staged(
        self, conn: sa.Connection, job_id: str, sub_id: int, records: Sequence[tuple[str, str, str]],
        model: str, now: str,
    ) -> None:  # fmt: skip
        """``write_intent``'s records on PostgreSQL: COPY into a staging table, one joined upsert.

        The row-at-a-time path (a 500-row multi-VALUES upsert per chunk) ran at ~10k records/s;
        this is one COPY and one ``INSERT ... SELECT ... ON CONFLICT`` per shard. A record id
        given twice keeps its last row, as the sequential upserts did (an upsert cannot touch a
        row twice in one statement, so they are folded here first).
        """
        latest = {rid: (cid, digest) for rid, cid, digest in records}
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE IF NOT EXISTS {_RECORD_STAGE.name} (record_id TEXT, custom_id TEXT, "
            "request_digest TEXT) ON COMMIT DELETE ROWS"
        )
        conn.exec_driver_sql(f"TRUNCATE {_RECORD_STAGE.name}")  # two intents in one transaction
        _pg_copy(
            conn, _RECORD_STAGE.name, ("record_id", "custom_id", "request_digest"),
            [(rid, cid, digest) for rid, (cid, digest) in latest.items()],
        )  # fmt: skip
        del latest
        s = _RECORD_STAGE.c
        ins = self._insert(self.records).from_select(
            [
                "job_id", "record_id", "custom_id", "status", "submission_id", "request_digest",
                "attempts", "model", "created_at", "updated_at",
            ],
            sa.select(
                sa.literal(job_id, sa.String(64)), s.record_id, s.custom_id, sa.literal(PENDING, sa.String(16)),
                sa.literal(sub_id, sa.Integer), s.request_digest, sa.literal(0, sa.Integer),
                sa.literal(model, sa.Text), sa.literal(now, sa.Text), sa.literal(now, sa.Text),
            ),
        )  # fmt: skip
        conn.execute(_intent_upsert(ins))

    def _analyze_after(self, table: sa.Table, rows: int) -> None:
        """PostgreSQL: ``ANALYZE table`` once this object has written 50,000 rows to it, then
        after twice as many each time (a handful of ANALYZEs per million rows, ~0.1 s each).

        Why: a ledger table filled by one big submit or load has no statistics until autovacuum
        gets to it (a minute or more), and the planner then takes a million-row job for a few
        thousand rows and may scan them all per chunk (the verdicts' joined updates). With
        statistics it probes the keys, and each chunk costs the same at 10M records as at 100k.
        """
        name = table.name
        self._written[name] = self._written.get(name, 0) + rows
        if self._written[name] < self._analyze_at.get(name, 50_000):
            return
        self._analyze_at[name] = 2 * self._written[name]
        target = self.engine.dialect.identifier_preparer.format_table(table)
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"ANALYZE {target}")

    def write_batch(
        self, submission_id: int, batch_id: str, *, state: str = CREATED, note: str | None = None
    ) -> bool:
        """The batch exists: the submission gets its id and its records become ``submitted``.

        Guarded, so no settled submission is overwritten: an adoption (``state=adopted``) only
        settles a submission still in ``intent``; the submitter's own ``created`` also records a
        batch over an ``abandoned`` intent (the batch exists and was paid for: it must be known,
        and its records that were not re-sent meanwhile are in it). Returns whether it wrote.
        """
        self.ensure_schema()
        now = _ts(utcnow())
        s = self.submissions.c
        from_states = [INTENT] if state != CREATED else [INTENT, ABANDONED]
        with self.engine.begin() as conn:
            changed = conn.execute(
                sa.update(self.submissions)
                .where(s.id == submission_id, s.state.in_(from_states))
                .values(batch_id=batch_id, state=state, batch_at=now, note=note)
            ).rowcount
            if not changed:
                return False
            c = self.records.c
            conn.execute(
                sa.update(self.records)
                # By submission, whatever the status: a late load of the record's previous batch
                # must not keep it out of the batch that now holds it.
                .where(c.submission_id == submission_id)
                .values(
                    status=SUBMITTED, batch_id=batch_id, attempts=c.attempts + 1, reason=None,
                    retryable=None, superseded_by=None, updated_at=now,
                )
            )  # fmt: skip
        return True

    def abandon(self, submission_id: int, note: str) -> bool:
        """An intent that made no batch (or is given up on): its records are free to send again.

        Only an ``intent`` can be abandoned: a submission that got its batch (created or
        adopted) meanwhile stays settled. Returns whether it was abandoned.
        """
        self.ensure_schema()
        s = self.submissions.c
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    sa.update(self.submissions)
                    .where(s.id == submission_id, s.state == INTENT)
                    .values(state=ABANDONED, note=note)
                ).rowcount
            )

    def open_intents(self, job_id: str, *, api: str | None = None) -> list[Submission]:
        """Intents of a job that never got a batch id: crashes or lost create responses."""
        self.ensure_schema()
        s = self.submissions.c
        q = (
            sa.select(self.submissions)
            .where(s.job_id == job_id, s.state == INTENT)
            .order_by(s.intent_at, s.id)
        )
        if api is not None:
            q = q.where(s.api == api)
        with self.engine.connect() as conn:
            rows = conn.execute(q)
            return [self._submission(r) for r in rows]

    def submissions_of(self, job_id: str | None = None, *, run_key: str | None = None) -> list[Submission]:
        self.ensure_schema()
        s = self.submissions.c
        q = sa.select(self.submissions).order_by(s.id)
        if job_id:
            q = q.where(s.job_id == job_id)
        if run_key:
            q = q.where(s.run_key == run_key)
        with self.engine.connect() as conn:
            return [self._submission(r) for r in conn.execute(q)]

    def submission_for_batch(self, batch_id: str) -> Submission | None:
        self.ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(self.submissions).where(self.submissions.c.batch_id == batch_id)
            ).first()
        return self._submission(row) if row else None

    def claimed_batch_ids(self, batch_ids: Iterable[str]) -> set[str]:
        self.ensure_schema()
        ids = list(batch_ids)
        out: set[str] = set()
        with self.engine.connect() as conn:
            for part in _chunks(ids):
                out.update(
                    conn.execute(
                        sa.select(self.submissions.c.batch_id).where(self.submissions.c.batch_id.in_(part))
                    ).scalars()
                )
        return out

    def reconcile(
        self,
        intent: Submission,
        candidates: Iterable[BatchCandidate],
        *,
        policy: str = "fail",
        skew: timedelta = CLOCK_SKEW,
    ) -> str | None:
        """Settle an orphaned intent against the batches the API lists; returns the adopted id or None.

        A candidate is a batch created no earlier than the intent (minus clock skew) with the
        intent's request count that no submission has claimed. Exactly one: adopted. None: the
        create never made a batch, the intent is abandoned and its records are sent again.
        Several: not certain which is ours, so ``policy`` decides: ``"fail"`` raises naming them
        (a human picks; nothing is paid twice), ``"resubmit"`` abandons the intent and pays again.
        """
        if policy not in ORPHAN_POLICIES:
            raise ValueError(f"orphan_policy must be one of {ORPHAN_POLICIES}, got {policy!r}")
        since = intent.intent_at - skew
        fitting = [c for c in candidates if c.created_at >= since and c.request_count == intent.request_count]
        claimed = self.claimed_batch_ids(c.id for c in fitting)
        free = [c for c in fitting if c.id not in claimed]
        if len(free) == 1:
            if self.write_batch(
                intent.id, free[0].id, state=ADOPTED, note="adopted by orphan reconciliation"
            ):
                return free[0].id
            return self._settled_batch(intent.id)
        if not free:
            if self.abandon(intent.id, "no batch was created for this intent (none listed since it)"):
                return None
            return self._settled_batch(intent.id)
        names = ", ".join(f"{c.id} (created {c.created_at.isoformat()})" for c in free)
        if policy == "resubmit":
            if self.abandon(
                intent.id, f"ambiguous orphan, resubmitted under orphan_policy='resubmit': {names}"
            ):
                return None
            return self._settled_batch(intent.id)
        raise LedgerError(
            f"shard {intent.shard} of job {intent.job_id} (run {intent.run_key}) wrote its intent at "
            f"{intent.intent_at.isoformat()} for {intent.request_count} requests but never recorded a "
            f"batch id, and {len(free)} unclaimed batches could be it: {names}. Cancel the ones that "
            "are not yours, or set orphan_policy='resubmit' to submit these records again (paying again)."
        )

    def _settled_batch(self, submission_id: int) -> str | None:
        """The batch id of a submission someone else settled meanwhile (None when abandoned)."""
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(self.submissions.c.batch_id).where(self.submissions.c.id == submission_id)
            ).scalar()

    # ------------------------------------------------------------------ load side
    def custom_id_map(self, batch_id: str) -> dict[str, str]:
        """custom_id -> record id for records whose *current* batch is ``batch_id``.

        The load uses it twice: to map encoded custom_ids back to real ids, and to drop answers
        from a batch that is no longer a record's current one (a newer batch supersedes it).
        """
        self.ensure_schema()
        # Through the DB-API cursor, ``dict(fetchall())``: the rows of a 100,000-record batch
        # through SQLAlchemy's result (a Row object each, then a dict comprehension) took
        # ~0.3-0.85 s per batch of the load; the driver's tuples go straight into the dict.
        table = self.engine.dialect.identifier_preparer.format_table(self.records)
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        with self.engine.connect() as conn:
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(
                    f"SELECT custom_id, record_id FROM {table} WHERE batch_id = {mark}", (batch_id,)
                )
                return dict(cursor.fetchall())
            finally:
                cursor.close()

    def known_custom_ids(self, job_id: str, custom_ids: Sequence[str]) -> set[str]:
        """Which of ``custom_ids`` name a record of the job (the rest it never sent)."""
        self.ensure_schema()
        c = self.records.c
        out: set[str] = set()
        with self.engine.connect() as conn:
            for part in _chunks(sorted({str(c) for c in custom_ids})):  # (a hostile line's may be a number)
                q = sa.select(c.custom_id).where(c.job_id == job_id, c.custom_id.in_(part))
                out.update(conn.execute(q).scalars())
        return out

    def record_outcomes(
        self, job_id: str, batch_id: str, outcomes: Sequence[Any], *, review_after: int | None = 3
    ) -> None:
        """Store the load's verdicts for one batch (objects with ``Outcome``'s fields).

        The record's current row changes only when this batch is still its current batch (and no
        resubmission of it is in flight). An
        acceptance marks earlier rejects of the record (in this job and in the job it reruns)
        as superseded, so a fixed record is no longer reported as failed. A reject that makes the
        record's last ``review_after`` outcomes the same reject becomes ``needs_review``
        (``mark_needs_review``; None or 0: never).
        """
        if not outcomes:
            return
        if self.engine.dialect.name == "postgresql":
            # One PostgreSQL verdict path for the load and every other caller: COPY into a
            # staging table, then statements that can only probe the ledger from it
            # (core/ledger_bulk.py says why; the needs-review rule runs in the same transaction).
            from airflow_provider_fable.core.ledger_bulk import record_verdicts

            record_verdicts(self, job_id, batch_id, outcomes, review_after=review_after)
            return
        self.ensure_schema()
        now = _ts(utcnow())
        c, o = self.records.c, self.outcomes.c
        parent = (self.job(job_id) or {}).get("parent_job")
        events = [
            {
                "job_id": job_id, "record_id": x.record_id, "batch_id": batch_id, "status": x.status,
                "reason": x.reason, "retryable": bool(x.retryable), "superseded": False, "at": now,
            }
            for x in outcomes
        ]  # fmt: skip
        accepted = [x.record_id for x in outcomes if x.status == ACCEPTED]
        with self.engine.begin() as conn:
            for part in _chunks(events):
                stmt = self._insert(self.outcomes)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["job_id", "record_id", "batch_id"],
                    set_={k: stmt.excluded[k] for k in ("status", "reason", "retryable", "at")},
                )
                conn.execute(stmt, list(part))
            conn.execute(
                sa.update(self.records)
                .where(
                    c.job_id == sa.bindparam("j"),
                    c.record_id == sa.bindparam("r"),
                    c.batch_id == sa.bindparam("b"),
                    c.status != PENDING,  # a resubmission is in flight: this verdict is history
                )
                .values(status=sa.bindparam("s"), reason=sa.bindparam("why"), retryable=sa.bindparam("rt"), updated_at=now),
                [
                    {"j": job_id, "r": x.record_id, "b": batch_id, "s": x.status, "why": x.reason, "rt": bool(x.retryable)}
                    for x in outcomes
                ],
            )  # fmt: skip
            jobs = [job_id] + ([parent] if parent else [])
            for part in _chunks(accepted):
                conn.execute(
                    sa.update(self.outcomes)
                    .where(
                        o.job_id.in_(jobs), o.record_id.in_(part), o.status == REJECTED,
                        o.batch_id != batch_id, o.superseded.is_(False),
                    )
                    .values(superseded=True)
                )  # fmt: skip
                if parent:
                    conn.execute(
                        sa.update(self.records)
                        .where(c.job_id == parent, c.record_id.in_(part), c.status == REJECTED)
                        .values(superseded_by=job_id, updated_at=now)
                    )
        self.mark_needs_review(job_id, [x.record_id for x in outcomes if x.status == REJECTED], review_after)

    # ------------------------------------------------------------------ issue #17: review, usage, selection
    def job_chain(self, job_id: str, *, depth: int = 16) -> list[str]:
        """``job_id`` and the jobs it reruns, nearest first (a rerun with another model, its parent...)."""
        chain = [job_id]
        while len(chain) < depth:
            parent = (self.job(chain[-1]) or {}).get("parent_job")
            if not parent or parent in chain:
                break
            chain.append(parent)
        return chain

    def mark_needs_review(
        self, job_id: str, record_ids: Sequence[str], review_after: int | None = 3
    ) -> list[str]:
        """Mark the given just-rejected records ``needs_review`` when their last ``review_after``
        outcomes, over this job and the jobs it reruns, are rejects with one and the same reason.

        Why: a record that fails identically on every model and every rerun (a text the model
        cannot answer within the schema, an input too long for ``max_tokens``) would otherwise be
        paid for again by every failed-records run, for ever. ``canceled``/``expired`` rejects say
        nothing about the record and never count. Returns the ids marked.
        """
        if not review_after or review_after < 1 or not record_ids:
            return []
        self.ensure_schema()
        jobs = self.job_chain(job_id)
        o, c = self.outcomes.c, self.records.c
        marked: list[str] = []
        with self.engine.begin() as conn:
            for part in _chunks(list(dict.fromkeys(record_ids))):
                found = self._for_ids(
                    sa.select(o.record_id, o.status, o.reason, o.at, o.batch_id).where(o.job_id.in_(jobs)),
                    part,
                    o.record_id,
                ).subquery()
                rows = conn.execute(
                    sa.select(found.c.record_id, found.c.status, found.c.reason).order_by(
                        found.c.record_id, found.c.at.desc(), found.c.batch_id.desc()
                    )
                )
                last: dict[str, list[tuple[str, str | None]]] = {}
                for rid, status, reason in rows:
                    seen = last.setdefault(rid, [])
                    if len(seen) < review_after:
                        seen.append((status, reason))
                hits = [
                    rid
                    for rid, seen in last.items()
                    if len(seen) == review_after
                    and len(set(seen)) == 1
                    and seen[0][0] == REJECTED
                    and seen[0][1] not in _NOT_THE_RECORDS_FAULT
                ]
                if hits:
                    conn.execute(
                        sa.update(self.records)
                        .where(c.job_id.in_(jobs), c.record_id.in_(hits), c.status == REJECTED)
                        .where(c.superseded_by.is_(None))
                        .values(status=NEEDS_REVIEW, updated_at=_ts(utcnow()))
                    )
                    marked.extend(hits)
        return marked

    def needs_review(self, job_id: str) -> list[dict[str, Any]]:
        """Records of ``job_id`` no rerun sends again until a person looks, in id order.

        Each: ``record_id``, ``reason`` (the repeated reject), ``rejects`` (how many times it was
        rejected so, over the job and the jobs it reruns), ``batch_id`` (the last), ``model``,
        ``attempts`` (batches this job sent it in). For the backlog's review table and a CLI.
        """
        self.ensure_schema()
        c, o = self.records.c, self.outcomes.c
        jobs = self.job_chain(job_id)
        rejects = (
            sa.select(sa.func.count())
            .where(o.job_id.in_(jobs), o.record_id == c.record_id, o.status == REJECTED, o.reason == c.reason)
            .scalar_subquery()
        )
        q = (
            sa.select(c.record_id, c.reason, rejects.label("rejects"), c.batch_id, c.model, c.attempts)
            .where(c.job_id == job_id, c.status == NEEDS_REVIEW)
            .order_by(c.record_id)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def count_batch_usage(
        self,
        job_id: str,
        batch_id: str,
        *,
        succeeded: int,
        output_tokens: int,
        cost_usd: float | None,
        model: str | None = None,
        run_key: str | None = None,
        pilot: bool = False,
    ) -> bool:
        """Count one loaded batch's usage and cost for the job, once: True when this call counted it.

        False means an earlier load already counted this batch for this job (a re-attached batch,
        a re-run load): its cost is not new spend, and the first measurement is kept.
        """
        self.ensure_schema()
        row = {
            "job_id": job_id, "batch_id": batch_id, "model": model, "run_key": run_key, "pilot": bool(pilot),
            "succeeded": int(succeeded), "output_tokens": int(output_tokens), "cost_usd": cost_usd,
            "at": _ts(utcnow()),
        }  # fmt: skip
        with self.engine.begin() as conn:
            done = conn.execute(
                self._insert(self.usage)
                .values(**row)
                .on_conflict_do_nothing(index_elements=["job_id", "batch_id"])
            )
            return bool(done.rowcount)

    def counted_batches(self, job_id: str, batch_ids: Iterable[str]) -> set[str]:
        """Which of ``batch_ids`` a load already counted for ``job_id``."""
        self.ensure_schema()
        u = self.usage.c
        out: set[str] = set()
        with self.engine.connect() as conn:
            for part in _chunks(list(batch_ids)):
                out.update(
                    conn.execute(
                        sa.select(u.batch_id).where(u.job_id == job_id, u.batch_id.in_(part))
                    ).scalars()
                )
        return out

    def measured_output(self, job_id: str) -> dict[str, Any] | None:
        """Mean output tokens per succeeded request over every load of the job (None: none yet).

        ``{"mean", "requests", "batches", "pilot_only", "runs"}``: ``pilot_only`` when every
        measured batch was loaded from a pilot. Kept in the ledger, not in an Airflow Variable, so
        it survives the metadata database and serves every run of the job, pilot or not.
        """
        self.ensure_schema()
        u = self.usage.c
        q = sa.select(
            sa.func.sum(u.succeeded), sa.func.sum(u.output_tokens), sa.func.count(),
            sa.func.min(sa.case((u.pilot.is_(True), 1), else_=0)),
        ).where(u.job_id == job_id, u.succeeded > 0)  # fmt: skip
        with self.engine.connect() as conn:
            n, out, batches, all_pilot = conn.execute(q).one()
            runs = list(
                conn.execute(
                    sa.select(u.run_key)
                    .where(u.job_id == job_id, u.succeeded > 0, u.run_key.is_not(None))
                    .distinct()
                ).scalars()
            )
        if not n:
            return None
        return {
            "mean": int(out) / int(n), "requests": int(n), "batches": int(batches),
            "pilot_only": bool(all_pilot), "runs": sorted(runs),
        }  # fmt: skip

    def record_selection(self, job_id: str, run_key: str, batch_id: str, record_ids: Sequence[str]) -> None:
        """Remember which records of ``batch_id`` the run ``run_key`` selected (it shares the batch)."""
        self.ensure_schema()
        rows = [
            {"job_id": job_id, "run_key": run_key, "batch_id": batch_id, "record_id": r} for r in record_ids
        ]
        with self.engine.begin() as conn:
            for part in _chunks(rows):
                conn.execute(self._insert(self.selection).on_conflict_do_nothing(), list(part))

    def selected_records(self, job_id: str, run_key: str, batch_id: str) -> set[str]:
        """The records ``record_selection`` stored for this run and batch."""
        self.ensure_schema()
        x = self.selection.c
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    sa.select(x.record_id).where(
                        x.job_id == job_id, x.run_key == run_key, x.batch_id == batch_id
                    )
                ).scalars()
            )

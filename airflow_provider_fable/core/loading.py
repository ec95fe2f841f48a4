"""Results -> validation -> sinks, in chunks, with running statistics for the task summary.

Kept out of the operator so the whole validate-and-load path can be tested and benchmarked
without Airflow: the operator only wires a hook's result stream and a database engine to it.

Memory stays flat in the size of the result file: at most one chunk of outcomes is held while it
is being validated (and the raw results of the block being validated, at most a quarter chunk),
plus (with the writer thread, on PostgreSQL by default) one chunk queued and
one being written, or (with the SQLite writer process) a chunk's worth of pieces queued and the
items of the pieces not yet committed. PostgreSQL's server process, or the SQLite writer
process, stores one chunk while Python validates the next.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel

from airflow_provider_fable.core.cost import usage_cost_usd
from airflow_provider_fable.core.results import MISSING, SUCCEEDED, BatchResult, Usage
from airflow_provider_fable.core.sinks import ResultSink, model_properties, resolve
from airflow_provider_fable.core.validation import Accepted, Outcome, Rejected, validator_for
from airflow_provider_fable.core.writer_process import (
    IDLE_COMMIT_S,
    BuildJob,
    StoreJob,
    piece_frame,
    value_counts,
    write_frame,
)

log = logging.getLogger(__name__)


class ChunkSink(Protocol):
    """What ``load_batch`` needs of a destination (``ResultSink``, ``core.parquet`` sinks)."""

    def write_chunk(
        self, accepted: list[Accepted], rejected: list[Rejected], *, batch_id: str, model: str | None
    ) -> list[Rejected]: ...


_USAGE = attrgetter("usage")
_RECORD_ID = attrgetter("record_id")
_INPUT = attrgetter("input_tokens")
_OUTPUT = attrgetter("output_tokens")
_CACHE_WRITE = attrgetter("cache_creation_input_tokens")
_CACHE_READ = attrgetter("cache_read_input_tokens")
_CACHE_WRITE_1H = attrgetter("cache_creation_1h_input_tokens")


class RecordOutcome(NamedTuple):
    """What happened to one record in one batch, reported after its chunk is committed.

    ``retryable`` follows ``validation.RETRYABLE_REASONS``: true for API trouble (errored,
    expired, canceled) and for answers a new request may get right (invalid_json, truncated,
    empty_answer, schema, invariant); false for accepted rows, refusals, unknown result types and
    ``unstorable`` rows (a valid answer the column cannot hold would fail the same way again).
    """

    record_id: str
    custom_id: str
    status: str  # "accepted" | "rejected"
    reason: str | None
    retryable: bool
    batch_id: str


def distribution_fields(output_model: type[BaseModel]) -> list[str]:
    """Output fields whose values form a closed set (enums, booleans): worth a distribution."""
    properties, defs = model_properties(output_model)
    return [
        name
        for name, prop in properties.items()
        if "enum" in (target := resolve(prop, defs)) or target.get("type") == "boolean"
    ]


@dataclass
class LoadStats:
    """Running totals over every batch loaded by one task."""

    accepted: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    distribution: dict[str, Counter[str]] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = 0.0
    #: Accepted answers not written because ``should_write`` said a newer batch owns the record.
    skipped_stale: int = 0
    #: Result lines of a record that already had one in the same batch (one verdict per record
    #: per batch: see ``load_batch``); they write nothing.
    duplicates: int = 0
    #: Result lines whose custom_id the batch never had (``ResultScreen``): logged, never a row.
    unknown_custom_ids: int = 0
    #: Unreadable result lines with no readable custom_id (``ResultScreen``): logged, never a row.
    unattributable: int = 0
    #: Price table for the cost (default table when None; see core.cost.merge_prices).
    prices: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        out = {
            "records": self.accepted + self.rejected,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "reject_reasons": dict(self.reasons.most_common()),
            "distribution": {f: dict(c.most_common()) for f, c in self.distribution.items()},
            "usage": self.usage.as_dict(),
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 6),
        }
        if self.skipped_stale:
            out["skipped_stale"] = self.skipped_stale
        for key, value in (
            ("duplicate_results", self.duplicates),
            ("unknown_custom_ids", self.unknown_custom_ids),
            ("unattributable_lines", self.unattributable),
        ):
            if value:
                out[key] = value
        return out


class _Chunk(NamedTuple):
    accepted: list[Accepted]
    rejected: list[Rejected]


#: Per distribution field, how often each raw value occurs among a chunk's accepted answers.
Counts = dict[str, dict[Any, int]]


class _Done(NamedTuple):
    """A committed chunk, its rows the database refused, and its distribution counts when the
    writer process counted them (None: ``load_batch`` counts them itself)."""

    chunk: _Chunk
    unstorable: list[Rejected]
    counts: Counts | None = None


class _Prepared(NamedTuple):
    """A chunk and, for a ``ResultSink``, its job as ``prepare_chunk`` made it (else None)."""

    chunk: _Chunk
    job: StoreJob | BuildJob | None
    kept: list[Accepted]
    early: list[Rejected]


#: Seconds a failed load waits for the chunk its writer thread is storing (see ``_Writer.close``).
_FAILED_LOAD_WAIT = 10.0


class _Writer:
    """Writes chunks in order, in a thread (pipeline) or inline; reports committed outcomes.

    Callbacks and statistics stay on the caller's thread: the writer only hands back, per
    committed chunk, the rows that turned out unstorable. For a ``ResultSink`` the chunk is
    prepared (rows, or PostgreSQL's COPY text) on the caller's thread and the writer thread only
    runs the statements: Python work on the writer thread would wait for the GIL behind the
    validating thread (each wait up to the 5 ms switch interval), which made the PostgreSQL
    server idle between statements (see docs/performance.md).
    """

    def __init__(
        self,
        sink: ResultSink | ChunkSink,
        batch_id: str,
        model: Callable[[], str | None],
        threaded: bool,
        chunk_size: int,
    ):
        self.sink, self.batch_id, self.model = sink, batch_id, model
        self.flush_size = chunk_size
        self.done: queue.Queue[_Done | BaseException] = queue.Queue()
        self.error: BaseException | None = None  # taken from ``done``, raised by ``committed``
        self.todo: queue.Queue[_Prepared | None] | None = None
        self.thread: threading.Thread | None = None
        if threaded:
            self.todo = queue.Queue(maxsize=1)  # one chunk queued + one being written: bounded
            self.thread = threading.Thread(target=self._run, name="fable-load-writer", daemon=True)
            self.thread.start()

    def _prepare(self, chunk: _Chunk) -> _Prepared:
        sink = self.sink
        if not isinstance(sink, ResultSink):
            return _Prepared(chunk, None, [], [])
        job, kept, early = sink.prepare_chunk(
            chunk.accepted, chunk.rejected, batch_id=self.batch_id, model=self.model(), deferred=True
        )
        return _Prepared(chunk, job, kept, early)

    def _write(self, work: _Prepared) -> None:
        chunk, job, kept, early = work
        if job is None:
            unstorable = self.sink.write_chunk(
                chunk.accepted, chunk.rejected, batch_id=self.batch_id, model=self.model()
            )
        else:
            assert isinstance(self.sink, ResultSink)
            unstorable = self.sink.unstorable_items(kept, early, self.sink.store(job))
        self.done.put(_Done(chunk, unstorable))

    def _run(self) -> None:
        assert self.todo is not None
        while (work := self.todo.get()) is not None:
            try:
                self._write(work)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                self.done.put(exc)
                return

    def expect_full(self) -> None:
        """A full chunk is on its way (nothing to prepare: the thread, if any, is running)."""

    def submit(self, chunk: _Chunk, final: bool = False) -> None:
        if self.todo is None:
            self._write(self._prepare(chunk))
            return
        self._put(self._prepare(chunk))

    def _put(self, work: _Prepared | None) -> None:
        """Queue ``work`` for the thread, unless the thread is gone: a plain ``put`` would wait
        forever on the full queue of a thread that failed (its error is waiting in ``done``)."""
        assert self.todo is not None and self.thread is not None
        while self.thread.is_alive():
            try:
                self.todo.put(work, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self, commit: bool = True) -> None:
        """Finish: the chunks handed over are written. Without ``commit`` (the load failed) they
        are waited for at most ``_FAILED_LOAD_WAIT`` seconds in all: a writer blocked on a lock
        must not hold the error (e.g. execution_timeout's) back until the lock goes. Either way
        only whole chunks are kept (each is one transaction)."""
        if self.todo is not None and self.thread is not None:
            if commit:
                self._put(None)
                self.thread.join()
                return
            deadline = time.monotonic() + _FAILED_LOAD_WAIT
            if self.thread.is_alive():
                try:
                    self.todo.put(None, timeout=_FAILED_LOAD_WAIT)
                except queue.Full:
                    return  # the writer is stuck; it is a daemon thread
            self.thread.join(max(0.0, deadline - time.monotonic()))

    def committed(self) -> list[_Done]:
        """Chunks committed so far; the writer's error once every committed one was returned
        (the chunks it committed before failing are reported too)."""
        out = []
        while self.error is None:
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                self.error = item
            else:
                out.append(item)
        if not out and self.error is not None:
            error, self.error = self.error, None
            raise error
        return out


class _ProcessWriter:
    """Chunks stored by a second process while this one parses and validates the next.

    For SQLite, whose ``executemany`` holds the GIL for every row, so a thread cannot overlap
    it with validation; on a 2-core worker the two halves then run side by side. This process
    keeps the callbacks and the statistics and hands over each chunk as plain data
    (``ResultSink.prepare_chunk(deferred=True)``: the answers' data dicts, which the writer turns
    into rows itself, since validation here is the slower half; finished rows when ids repeat or
    are integers); the writer process (``core.writer_process``) runs the sink's SQL
    (``ResultSink.sqlite_store``: sqlite3 alone, so it is up in milliseconds) and, for the same
    reason, counts the distribution fields' values of the dicts it gets (``count_fields``).
    Chunks are sent in pieces (``piece_size`` rows, a quarter chunk) as they fill, the last
    piece of each chunk committing its transaction: the writer works on a chunk while its end is
    still being validated, so the load ends one piece, not one chunk, after its last line. When
    no piece comes for ``IDLE_COMMIT_S`` the writer commits what it has, so its lock on the file
    is not held while this process waits on something else (a slow download; a ledger kept in
    the same SQLite file, whose write would otherwise wait for that lock: a deadlock until the
    busy timeout). The process is started once a first full piece of results has been read
    (``expect_full``, before that piece is validated: its start-up, ~30-40 ms, overlaps the
    validation); a load smaller than a piece is written inline.
    Memory stays bounded: a chunk's worth of pieces queued, one being written, and the items of
    the pieces not yet committed kept here for reporting.
    """

    def __init__(
        self,
        sink: ResultSink,
        batch_id: str,
        model: Callable[[], str | None],
        chunk_size: int,
        count_fields: Iterable[str] = (),
    ):
        self.sink, self.batch_id, self.model = sink, batch_id, model
        self.count_fields = tuple(count_fields)
        self.chunk_size = chunk_size
        self.piece_size = max(1, chunk_size // 4)
        self.open_rows = 0  # rows sent in the transaction not yet committed
        self.proc: subprocess.Popen[bytes] | None = None
        # Up to a chunk's worth of pieces queued (the bound of one chunk queued, as before the
        # pieces): with a queue of one piece the loading thread waited for the writer's start-up.
        self.todo: queue.Queue[bytes | None] = queue.Queue(maxsize=-(-chunk_size // self.piece_size))
        self.flush_size = self.piece_size  # rows per submit
        self.answers: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.pending: deque[tuple[_Chunk, list[Accepted], list[Rejected]]] = deque()
        self.ready: list[_Done] = []
        self.error: BaseException | None = None

    def _start(self) -> None:
        # The two threads start first, then wait for the process: started after it, while its
        # start-up had both cores busy, each thread's first run waited 1-4 ms for a core, and
        # ``Thread.start`` waits for that first run.
        box: queue.Queue[subprocess.Popen[bytes] | None] = queue.Queue()
        try:
            for target, name in ((self._send, "fable-load-send"), (self._receive, "fable-load-receive")):
                thread = threading.Thread(target=_once_started, args=(box, target), name=name, daemon=True)
                thread.start()
                self.threads.append(thread)
            command, env = _writer_command()
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        finally:
            for _ in self.threads:
                box.put(self.proc)  # None if it did not start (nor a thread did): the threads end
        store = self.sink.sqlite_store()
        assert store is not None  # checked by ``_separate_writer_helps``
        self.database = store.database
        store.idle_commit_s = IDLE_COMMIT_S
        store.count_fields = self.count_fields
        self.todo.put(pickle.dumps(store))

    def _send(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None
        try:
            while (frame := self.todo.get()) is not None:
                write_frame(proc.stdin, frame)
            write_frame(proc.stdin, pickle.dumps(None))
            proc.stdin.close()
        except OSError:  # the writer process died; the receiver reports it
            pass

    def _receive(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        while True:
            try:
                self.answers.put(pickle.load(proc.stdout))
            except EOFError:
                self.answers.put(("eof", None))
                return
            except Exception as exc:  # noqa: BLE001 - surfaced on the loading thread
                self.answers.put(("error", exc))
                return

    def _drain(self, block: bool) -> None:
        """Collect answers of the writer process; with ``block``, until none is outstanding."""
        while self.pending and self.error is None:
            try:
                status, value = self.answers.get() if block else self.answers.get_nowait()
            except queue.Empty:
                return
            if status == "eof":
                code = self.proc.wait() if self.proc is not None else None
                self.error = RuntimeError(
                    f"the load's writer process exited (code {code}) with {len(self.pending)} "
                    "piece(s) of chunks uncommitted"
                )
                return
            if status == "error":
                # It comes back pickled, without its traceback: say where it happened.
                add_note = getattr(value, "add_note", None)  # Python 3.11+
                if add_note is not None:
                    add_note(f"raised in the load's writer process storing into the SQLite file {self.database}")
                self.error = value
                return
            for failed, counts in value:  # per piece of the committed chunk
                chunk, kept, early = self.pending.popleft()
                self.ready.append(_Done(chunk, self.sink.unstorable_items(kept, early, failed), counts))

    def expect_full(self) -> None:
        """A full piece is on its way: start the process now, so that its start-up (~40 ms)
        overlaps the validation of that piece too."""
        if self.proc is None and self.error is None:
            self._start()

    def submit(self, chunk: _Chunk, final: bool = False) -> None:
        if self.proc is None and final:
            unstorable = self.sink.write_chunk(
                chunk.accepted, chunk.rejected, batch_id=self.batch_id, model=self.model()
            )
            self.ready.append(_Done(chunk, unstorable))
            return
        if self.error is not None:
            return  # raised by ``committed``
        if self.proc is None:
            self._start()
        job, kept, early = self.sink.prepare_chunk(
            chunk.accepted, chunk.rejected, batch_id=self.batch_id, model=self.model(), deferred=True
        )
        self.pending.append((chunk, kept, early))
        self.open_rows += len(chunk.accepted) + len(chunk.rejected)
        commit = final or self.open_rows >= self.chunk_size
        if commit:
            self.open_rows = 0
        self._put(piece_frame(job, commit))

    def _put(self, frame: bytes | None) -> None:
        while self.error is None:
            try:
                self.todo.put(frame, timeout=0.5)
                return
            except queue.Full:
                self._drain(block=False)

    def close(self, commit: bool = True) -> None:
        """Finish; ``commit`` the pieces of an unfinished chunk, else they are rolled back (the
        load failed: as on the other paths, only whole chunks are kept, except pieces the writer
        already committed because none came for ``IDLE_COMMIT_S``; those are reported)."""
        if self.proc is None:
            return
        if self.open_rows and commit:  # the stream ended on a piece that did not commit
            self._put(piece_frame(None, True))
        self.open_rows = 0
        self._put(None)
        self._drain(block=True)
        proc, self.proc = self.proc, None
        if self.error is not None:
            try:  # ``_put`` gives up once the error is set: the sender may idle on an empty queue
                self.todo.put_nowait(None)
            except queue.Full:
                pass  # it is busy, and ends at the first write to the stopped process
            if proc.poll() is None:
                proc.kill()  # it stopped at its error; do not wait for the rest of the queue
            self._reap(proc)
        else:
            # Every chunk is committed and acknowledged: the process only has to close its
            # connection and exit (~7 ms, half the load's tail), which nothing here waits for.
            threading.Thread(target=self._reap, args=(proc,), name="fable-load-reap", daemon=True).start()

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        # The receiver ends when the process closes its stdout, i.e. exits: joining it first
        # makes the wait below immediate (``Popen.wait(timeout)`` polls with sleeps of up to
        # 50 ms, which showed as idle time at the end of every load).
        for thread in self.threads:
            thread.join(timeout=30)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:  # stdin: bytes the stopped process never read (a broken pipe)
                    pass

    def committed(self) -> list[_Done]:
        """Chunks committed so far; the writer's error once every committed one was returned."""
        if self.proc is not None:
            self._drain(block=False)
        out, self.ready = self.ready, []
        if not out and self.error is not None:
            error, self.error = self.error, None
            raise error
        return out


#: The writer process's program: this process's ``sys.path`` (from ``_SYS_PATH_ENV``), then
#: ``core.writer_process.main``.
_WRITER_BOOT = (
    "import json, os, sys; sys.path[:] = json.loads(os.environ.pop({env!r})); "
    "from airflow_provider_fable.core.writer_process import main; main()"
)
_SYS_PATH_ENV = "FABLE_WRITER_SYS_PATH"


def _writer_command() -> tuple[list[str], dict[str, str]]:
    """Command line and environment of the writer process: this interpreter, with this process's
    ``sys.path``.

    Not ``python -m``, which searches a fresh interpreter's default path: Airflow adds its dags,
    plugins and config folders to a task's ``sys.path`` at run time (not to ``PYTHONPATH``), and
    code kept there (its docs' way for modules that are not installed) was then not found, or
    another installed copy of the provider ran. ``sys.path`` goes through the environment rather
    than ``PYTHONPATH``, whose entries would come before the standard library.
    """
    path = [os.fspath(p) for p in sys.path if isinstance(p, (str, os.PathLike))]
    env = {**os.environ, _SYS_PATH_ENV: json.dumps(path)}
    return [sys.executable, "-c", _WRITER_BOOT.format(env=_SYS_PATH_ENV)], env


def _once_started(
    box: queue.Queue[subprocess.Popen[bytes] | None], target: Callable[[subprocess.Popen[bytes]], None]
) -> None:
    """Run ``target`` on the writer process once it is started (nothing if it did not start)."""
    proc = box.get()
    if proc is not None:
        target(proc)


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Raise the cyclic collector's first threshold while a load runs (restored after).

    A load allocates millions of short-lived containers (parsed lines, outcomes, row tuples) that
    form no reference cycles, and holds a chunk of them at a time; with the default threshold
    (700 allocations) the collector keeps walking those chunks for nothing: about 14 % of the
    load's CPU. Memory is unchanged (the objects are freed by reference counting as before);
    cyclic garbage made elsewhere in the process is just collected a little later.
    """
    first, *rest = gc.get_threshold()
    if first == 0 or first >= _GC_THRESHOLD:  # collection off, or already rarer
        yield
        return
    gc.set_threshold(_GC_THRESHOLD, *rest)
    try:
        yield
    finally:
        if gc.get_threshold()[0] == _GC_THRESHOLD:  # nobody changed it meanwhile
            gc.set_threshold(first, *gc.get_threshold()[1:])


_GC_THRESHOLD = 50_000


def _separate_writer_helps(sink: Any) -> bool:
    """A SQLite database file through ``ResultSink`` and sqlite3: another process can write it."""
    return isinstance(sink, ResultSink) and sink.sqlite_store() is not None


def load_batch(
    results: Iterable[BatchResult],
    *,
    batch_id: str,
    output_model: type[BaseModel],
    sink: ResultSink | ChunkSink,
    stats: LoadStats,
    chunk_size: int = 10_000,
    on_outcomes: Callable[[list[RecordOutcome]], None] | None = None,
    should_write: Callable[[str, str], bool] | None = None,
    pipeline: bool | str | None = None,
    progress_every: float = 30.0,
) -> None:
    """Validate every result of one batch and write it, ``chunk_size`` rows per transaction.

    :param on_outcomes: called (on this thread) with every record's outcome after the chunk
        holding it is committed, in order; an answer that turned out unstorable is reported as
        rejected with reason ``unstorable``.
    :param should_write: ``(record_id, batch_id) -> bool`` asked for each accepted answer; False
        skips it (e.g. the record has been resubmitted in a newer batch, whose answer wins).
        Skipped answers are counted in ``stats.skipped_stale`` and are not reported as outcomes.
    :param pipeline: write chunks while the next chunk is validated: ``True`` (or ``"thread"``)
        on a writer thread, ``"process"`` in a writer process (SQLite files only; started once
        a first piece, a quarter chunk, of results has been read), ``False`` inline. Default: a thread when the database works
        outside Python (PostgreSQL: COPY and the upsert run in the server, the client waits
        without the GIL); a writer process for a SQLite file when the machine has more than
        one core (SQLite's executemany needs the GIL for every row, so a thread does not help
        there; a process does: see docs/performance.md); else inline.
    :param progress_every: seconds between progress lines in the log while a load runs (a
        load slowed by a slow download or many refused rows would otherwise be silent).

    One verdict per record per batch: when the results hold several lines for one record, an
    accepted answer beats a rejected one, and among equals the first line wins; the other lines
    write nothing and are counted in ``stats.duplicates``. (A reject already committed in an
    earlier chunk stays in the rejects table as history; the acceptance reported after it is
    the record's verdict in the ledger and in the outcomes view.)
    """
    fields = distribution_fields(output_model)
    for f in fields:
        stats.distribution.setdefault(f, Counter())
    distribution = [(f, stats.distribution[f]) for f in fields]
    reasons = stats.reasons
    model_name: str | None = None
    if pipeline is None:
        engine = getattr(sink, "engine", None)  # a ParquetSink alone has no database
        if engine is not None and engine.dialect.name == "postgresql":
            pipeline = True
        elif (os.cpu_count() or 1) > 1 and _separate_writer_helps(sink):
            pipeline = "process"
        else:
            pipeline = False
    writer: _Writer | _ProcessWriter
    if pipeline == "process":
        if not _separate_writer_helps(sink):
            raise ValueError("pipeline='process' needs a ResultSink on a SQLite database file")
        writer = _ProcessWriter(sink, batch_id, lambda: model_name, chunk_size, fields)  # type: ignore[arg-type]  # a ResultSink (checked above)
    else:
        writer = _Writer(sink, batch_id, lambda: model_name, bool(pipeline), chunk_size)

    def report(done: list[_Done]) -> None:
        # One ``on_outcomes`` call for all that was committed since the last report (a writer
        # process hands back a chunk as its pieces): the ledger's write has a per-call cost.
        outcomes: list[RecordOutcome] = []
        for chunk, unstorable, counts in done:
            if distribution and chunk.accepted:
                if counts is None:
                    counts = value_counts([a.data for a in chunk.accepted], fields)  # type: ignore[assignment]  # Counters are dicts
                for f, counter in distribution:
                    # Raw values counted (closed sets: few distinct), keyed here by their text.
                    for value, n in counts[f].items():  # type: ignore[index]  # set just above
                        counter[str(value)] += n
            if unstorable:
                # Counted as accepted while validating; the database had the last word.
                stats.accepted -= len(unstorable)
                stats.rejected += len(unstorable)
                reasons["unstorable"] += len(unstorable)
                for item in unstorable:
                    data = next((a.data for a in chunk.accepted if a.record_id == item.record_id), {})
                    for f, counter in distribution:
                        key = str(data.get(f))
                        counter[key] -= 1
                        if counter[key] <= 0:
                            del counter[key]
            if on_outcomes is None:
                continue
            # custom_id: the record id; the load operator maps encoded custom_ids to record ids
            # before results get here (``ids.decode`` is the identity otherwise).
            bad = {r.record_id for r in unstorable}
            outcomes += [
                RecordOutcome(a.record_id, a.record_id, "accepted", None, False, batch_id)
                for a in chunk.accepted
                if a.record_id not in bad
            ]
            outcomes += [
                RecordOutcome(r.record_id, r.record_id, "rejected", r.reason, r.retryable, batch_id)
                for r in (*chunk.rejected, *unstorable)
            ]
        if outcomes and on_outcomes is not None:
            on_outcomes(outcomes)

    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    tokens_in = tokens_out = cache_write = cache_read = cache_write_1h = 0

    usages: list[Usage] = []  # of every result of the chunk, skipped ones included
    validate = validator_for(output_model)
    seen_ids: set[str] = set()  # records with a verdict in this batch (one verdict per record)
    rejected_ids: set[str] = set()  # those whose verdict so far is a reject

    def one_verdict(outcomes: list[Outcome]) -> list[Outcome]:
        """``outcomes`` without repeated records (the rare path: the block repeats a record)."""
        kept: list[Outcome] = []
        for o in outcomes:
            rid = o.record_id
            if rid not in seen_ids:
                seen_ids.add(rid)
                if o.__class__ is not Accepted:
                    rejected_ids.add(rid)
                kept.append(o)
                continue
            stats.duplicates += 1
            if o.__class__ is not Accepted or rid not in rejected_ids:
                continue  # the first verdict stands
            # An accepted answer beats the earlier reject: drop that reject where it still waits
            # (this block, or the chunk not yet written); one already written is un-counted.
            rejected_ids.discard(rid)
            for pending in (kept, rejected):
                at = next((i for i, r in enumerate(pending) if r.record_id == rid), None)
                if at is not None:
                    del pending[at]
                    break
            else:
                earlier = committed_rejects.pop(rid)
                stats.rejected -= 1
                reasons[earlier] -= 1
                if reasons[earlier] <= 0:
                    del reasons[earlier]
            kept.append(o)
        return kept

    committed_rejects: dict[str, str] = {}  # record id -> reason, of rejects already flushed

    def count_usage() -> None:
        nonlocal tokens_in, tokens_out, cache_write, cache_read, cache_write_1h
        tokens_in += sum(map(_INPUT, usages))
        tokens_out += sum(map(_OUTPUT, usages))
        cache_write += sum(map(_CACHE_WRITE, usages))
        cache_read += sum(map(_CACHE_READ, usages))
        cache_write_1h += sum(map(_CACHE_WRITE_1H, usages))  # priced at the 1-hour TTL rate
        usages.clear()

    def flush(final: bool = False) -> None:
        nonlocal next_progress  # type: ignore[misc]  # bound below, before the first call
        # Counting per chunk (in C: Counter.update, len, sum over map) rather than per row; the
        # distribution is counted as chunks are committed (``report``), by the writer process
        # when there is one.
        count_usage()
        stats.accepted += len(accepted)
        stats.rejected += len(rejected)
        reasons.update([r.reason for r in rejected])
        if rejected:
            committed_rejects.update([(r.record_id, r.reason) for r in rejected])
        writer.submit(_Chunk(accepted, rejected), final)
        if (now := time.monotonic()) >= next_progress and not final:
            next_progress = now + progress_every
            good, bad = stats.accepted - accepted_before, stats.rejected - rejected_before
            log.info(
                "batch %s: %d results validated so far (%d accepted, %d rejected), %.0f results/s",
                batch_id, good + bad, good, bad, (good + bad) / max(now - started, 1e-9),
            )  # fmt: skip

    started = time.monotonic()
    next_progress = started + progress_every
    accepted_before, rejected_before = stats.accepted, stats.rejected
    flush_size = writer.flush_size  # rows per submit: a chunk, or a piece of one (writer process)
    pending = iter(results)
    # Results are read and validated a block at a time: what the chunk (or piece) still lacks, at
    # most a quarter chunk (a writer process's piece), so the per-result steps run as C loops
    # (map, islice, list comprehensions) instead of a Python loop body per line and the chunks
    # come out the same, while the raw results held at once stay a fraction of a chunk.
    block_size = max(1, chunk_size // 4)

    def take(block: list[BatchResult]) -> bool:
        """Validate ``block`` into the chunk being filled; False when the results are exhausted.

        A function so that the block and its outcomes are freed when it returns: kept in the
        loop's variables they stayed alive while the next block was read (the previous chunk's
        outcomes and raw results next to the new ones: three chunks at the peak, not one)."""
        nonlocal model_name
        if not block:
            return False
        if len(block) == flush_size:
            writer.expect_full()
        if model_name is None:
            model_name = next((r.model for r in block if r.model is not None), None)
        outcomes = list(map(validate, block))
        usages.extend(map(_USAGE, outcomes))
        ids = set(map(_RECORD_ID, outcomes))
        if len(ids) == len(outcomes) and seen_ids.isdisjoint(ids):
            seen_ids.update(ids)  # the usual block: every record once
        else:
            outcomes = one_verdict(outcomes)
        good = [o for o in outcomes if o.__class__ is Accepted]
        if len(good) < len(outcomes):
            bad = [o for o in outcomes if o.__class__ is not Accepted]
            rejected_ids.update(map(_RECORD_ID, bad))
            rejected.extend(bad)  # type: ignore[arg-type]  # the non-Accepted outcomes are Rejected
        if should_write is not None:
            fresh = [o for o in good if should_write(o.record_id, batch_id)]
            stats.skipped_stale += len(good) - len(fresh)
            good = fresh
        accepted.extend(good)
        return True

    with _fewer_collections():
        try:
            while take(list(islice(pending, min(block_size, flush_size - len(accepted) - len(rejected))))):
                if len(accepted) + len(rejected) >= flush_size:
                    flush()
                    accepted, rejected = [], []
                    report(writer.committed())
            if accepted or rejected:
                flush(final=True)
            count_usage()  # of skipped answers after the last chunk
            writer.close()  # waits for the last chunk: an error here (a timeout) is handled below
        except BaseException:
            # What was committed stays committed, and is still reported, before the error surfaces.
            writer.close(commit=False)
            try:
                report(writer.committed())
            except Exception:  # noqa: BLE001 - the original error is the one to raise
                pass
            raise
        while done := writer.committed():
            report(done)
    batch_usage = Usage(tokens_in, tokens_out, cache_write, cache_read, cache_write_1h)
    stats.usage.add(batch_usage)
    cost = usage_cost_usd(batch_usage, model_name, prices=stats.prices) if model_name else 0.0
    stats.cost_usd = None if cost is None or stats.cost_usd is None else stats.cost_usd + cost


class ResultScreen:
    """Between a batch's parsed results and ``load_batch``: completeness by custom_id.

    With the ledger's ``custom_id -> record id`` map of the records whose current batch this is
    (``mapping``), every such record ends with a verdict: results are mapped back to record ids,
    and once the file is read, a record no line answered gets a ``missing_result`` result (a
    retryable reject, in the rejects table and the ledger). A line count cannot tell: a line
    carrying another custom_id makes the count right and the record silently lost.

    Lines that cannot belong to a record of this batch write nothing: a line with no readable
    custom_id (``stats.unattributable``) and, with a mapping, a custom_id the map lacks, kept in
    ``dropped`` for the caller to tell a record a newer batch took over (stale) from a custom_id
    the batch never had (``stats.unknown_custom_ids``). Without a mapping (a batch the ledger
    does not know) results pass as they are, minus unattributable lines.
    """

    def __init__(self, batch_id: str, mapping: dict[str, str] | None, stats: LoadStats) -> None:
        self.batch_id = batch_id
        self.mapping = mapping
        self.stats = stats
        #: custom_ids of lines dropped because the mapping lacks them.
        self.dropped: list[str] = []
        self.missing = 0
        #: Succeeded results passed on, and their output tokens (the batch's measured output,
        #: ``Ledger.count_batch_usage``): counted here, in the one per-result step of the load.
        self.succeeded = 0
        self.output_tokens = 0

    def __call__(self, results: Iterable[BatchResult]) -> Iterator[BatchResult]:
        mapping = self.mapping
        succeeded = output_tokens = 0
        try:
            if mapping is None:
                for result in results:
                    if result.custom_id == "":  # (a JSON number 0 is a custom_id too)
                        self._unattributable(result)
                        continue
                    if result.type == SUCCEEDED:
                        succeeded += 1
                        output_tokens += result.usage.output_tokens
                    yield result
                return
            seen: set[str] = set()
            get, see, dropped = mapping.get, seen.add, self.dropped.append
            for result in results:
                custom_id = result.custom_id
                record_id = get(custom_id)
                if record_id is None:
                    if custom_id == "":
                        self._unattributable(result)
                    else:
                        dropped(custom_id)
                    continue
                see(custom_id)
                result.custom_id = record_id
                if result.type == SUCCEEDED:
                    succeeded += 1
                    output_tokens += result.usage.output_tokens
                yield result
        finally:
            self.succeeded += succeeded
            self.output_tokens += output_tokens
        if len(seen) < len(mapping):
            missing = [rid for cid, rid in mapping.items() if cid not in seen]
            self.missing = len(missing)
            log.warning(
                "batch %s: %d record(s) have no result line (e.g. %s): rejected as missing_result "
                "(retryable; a rerun of failed records sends them again)",
                self.batch_id, len(missing), ", ".join(missing[:5]),
            )  # fmt: skip
            for record_id in missing:
                yield BatchResult(record_id, MISSING)

    def _unattributable(self, result: BatchResult) -> None:
        self.stats.unattributable += 1
        log.warning(
            "batch %s: a result line with no readable custom_id was skipped (%s)",
            self.batch_id, (result.error_message or "")[:300],
        )  # fmt: skip

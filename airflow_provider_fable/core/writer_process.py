"""The writer process of the SQLite load path: stores prepared chunks sent over a pipe.

Started by ``core.loading`` as a fresh interpreter (the loading process's own, with its
``sys.path``: ``loading._writer_command``) that runs ``main``: not a fork of a threaded task
process, and unlike multiprocessing's ``spawn`` it does not re-run the caller's ``__main__``.
``python -m airflow_provider_fable.core.writer_process`` runs it too. Protocol: stdin carries
length-prefixed frames (``write_frame``): a ``SQLiteStore``, then ``(job, commit)`` per piece of a chunk (a
``StoreJob`` or ``BuildJob``, or None; ``commit`` ends the chunk's transaction) and ``None`` to
finish, each a pickle except the pieces of ``BuildJob``, which are MessagePack unless they hold
what MessagePack cannot carry (``piece_frame``); stdout answers each commit with
``("ok", [(refused, counts) per piece committed])`` (``refused``: ``[(row index, message), ...]``;
``counts``: the distribution counts of a ``BuildJob``, see ``SQLiteStore.count_fields``, else
None) or, once, ``("error", exception)``. A transaction is also committed when no
piece comes for ``IDLE_COMMIT_S`` (so its pieces may span fewer rows than a chunk). When the
loading process dies its end of stdin closes and this process exits (an open transaction is
rolled back).

Why this module imports nothing but ``sqlite3``, ``pickle``, ``orjson`` and ``msgspec``: the
process must be ready within milliseconds. With SQLAlchemy and pydantic (``core.sinks``) it took
about half a second to start, during which the loading process stalled on the bounded queue. So
the pieces the writer needs (the job shape, the text helpers of the rejects table, the store
itself) live here and ``core.sinks`` uses them from here.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from itertools import repeat
from typing import Any, NamedTuple

import msgspec
import orjson

#: A chunk's transaction is committed early when no piece came for this long: the loading
#: process may be waiting on something else (a slow download, or a write of its own to the same
#: SQLite file, such as a ledger kept there, which would otherwise wait for this lock while this
#: process waits for its next piece). In a steady load pieces come every ~10 ms.
IDLE_COMMIT_S = 0.05


class StoreJob(NamedTuple):
    """One chunk ready for the database: plain tuples only (cheap to send to another process)."""

    rows: list[tuple[Any, ...]]
    ids: list[str]  # record id of each row (the row may hold it as an integer)
    reject_rows: list[tuple[Any, ...]]
    batch_id: str
    now: Any


class BuildJob(NamedTuple):
    """A chunk whose accepted rows the writer process builds itself (``SQLiteStore.built``).

    What the loading process sends in the common case (text record ids, each once): the
    answers' data dicts and tokens instead of finished row tuples. Building the rows and
    pickling them cost the loading process about 1.8 µs per row, a fifth of its work, while the
    writer process had time to spare; the dicts pickle for a third of that.
    """

    datas: list[dict[str, Any]]
    ids: list[str]
    tokens_in: list[int]
    tokens_out: list[int]
    reject_rows: list[tuple[Any, ...]]
    batch_id: str
    model: str | None
    now: Any
    #: PostgreSQL: the accepted rows already as COPY text (rendered on the loading thread, so
    #: the writer thread only waits on the server); None elsewhere.
    copy_text: str | None = None


def built_rows(build_rows: Callable[..., list[tuple[Any, ...]]], job: BuildJob) -> StoreJob:
    """The ``StoreJob`` of a ``BuildJob``: its rows built with ``build_rows`` (a ``rows_builder``)."""
    rows = build_rows(job.datas, job.ids, job.tokens_in, job.tokens_out, job.batch_id, job.model, job.now)
    return StoreJob(rows, job.ids, job.reject_rows, job.batch_id, job.now)


def value_counts(datas: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Counter[Any]]:
    """Per field in ``names``, how often each value occurs among answers' data dicts (in C)."""
    return {name: Counter(map(dict.get, datas, repeat(name))) for name in names}


def _row_expression(kinds: dict[str, str]) -> str:
    """The row tuple as an expression of ``d`` (the data), ``rid``, ``batch``, ``model``,
    ``tin``, ``tout`` and ``now``: NUL stripped from text, nested values as JSON text."""
    parts = []
    for name, kind in kinds.items():
        get = f"(v := d.get({name!r}))"
        if kind == "string":
            parts.append(f"(_strip(v) if {get}.__class__ is str and '\\x00' in v else v)")
        elif kind == "json":
            parts.append(f"(None if {get} is None else _json(v))")
        else:
            parts.append(f"d.get({name!r})")
    fields = "".join(f"{p}, " for p in parts)
    return f"(rid, {fields}batch, model, tin, tout, now)"


def row_builder(kinds: dict[str, str]) -> Callable[..., tuple[Any, ...]]:
    """A function turning (data, id, batch, model, tokens in/out, now) into the table's row tuple.

    Generated once per output model (the names are checked identifiers) so the per-row work is
    one call with inline conversions. Lives here so the writer process can build rows without
    importing ``core.sinks``.
    """
    source = f"lambda d, rid, batch, model, tin, tout, now: {_row_expression(kinds)}"
    return eval(source, {"_strip": strip_nul, "_json": json_text})  # type: ignore[no-any-return]  # noqa: S307 - built from checked names


def rows_builder(kinds: dict[str, str]) -> Callable[..., list[tuple[Any, ...]]]:
    """``row_builder`` for a whole chunk in one generated list comprehension: (datas, ids,
    tokens in, tokens out, batch, model, now) -> rows; a third cheaper than a call per row."""
    source = (
        f"lambda datas, ids, tins, touts, batch, model, now: [{_row_expression(kinds)} "
        "for d, rid, tin, tout in zip(datas, ids, tins, touts, strict=True)]"
    )
    return eval(source, {"_strip": strip_nul, "_json": json_text})  # type: ignore[no-any-return]  # noqa: S307 - built from checked names


def strip_nul(value: str) -> str:
    """PostgreSQL text cannot hold NUL; a model answer can. Drop it rather than fail the load."""
    return value.replace("\x00", "") if "\x00" in value else value


def json_text(value: Any) -> str:
    """Nested values as JSON text with sorted keys (the form stored in ``json`` columns)."""
    try:
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except orjson.JSONEncodeError:  # ints beyond 64 bits, lone surrogates: json copes
        out = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return strip_nul(out)


def safe_text(value: str | None, limit: int) -> str | None:
    """Text for the rejects table: bounded, NUL-free and encodable (lone surrogates replaced)."""
    if value is None:
        return None
    value = strip_nul(value[:limit])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def error_message(exc: BaseException) -> str:
    """The database's complaint about one row, one line, as stored in the reject's detail."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"[:500]


def unstorable_reject_row(record_id: str, batch_id: str, message: str, raw: str, now: Any) -> tuple[Any, ...]:
    """The rejects-table row of an answer the database refused (columns as ``REJECT_COLUMNS``)."""
    return (
        record_id,
        batch_id,
        "unstorable",
        safe_text(f"the database refused the row: {message}", 2000),
        safe_text(raw, 4000),
        False,
        now,
    )


def raw_from_row(kinds: Sequence[tuple[str, str]], row: tuple[Any, ...]) -> str:
    """The answer's JSON (as ``json_text`` of the accepted data) from its table row."""
    data = {}
    for (name, kind), value in zip(kinds, row[1:], strict=False):
        data[name] = orjson.loads(value) if kind == "json" and value is not None else value
    return json_text(data)


def write_isolating(
    rows: list[tuple[Any, ...]],
    write: Callable[[list[tuple[Any, ...]]], Any],
    savepoint: Callable[[], AbstractContextManager[Any]],
    data_errors: tuple[type[BaseException], ...],
    *,
    whole_refused: bool = False,
) -> list[tuple[int, str]]:
    """Write ``rows``; on a data error, bisect under savepoints. Returns (index, message) refused.

    One bad answer (a value the column cannot hold) must not refuse its whole chunk: the rows
    the database takes are kept, each refused row is named. Shared by ``ResultSink`` (through
    SQLAlchemy or a DB-API connection) and ``SQLiteStore`` (sqlite3 alone, in the writer process).
    ``whole_refused``: the caller already saw the whole chunk refused; go straight to bisecting.
    """
    if not rows:
        return []
    if not whole_refused:
        try:
            with savepoint():
                write(rows)
            return []
        except data_errors:
            pass
    failed: list[tuple[int, str]] = []
    pending = [(0, len(rows) // 2), (len(rows) // 2, len(rows))]
    while pending:
        lo, hi = pending.pop()
        if lo >= hi:
            continue
        try:
            with savepoint():
                write(rows[lo:hi])
        except data_errors as exc:
            if hi - lo == 1:
                failed.append((lo, error_message(exc)))
            else:
                mid = (lo + hi) // 2
                pending += [(lo, mid), (mid, hi)]
    return sorted(failed)


#: Errors that mean "this row" rather than "this connection" (same set as ``ResultSink``'s).
_DATA_ERRORS = (ValueError, OverflowError, TypeError, sqlite3.DataError, sqlite3.IntegrityError)


class SQLiteStore:
    """``ResultSink.store`` for a SQLite file with nothing but ``sqlite3``: the writer's half.

    Built by ``ResultSink.sqlite_store`` (same SQL, same isolation of refused rows by bisection
    under savepoints, same rejects), so a chunk ends up the same in the table either way.
    """

    def __init__(
        self, database: str, upsert_sql: str, reject_sql: str, kinds: Sequence[tuple[str, str]]
    ) -> None:
        self.database, self.upsert_sql, self.reject_sql = database, upsert_sql, reject_sql
        self.kinds = list(kinds)
        self.idle_commit_s = IDLE_COMMIT_S  # set by the loading process (tests lengthen it)
        #: Fields whose values ``counts`` tallies per ``BuildJob`` (set by the loading process:
        #: its distribution fields; counting here takes that work off the busier process).
        self.count_fields: tuple[str, ...] = ()
        self._conn: sqlite3.Connection | None = None
        self._sp = 0
        self._build: Callable[..., list[tuple[Any, ...]]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_conn": None, "_build": None}

    def built(self, job: BuildJob) -> StoreJob:
        """The rows of a ``BuildJob``, as ``ResultSink.prepare_chunk`` would have built them."""
        if self._build is None:
            self._build = rows_builder(dict(self.kinds))
        return built_rows(self._build, job)

    def counts(self, job: BuildJob) -> dict[str, Counter[Any]] | None:
        """The ``count_fields`` values of the job's answers (None: no fields to count)."""
        if not self.count_fields:
            return None
        return value_counts(job.datas, self.count_fields)

    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # Autocommit mode: the transaction and its savepoints are explicit below.
            self._conn = sqlite3.connect(self.database, isolation_level=None, timeout=30)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def _savepoint(self, cursor: sqlite3.Cursor) -> Iterator[None]:
        self._sp += 1
        name = f"fable_sp_{self._sp}"
        cursor.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            cursor.execute(f"ROLLBACK TO SAVEPOINT {name}")
            cursor.execute(f"RELEASE SAVEPOINT {name}")
            raise
        cursor.execute(f"RELEASE SAVEPOINT {name}")

    def _write_isolating(self, cursor: sqlite3.Cursor, rows: list[tuple[Any, ...]]) -> list[tuple[int, str]]:
        return write_isolating(
            rows,
            lambda part: cursor.executemany(self.upsert_sql, part),
            lambda: self._savepoint(cursor),
            _DATA_ERRORS,
        )

    def store(self, job: StoreJob | None, commit: bool = True) -> list[tuple[int, str]]:
        """Write a prepared piece of a chunk; returns (row index, message) refused.

        The first piece opens the chunk's transaction, the one with ``commit`` ends it (``job``
        None: nothing more to write). Streaming a chunk in pieces lets this process start on it
        while the loading process still validates its end.
        """
        conn = self.connection()
        cursor = conn.cursor()
        if not conn.in_transaction:
            cursor.execute("BEGIN")
        try:
            if job is None:
                if commit:
                    cursor.execute("COMMIT")
                return []
            failed = self._write_isolating(cursor, job.rows)
            reject_rows = job.reject_rows
            if failed:
                more = [
                    unstorable_reject_row(
                        job.ids[i], job.batch_id, message, raw_from_row(self.kinds, job.rows[i]), job.now
                    )
                    for i, message in failed
                ]
                reject_rows = list({r[0]: r for r in [*reject_rows, *more]}.values())
            if reject_rows:
                cursor.executemany(self.reject_sql, reject_rows)
            if commit:
                cursor.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                cursor.execute("ROLLBACK")
            raise
        finally:
            cursor.close()
        return failed



_HEADER = 8  # frame length prefix, big-endian

_encode_piece = msgspec.msgpack.Encoder().encode
#: A ``BuildJob`` as sent: its fields' shapes only, the values as they came. Decoding into
#: ``BuildJob`` itself would check its annotations and refuse in the writer process what the
#: loading process sent and a pickle carried (a record id that is a JSON number, say), failing
#: the load on this path only; and it is no faster.
_decode_fields = msgspec.msgpack.Decoder(
    tuple[tuple[list[Any], list[Any], list[Any], list[Any], list[tuple[Any, ...]], Any, Any, Any, Any], bool]
).decode
_PIECE = 0x92  # a MessagePack frame starts with the header of its 2-array (a pickle with 0x80)
#: What MessagePack cannot carry: ints beyond 64 bits, lone surrogates, other Python objects.
_NOT_MSGPACK = (OverflowError, UnicodeEncodeError, TypeError, msgspec.EncodeError)


def piece_frame(job: StoreJob | BuildJob | None, commit: bool) -> bytes:
    """The frame of one piece: MessagePack for a ``BuildJob``, else (or when it holds what
    MessagePack cannot carry) a pickle.

    MessagePack because the loading process is the busier half of the load: encoding a piece
    of answer dicts costs it about a third of pickling them (~0.1 vs ~0.26 µs a row) and keeps
    every value as it was (floats incl. NaN and infinities, bools, nested lists and dicts), which
    JSON would not. (Tuples, sets, Decimals, enums or dates would arrive as lists or strings, as
    MessagePack has no type for them: the answers' data is the JSON-mode dump, which holds none.)
    Read back into a ``BuildJob`` (reject rows as tuples) by ``read_frame``.
    """
    if type(job) is BuildJob:
        try:
            return _encode_piece((job, commit))
        except _NOT_MSGPACK:
            pass
    return pickle.dumps((job, commit), protocol=pickle.HIGHEST_PROTOCOL)


def _decode_piece(body: bytes) -> tuple[BuildJob, bool]:
    """A ``piece_frame`` of a ``BuildJob`` read back (reject rows as tuples)."""
    fields, commit = _decode_fields(body)
    return BuildJob(*fields), commit


def write_frame(stream: Any, data: bytes) -> None:
    """One frame from the loading process: length prefix + ``data`` (a pickle or ``piece_frame``)."""
    stream.write(len(data).to_bytes(_HEADER, "big"))
    stream.write(data)
    stream.flush()


def _read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd`` (None at end of input)."""
    parts, got = [], 0
    while got < size:
        part = os.read(fd, size - got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


_IDLE = object()
_GONE = object()


def read_frame(fd: int, timeout: float | None) -> Any:
    """The next frame, ``_IDLE`` when none starts within ``timeout``, ``_GONE`` at end of input.

    Read from the descriptor itself (no buffered reader in between), so that ``select`` knows
    whether a frame is waiting.
    """
    if timeout is not None and not select.select([fd], [], [], timeout)[0]:
        return _IDLE
    header = _read_exact(fd, _HEADER)
    body = None if header is None else _read_exact(fd, int.from_bytes(header, "big"))
    if body is None:
        return _GONE
    return _decode_piece(body) if body[0] == _PIECE else pickle.loads(body)


def main() -> None:
    fd, answers = sys.stdin.fileno(), sys.stdout.buffer
    store = None
    try:
        store = read_frame(fd, None)
        if store is _GONE:  # the loading process ended before it sent anything
            store = None
            return
        #: per piece of the open transaction: rows refused, and the distribution counts
        refused: list[tuple[list[tuple[int, str]], dict[str, Counter[Any]] | None]] = []
        while True:
            frame = read_frame(fd, store.idle_commit_s if refused else None)
            if frame is _GONE or frame is None:
                return  # finished, or the loading process is gone; an open transaction rolls back
            if frame is _IDLE:
                job, commit = None, True
            else:
                job, commit = frame
            counts = None
            if type(job).__name__ == "BuildJob":  # this module's class, unpickled by its import name
                counts = store.counts(job)
                job = store.built(job)
            if job is not None:
                refused.append((store.store(job, commit), counts))
            else:
                store.store(None, commit)
            if commit:
                pickle.dump(("ok", refused), answers)
                answers.flush()
                refused = []
    except BaseException as exc:  # noqa: BLE001 - handed back to the loading process
        try:
            payload = pickle.dumps(("error", exc))
        except Exception:  # noqa: BLE001 - not every driver error pickles
            payload = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        try:
            answers.write(payload)
            answers.flush()
        except OSError:
            pass
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    main()

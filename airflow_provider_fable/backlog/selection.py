"""Which records a backlog run takes: the run modes as generated SQL (or a streamed filter).

Pure SQLAlchemy, no Airflow: ``bench/selection.py`` drives it directly. The state it reads is the
unit's own tables in the destination database: the final table (accepted), the final rejects
(one row per record no stage answered, with ``retryable``) and the review table
(``needs_review``: never selected automatically).

- ``backlog``: records with no final row, no final reject and not under review (a rejected
  record waits for ``failed``, so a backlog run never pays again for a known failure);
- ``interval``: the same, limited to ``date_field`` in ``[start, end)``;
- ``failed``: records in the final rejects marked retryable, not accepted since, not under review;
- ``all``: every source record not under review (the stages' ledgers still skip what each stage
  already accepted: ``rerun="unaccepted"``; nothing is paid twice).

When the source query and the unit's tables share a database, the selection is one
``INSERT INTO <work> SELECT ... WHERE NOT EXISTS ...`` run by the database (no row crosses the
wire); the anti-joins probe the primary keys of the unit's tables. Otherwise the source is
streamed through the task and filtered against the ids read from the destination (sets of
strings: about 60-100 bytes per final row held in memory).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

MODES = ("interval", "backlog", "failed", "all")
_CHUNK = 5000


@dataclass(frozen=True)
class UnitTables:
    """The unit's tables (names) in the destination database."""

    final: str
    rejects: str
    review: str
    work: str
    id_column: str


def work_table(meta: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        meta,
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("pass_name", sa.String(16), primary_key=True),
        sa.Column("stage", sa.Integer, primary_key=True),
        sa.Column("record_id", sa.String(250), primary_key=True),
        sa.Column("reason", sa.Text),
        extend_existing=True,
    )


def rejects_table(meta: sa.MetaData, name: str, id_column: str) -> sa.Table:
    return sa.Table(
        name,
        meta,
        sa.Column(id_column, sa.Text, primary_key=True),
        sa.Column("_stage", sa.Text),
        sa.Column("_model", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("retryable", sa.Boolean),
        sa.Column("attempts", sa.Integer),
        sa.Column("_batch_id", sa.Text),
        sa.Column("_run_id", sa.Text),
        sa.Column("_rejected_at", sa.Text),
        extend_existing=True,
    )


def review_table(meta: sa.MetaData, name: str, id_column: str) -> sa.Table:
    return sa.Table(
        name,
        meta,
        sa.Column(id_column, sa.Text, primary_key=True),
        sa.Column("_stage", sa.Text),
        sa.Column("_model", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer),
        sa.Column("_run_id", sa.Text),
        sa.Column("_since", sa.Text),
        extend_existing=True,
    )


def bare_final_table(meta: sa.MetaData, name: str, id_column: str) -> sa.Table:
    """Only the id column of the final table: what the selection needs to know of it."""
    return sa.Table(name, meta, sa.Column(id_column, sa.Text, primary_key=True), extend_existing=True)


def ensure_state_tables(engine: sa.engine.Engine, t: UnitTables) -> None:
    """Create the work, rejects and review tables when missing (the final table is ``tables.py``'s)."""
    meta = sa.MetaData()
    work_table(meta, t.work)
    rejects_table(meta, t.rejects, t.id_column)
    review_table(meta, t.review, t.id_column)
    meta.create_all(engine, checkfirst=True)


def window_binds(engine: sa.engine.Engine, window: tuple[datetime, datetime]) -> dict[str, Any]:
    """The window as the database compares it: datetimes for PostgreSQL (timestamp columns), ISO
    text with ``Z`` for SQLite (dates stored as ISO-8601 text sort as strings)."""
    if engine.dialect.name == "postgresql":
        return {"w_start": window[0], "w_end": window[1]}
    return {"w_start": _iso(window[0]), "w_end": _iso(window[1])}


def _iso(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _q(name: str) -> str:
    return f'"{name}"'


def selection_where(
    mode: str, t: UnitTables, *, id_field: str, date_field: str | None, windowed: bool
) -> str:
    """The WHERE clause of a mode over the source aliased ``s`` (identifiers are checked names)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sid = f"CAST(s.{_q(id_field)} AS TEXT)"
    fid = _q(t.id_column)

    def absent(table: str, extra: str = "") -> str:
        return f"NOT EXISTS (SELECT 1 FROM {_q(table)} AS x WHERE x.{fid} = {sid}{extra})"

    clauses = [absent(t.review)]
    if mode in ("backlog", "interval"):
        clauses += [absent(t.final), absent(t.rejects)]
    elif mode == "failed":
        clauses += [
            f"EXISTS (SELECT 1 FROM {_q(t.rejects)} AS x WHERE x.{fid} = {sid} AND x.retryable)",
            absent(t.final),
        ]
    if windowed:
        if not date_field:
            raise ValueError("a windowed selection needs the source's date_field")
        clauses.append(f"s.{_q(date_field)} >= :w_start AND s.{_q(date_field)} < :w_end")
    return " AND ".join(clauses)


def selection_sql(
    source_sql: str, mode: str, t: UnitTables, *, id_field: str, date_field: str | None, windowed: bool,
    limit: int | None = None,
) -> str:  # fmt: skip
    """``SELECT <id as text> FROM (<source>) AS s WHERE <mode>`` (ordered and limited on request)."""
    where = selection_where(mode, t, id_field=id_field, date_field=date_field, windowed=windowed)
    sql = f"SELECT CAST(s.{_q(id_field)} AS TEXT) AS record_id FROM ({_strip(source_sql)}) AS s WHERE {where}"
    if limit:
        order = f"s.{_q(date_field)}, " if date_field else ""
        sql += f" ORDER BY {order}s.{_q(id_field)} LIMIT {int(limit)}"
    return sql


def _strip(sql: str) -> str:
    return sql.strip().rstrip(";")


def select_ids(engine: sa.engine.Engine, sql: str, binds: Mapping[str, Any]) -> Iterator[str]:
    """Stream the ids a selection query returns (server-side cursor on PostgreSQL)."""
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=_CHUNK).execute(
            sa.text(sql), dict(binds)
        )
        for row in result:
            yield row[0]


def insert_selection(
    engine: sa.engine.Engine, sql: str, binds: Mapping[str, Any], t: UnitTables, *, run_id: str,
    pass_name: str, exclude_pass: str | None = None,
) -> int:  # fmt: skip
    """Run the selection inside the database into the work table; returns the rows written.

    ``exclude_pass`` leaves out the records already written for another pass of this run (the
    full pass after the pilot sample).
    """
    # Every bind used once and typed: with server-side binding (psycopg 3) a parameter used in
    # two places, or a bare parameter in the select list, is refused as ambiguous.
    sel = (
        "SELECT CAST(:run_id AS VARCHAR(250)), CAST(:pass_name AS VARCHAR(16)), 0, q.record_id "
        f"FROM ({sql}) AS q"
    )
    if exclude_pass:
        sel += (
            f" WHERE NOT EXISTS (SELECT 1 FROM {_q(t.work)} AS w WHERE w.run_id = CAST(:run_id_x AS VARCHAR(250)) "
            "AND w.pass_name = CAST(:exclude_pass AS VARCHAR(16)) AND w.record_id = q.record_id)"
        )
    stmt = f"INSERT INTO {_q(t.work)} (run_id, pass_name, stage, record_id) {sel}"
    with engine.begin() as conn:
        result = conn.execute(
            sa.text(stmt),
            {
                **binds,
                "run_id": run_id,
                "run_id_x": run_id,
                "pass_name": pass_name,
                "exclude_pass": exclude_pass,
            },
        )
        return int(result.rowcount or 0)


def clear_run(engine: sa.engine.Engine, t: UnitTables, run_id: str) -> None:
    """A retried select replaces this run's selection instead of adding to it."""
    with engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {_q(t.work)} WHERE run_id = :r"), {"r": run_id})


def write_work(
    engine: sa.engine.Engine, t: UnitTables, *, run_id: str, pass_name: str, stage: int,
    rows: Iterable[tuple[str, str | None]],
) -> int:  # fmt: skip
    """Insert (record id, reason) rows of one pass and stage, in chunks."""
    meta = sa.MetaData()
    work = work_table(meta, t.work)
    n = 0
    buf: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for rid, reason in rows:
            buf.append(
                {"run_id": run_id, "pass_name": pass_name, "stage": stage, "record_id": rid, "reason": reason}
            )
            if len(buf) >= _CHUNK:
                conn.execute(work.insert(), buf)
                n += len(buf)
                buf = []
        if buf:
            conn.execute(work.insert(), buf)
            n += len(buf)
    return n


def work_rows(
    engine: sa.engine.Engine, t: UnitTables, *, run_id: str, pass_name: str, stage: int
) -> dict[str, str | None]:
    """record id -> escalation reason of one pass and stage of a run."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT record_id, reason FROM {_q(t.work)} WHERE run_id = :r AND pass_name = :p AND stage = :s"
            ),
            {"r": run_id, "p": pass_name, "s": stage},
        )
        return {r[0]: r[1] for r in rows}


def count_work(
    engine: sa.engine.Engine, t: UnitTables, *, run_id: str, pass_name: str, stage: int = 0
) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    f"SELECT count(*) FROM {_q(t.work)} WHERE run_id = :r AND pass_name = :p AND stage = :s"
                ),
                {"r": run_id, "p": pass_name, "s": stage},
            ).scalar_one()
        )


def work_join_sql(source_sql: str, t: UnitTables, *, id_field: str) -> str:
    """The source rows of one pass and stage, joined in the database (same connection)."""
    return (
        f"SELECT s.* FROM ({_strip(source_sql)}) AS s JOIN {_q(t.work)} AS w "
        f"ON w.record_id = CAST(s.{_q(id_field)} AS TEXT) "
        "WHERE w.run_id = :run_id AND w.pass_name = :pass_name AND w.stage = :stage"
    )


# ------------------------------------------------------------------ the streamed path
@dataclass
class State:
    """The destination's state as id sets, for sources that are not in the destination database."""

    final: set[str]
    rejects: dict[str, bool]  # id -> retryable
    review: set[str]

    @classmethod
    def read(cls, engine: sa.engine.Engine, t: UnitTables) -> State:
        insp = sa.inspect(engine)
        fid = _q(t.id_column)

        def ids(table: str, cols: str) -> list[Any]:
            if not insp.has_table(table):
                return []
            with engine.connect() as conn:
                return list(conn.execute(sa.text(f"SELECT {cols} FROM {_q(table)}")))

        return cls(
            final={str(r[0]) for r in ids(t.final, fid)},
            rejects={str(r[0]): bool(r[1]) for r in ids(t.rejects, f"{fid}, retryable")},
            review={str(r[0]) for r in ids(t.review, fid)},
        )

    def wants(self, mode: str, rid: str) -> bool:
        if rid in self.review:
            return False
        if mode in ("backlog", "interval"):
            return rid not in self.final and rid not in self.rejects
        if mode == "failed":
            return rid not in self.final and self.rejects.get(rid, False)
        return True


def filter_records(
    records: Iterable[Mapping[str, Any]], state: State, mode: str, *, id_field: str, date_field: str | None,
    window: tuple[datetime, datetime] | None,
) -> Iterator[str]:  # fmt: skip
    """Ids of the streamed source records a mode takes (the Python twin of ``selection_where``)."""
    for record in records:
        rid = record.get(id_field)
        if rid is None:
            continue
        rid = str(rid)
        if not state.wants(mode, rid):
            continue
        if window is not None and date_field and not in_window(record.get(date_field), window):
            continue
        yield rid


def in_window(value: Any, window: tuple[datetime, datetime]) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
    if not isinstance(value, datetime):
        return False
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return window[0] <= value < window[1]


def sample_ids(ids: Iterable[str], size: int, seed: int | str) -> list[str]:
    """The pilot: a seeded bottom-k by hash of the id (``core.sampling``), spread over the selection."""
    from airflow_provider_fable.core.sampling import BottomK

    chooser: BottomK[str] = BottomK(size, seed)
    for rid in ids:
        chooser.offer(rid, rid)
    return list(chooser.items())


__all__: Sequence[str] = (
    "MODES", "State", "UnitTables", "clear_run", "ensure_state_tables", "filter_records", "insert_selection",
    "sample_ids", "select_ids", "selection_sql", "selection_where", "work_join_sql", "work_rows", "write_work",
)  # fmt: skip

"""QA sample: a seeded random sample of accepted rows, next to the input the model saw.

The seed's method ends with "sample completed items across the whole set": a reviewer reads a
few dozen answers side by side with their inputs. The sample is drawn with the same keyed-hash
bottom-k as the pilot (core.sampling) over *all* accepted rows of the load's batches, streamed
from the destination table, so it is spread over the whole result set, reproducible, and holds
only ``size`` rows in memory.

Excerpts: the submit records the rendered prompt of the records with the lowest QA priority
(the only ones a QA sample of that seed can pick, with a margin for rejects) in its manifest,
so the load can show the input without re-reading the source.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

import sqlalchemy as sa

from airflow_provider_fable.core.sampling import BottomK, priority

EXCERPT_CHARS = 500


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def qa_table_name(table: str) -> str:
    return f"{table}_qa"


def select_qa_rows(
    rows: Iterable[Mapping[str, Any]], *, id_column: str, size: int, seed: int | str
) -> list[dict[str, Any]]:
    """The ``size`` rows with the lowest keyed hash of their id, in priority order."""
    chooser: BottomK[dict[str, Any]] = BottomK(size, seed)
    for row in rows:
        chooser.offer(row[id_column], dict(row))
    return [row for _, row in chooser.keys_by_priority()]


def _sample_rows(
    engine: sa.engine.Engine,
    table: sa.Table,
    id_column: str,
    batch_ids: list[str],
    size: int,
    seed: int | str,
) -> list[dict[str, Any]]:
    """``select_qa_rows`` over the rows of ``batch_ids``, reading their ids only, then the chosen rows.

    The sample depends on the ids alone, so the full rows of a million-row load need not cross
    the wire and become dicts (most of the QA step's time, ~3 s per 100k rows on PostgreSQL):
    the ids are streamed, the ``size`` lowest priorities kept (``heapq.nsmallest``, in C over a
    generator), and only those rows are read back.
    """
    key = table.c[id_column]
    ids_query = sa.select(key).where(table.c._batch_id.in_(batch_ids))
    with engine.connect() as conn:
        ids = conn.execution_options(stream_results=True, yield_per=20_000).execute(ids_query).scalars()
        best = heapq.nsmallest(size, ((priority(seed, rid), rid) for rid in ids), key=itemgetter(0))
        if not best:
            return []
        wanted = [rid for _, rid in best]
        rows: dict[Any, dict[str, Any]] = {}
        for at in range(0, len(wanted), 500):  # (SQLite's bound-parameter limit, for a large sample)
            query = sa.select(table).where(key.in_(wanted[at : at + 500]), table.c._batch_id.in_(batch_ids))
            rows.update((row[id_column], dict(row)) for row in conn.execute(query).mappings())
    return [rows[rid] for rid in wanted if rid in rows]


def write_qa_sample(
    engine: sa.engine.Engine,
    *,
    table: sa.Table,
    id_column: str,
    batch_ids: list[str],
    size: int,
    seed: int | str = 0,
    excerpts: Mapping[str, str] | None = None,
    qa_table: str | None = None,
) -> tuple[str, int]:
    """Draw the sample from the rows this load wrote and replace ``<table>_qa`` with it.

    The QA table holds the latest review sample of the destination (one row per sampled record:
    its id, the source excerpt when known, every answer column, the batch id, the sample time),
    recreated on every load so a reviewer never reads a mix of old and new samples.
    """
    name = qa_table or qa_table_name(table.name)
    answer_cols = [c for c in table.columns if c.name != id_column and not c.name.startswith("_")]
    meta = sa.MetaData(schema=table.schema)
    qa = sa.Table(
        name,
        meta,
        sa.Column("qa_rank", sa.Integer, primary_key=True),
        sa.Column(id_column, sa.Text, nullable=False),
        sa.Column("source_excerpt", sa.Text),
        *(sa.Column(c.name, c.type.__class__()) for c in answer_cols),
        sa.Column("_batch_id", sa.Text),
        sa.Column("_sampled_at", sa.Text),
    )
    chosen: list[dict[str, Any]] = []
    if batch_ids and size:
        chosen = _sample_rows(engine, table, id_column, batch_ids, size, seed)
    now = datetime.now(timezone.utc).isoformat()
    excerpts = excerpts or {}
    rows = [
        {
            "qa_rank": rank,
            id_column: row[id_column],
            "source_excerpt": excerpts.get(str(row[id_column])),
            **{c.name: row[c.name] for c in answer_cols},
            "_batch_id": row["_batch_id"],
            "_sampled_at": now,
        }
        for rank, row in enumerate(chosen, 1)
    ]
    with engine.begin() as conn:
        qa.drop(conn, checkfirst=True)
        qa.create(conn)
        if rows:
            conn.execute(qa.insert(), rows)
    return name, len(rows)

"""Document summaries with chunk-then-combine: long documents in sections, then one summary each.

A 40-page contract does not belong in one request: the answer gets vaguer as the input grows,
one failure loses the whole document and the output limit caps what can be said. This DAG splits
each long document on its own paragraph and heading boundaries into sections of at most
``params.section_tokens`` (estimated at four characters per token, optional paragraph overlap),
summarises every section in one batch (``custom_id`` = ``<doc_id>-s<section number>``), then
combines each document's section summaries, in a second batch of the same run, into the fixed
structure of ``DocumentSummary``: executive summary, key points, risks, open questions.
Documents that fit in one section skip the first batch and go straight to the combined form.

The combine stage only starts for documents whose sections *all* succeeded; the others are
written to ``document_summary_incomplete`` with the missing sections and their reject reasons,
keep no summary, and are taken again by the next run. Results are keyed by document id in
``document_summaries`` (the Asset downstream DAGs can be scheduled on).

Selection (``params.mode``): scheduled runs and backfills take documents created in their data
interval (weekly); manual runs and runs without a logical date take the unsummarised backlog;
``failed`` takes the documents an earlier run left incomplete or whose combine was rejected, and
each stage sends again only what its job has not accepted (the job ledger decides, see
docs/ledger.md): a section summarised before is not paid for twice. ``params.pilot`` caps
documents per run; ``params.budget_usd`` is the run's budget: the sections' submit refuses
(``max_cost_usd``, before anything is sent) an estimate above it, the combine's submit what is
left of it after the sections' actual cost.

Connections: ``fable_default`` and ``fable_backlog_db`` (the bundled corpus is loaded into
``documents`` when the table is empty). Top-level imports: Airflow, pydantic, the provider.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, Param, task
from pydantic import BaseModel, ConfigDict, Field

from airflow_provider_fable.operators.load import FableValidateLoadOperator
from airflow_provider_fable.operators.submit import FableBatchSubmitOperator
from airflow_provider_fable.sensors.batch import FableBatchSensor

FABLE_CONN_ID = "fable_default"
BACKLOG_CONN_ID = os.environ.get("FABLE_BACKLOG_CONN_ID", "fable_backlog_db")
POLL_SECONDS = float(os.environ.get("FABLE_POLL_SECONDS", "60"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("FABLE_RETRY_DELAY_SECONDS", "120")))
DOCUMENT_SUMMARIES = Asset(name="document_summaries", uri="x-fable://backlog/document_summaries")
SECTION_MAX_TOKENS = 700
COMBINE_MAX_TOKENS = 1500
CHARS_PER_TOKEN = 4
#: Paragraphs repeated at the start of the next section (0-3; a module constant rather than a
#: Param: every Param costs each parse of this file a JSON-schema validation).
OVERLAP_PARAGRAPHS = 0
#: The submits' ``rerun=``: with ``mode=failed`` each stage sends the selected records its job has
#: not accepted (rejected sections, documents never combined or rejected); nothing is paid twice.
RERUN = "{{ 'unaccepted' if params.mode == 'failed' else '' }}"

Item = Field(min_length=3, max_length=300)


class SectionSummary(BaseModel):
    """What one section contributes; the combine stage works only from these."""

    # defer_build: validators are built on first use (in a task), not while the file is parsed.
    model_config = ConfigDict(extra="forbid", defer_build=True)

    summary: str = Field(
        min_length=10, max_length=800, description="What this section says, in 1-3 sentences."
    )
    key_points: list[str] = Field(
        min_length=1, max_length=5, description="Facts, figures, decisions, obligations."
    )
    risks: list[str] = Field(max_length=5, description="Risks, liabilities or failures the section names.")
    open_questions: list[str] = Field(max_length=5, description="Anything the section leaves undecided.")


class DocumentSummary(BaseModel):
    """The fixed structure every document ends up in. All four parts are required; a document
    without risks or open questions says so ("None identified.") rather than leaving a hole."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    executive_summary: str = Field(
        min_length=20, max_length=1200, description="3-5 sentences for an executive."
    )
    key_points: list[str] = Field(min_length=1, max_length=8)
    risks: list[str] = Field(min_length=1, max_length=8)
    open_questions: list[str] = Field(min_length=1, max_length=8)


SECTION_SYSTEM = """You summarise one section of a longer business document (a policy, an \
incident report, a contract or meeting notes). Another step will combine the summaries of all \
sections, so be faithful and specific: keep numbers, dates, owners, obligations and deadlines; \
do not speculate about other sections. List risks and open questions only when this section \
states or clearly implies them; empty lists are fine. Answer with the JSON object only."""

COMBINE_SYSTEM = """You write the one-page summary of a business document. You receive either the \
full document or the summaries of its sections, in order. Produce: an executive summary (3-5 \
sentences: what the document is, what it decides or commits to, what matters most); key points \
(facts, figures, decisions, obligations, deadlines); risks (liabilities, failure modes, \
exposures); open questions (what is undecided, to be confirmed or contradictory). Merge \
duplicates across sections and keep the most specific wording. Never invent facts. If the \
document names no risks or no open questions, answer ["None identified."] for that list. \
Answer with the JSON object only."""

SECTION_TEMPLATE = """{text}

(Source: "{title}", a {doc_type}, section {section_no} of {section_count}.)"""

COMBINE_TEMPLATE = """{material}

(Document: "{title}", a {doc_type}. {source_note})"""

SELECT_SECTIONS = """
SELECT s.section_id, s.section_no, s.section_count, s.text, d.title, d.doc_type
FROM document_sections AS s
JOIN doc_work AS w ON w.doc_id = s.doc_id
JOIN documents AS d ON d.doc_id = s.doc_id
WHERE w.run_id = :run_id AND w.path = 'chunked'
ORDER BY s.section_id
"""

SELECT_COMBINE = """
SELECT doc_id, title, doc_type, material, source_note
FROM document_combine_inputs
WHERE run_id = :run_id
ORDER BY doc_id
"""

# Patterns, compiled (and cached by ``re``) on first use in a task, not at every parse of this file.
_HEADING = r"^(#{1,6}\s+\S.*|\d+(\.\d+)*\.?\s+[A-Z].{0,80}|[A-Z][A-Z0-9 ,&/-]{3,80})$"
_SENTENCE_END = r"(?<=[.!?])\s+"


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def split_sections(body: str, max_tokens: int, overlap_paragraphs: int = 0) -> list[tuple[str, str]]:
    """Split a document into ``(heading, text)`` sections of at most ``max_tokens`` (estimated).

    Boundaries are the document's own: blank-line paragraphs, and headings, which start a new
    section once the current one is at least half full (a heading is never left dangling at the
    end of a section). A paragraph longer than the budget is cut between sentences. With
    ``overlap_paragraphs`` the last paragraphs of a section are repeated at the start of the next,
    so a point spanning a boundary is seen whole at least once (they count against the budget).
    """
    budget = max(1, max_tokens) * CHARS_PER_TOKEN
    heading_re, sentence_re = re.compile(_HEADING), re.compile(_SENTENCE_END)
    blocks: list[tuple[bool, str]] = []
    for para in re.split(r"\n\s*\n", body.strip()):
        para = para.strip()
        if not para:
            continue
        is_heading = "\n" not in para and len(para) <= 90 and bool(heading_re.match(para))
        if is_heading or len(para) <= budget:
            blocks.append((is_heading, para))
            continue
        piece = ""
        for sentence in sentence_re.split(para):
            while len(sentence) > budget:  # a "sentence" longer than the budget: hard cut
                if piece:
                    blocks.append((False, piece))
                    piece = ""
                blocks.append((False, sentence[:budget]))
                sentence = sentence[budget:]
            if piece and len(piece) + 1 + len(sentence) > budget:
                blocks.append((False, piece))
                piece = sentence
            else:
                piece = f"{piece} {sentence}".strip()
        if piece:
            blocks.append((False, piece))

    sections: list[tuple[str, str]] = []
    current: list[tuple[bool, str]] = []
    heading = section_heading = ""

    def size(parts: list[tuple[bool, str]]) -> int:
        return sum(len(t) for _, t in parts) + 2 * max(0, len(parts) - 1)

    def flush() -> list[tuple[bool, str]]:
        """Close the current section; return the overlap paragraphs that open the next one."""
        if any(not h for h, _ in current):
            sections.append((section_heading, "\n\n".join(t for _, t in current)))
        carry = [(h, t) for h, t in current if not h][-overlap_paragraphs:] if overlap_paragraphs else []
        return carry if size(carry) <= budget // 2 else []

    for is_heading, text in blocks:
        if is_heading:
            heading = text.lstrip("#").strip()
            if any(not h for h, _ in current) and size(current) >= budget // 2:
                current = flush()
                section_heading = heading
            elif not any(not h for h, _ in current):
                section_heading = heading
            current.append((True, text))
            continue
        if current and size(current) + 2 + len(text) > budget:
            trailing: list[tuple[bool, str]] = []
            while current and current[-1][0]:  # never leave a heading dangling at a section end
                trailing.insert(0, current.pop())
            carry = flush() if current else []
            current = carry + trailing
            if size(current) + 2 + len(text) > budget:
                current = trailing
            section_heading = heading
        current.append((False, text))
    if current:
        flush()
    return sections or [("", body.strip())]


def material_from_sections(rows: list[dict[str, Any]]) -> str:
    """The combine stage's input for a chunked document: its section summaries, in order."""
    import json

    parts = []
    for r in rows:
        lines = [f"Section {r['section_no']} of {r['section_count']}: {r['summary']}"]
        for label, field in (
            ("Key points", "key_points"),
            ("Risks", "risks"),
            ("Open questions", "open_questions"),
        ):
            items = json.loads(r[field]) if isinstance(r[field], str) else (r[field] or [])
            if items:
                lines.append(f"{label}: " + "; ".join(items))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


with DAG(
    dag_id="document_summaries",
    description="Summarise long documents: sections in one batch, one combined summary per document in a second",
    schedule=CronDataIntervalTimetable("@weekly", timezone="UTC"),
    start_date=datetime(2026, 1, 4),
    catchup=False,
    max_active_runs=1,
    params={
        "model": Param("claude-fable-5", type="string", description="Model for both stages"),
        "pilot": Param(50, type="integer", minimum=1, maximum=10_000, description="Documents per run"),
        "budget_usd": Param(
            25.0, type=["number", "null"], minimum=0, description="Refuse runs estimated above this"
        ),
        "section_tokens": Param(
            1500, type="integer", minimum=200, maximum=50_000, description="Section size bound"
        ),
        "mode": Param("auto", enum=["auto", "interval", "backlog", "failed"], description="Which documents"),
    },
    default_args={"retries": 2, "retry_delay": RETRY_DELAY},
    tags=["fable", "backlog", "example", "chunk-then-combine"],
    doc_md=__doc__,
) as dag:

    @task
    def plan_sections(params: dict[str, Any], run_id: str, **context: Any) -> dict[str, Any]:
        """Seed, pick this run's documents, split the long ones into sections."""
        import sqlalchemy as sa

        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.sinks import ResultSink
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        ex.require_connections(fable=FABLE_CONN_ID, sql=BACKLOG_CONN_ID)
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            ex.seed_table(
                engine, "documents", "documents", key="doc_id",
                columns=("doc_id", "created_at", "doc_type", "title", "body"),
            )  # fmt: skip
            ResultSink(
                engine, table="section_summaries", id_column="section_id", output_model=SectionSummary
            ).ensure_tables()
            ResultSink(
                engine, table="document_summaries", id_column="doc_id", output_model=DocumentSummary
            ).ensure_tables()
            tables = _tables(engine)
            mode, window = ex.run_mode(context, params["mode"])
            failed = (
                "(EXISTS (SELECT 1 FROM document_summary_incomplete AS i WHERE i.doc_id = d.doc_id) "
                "OR EXISTS (SELECT 1 FROM document_summaries_rejects AS x WHERE x.record_id = d.doc_id))"
            )
            # failed: incomplete or rejected before, no summary since. Otherwise: neither (those
            # wait for mode=failed: the job ledger would only re-attach them to their old batches).
            where = "NOT EXISTS (SELECT 1 FROM document_summaries AS s WHERE s.doc_id = d.doc_id) AND " + (
                failed if mode == "failed" else f"NOT {failed}"
            )
            binds: dict[str, Any] = {"pilot": params["pilot"]}
            if window:
                where += " AND d.created_at >= :start AND d.created_at < :end"
                binds.update(start=window[0], end=window[1])
            with engine.begin() as conn:
                docs = (
                    conn.execute(
                        sa.text(
                            "SELECT d.doc_id, d.doc_type, d.title, d.body FROM documents AS d "
                            f"WHERE {where} ORDER BY d.created_at, d.doc_id LIMIT :pilot"
                        ),
                        binds,
                    )
                    .mappings()
                    .all()
                )
                work, sections = [], []
                for doc in docs:
                    if estimate_tokens(doc["body"]) <= params["section_tokens"]:
                        work.append(
                            {"run_id": run_id, "doc_id": doc["doc_id"], "path": "direct", "sections": 0}
                        )
                        continue
                    parts = split_sections(
                        doc["body"], params["section_tokens"], OVERLAP_PARAGRAPHS
                    )
                    work.append(
                        {"run_id": run_id, "doc_id": doc["doc_id"], "path": "chunked", "sections": len(parts)}
                    )
                    for n, (heading, text) in enumerate(parts, 1):
                        sections.append(
                            {
                                "section_id": f"{doc['doc_id']}-s{n:03d}",
                                "doc_id": doc["doc_id"],
                                "section_no": n,
                                "section_count": len(parts),
                                "heading": heading,
                                "text": text,
                                "est_tokens": estimate_tokens(text),
                            }
                        )
                doc_ids = [w["doc_id"] for w in work]
                conn.execute(tables["doc_work"].delete().where(tables["doc_work"].c.run_id == run_id))
                if doc_ids:
                    secs = tables["document_sections"]
                    conn.execute(secs.delete().where(secs.c.doc_id.in_(doc_ids)))
                    conn.execute(tables["doc_work"].insert(), work)
                if sections:
                    conn.execute(tables["document_sections"].insert(), sections)
        finally:
            engine.dispose()
        return {
            "documents": len(work),
            "direct": sum(w["path"] == "direct" for w in work),
            "chunked": sum(w["path"] == "chunked" for w in work),
            "sections": len(sections),
            "mode": mode,
            "window": {"start": window[0], "end": window[1]} if window else None,
        }

    submit_sections = FableBatchSubmitOperator(
        task_id="submit_sections",
        sql=SELECT_SECTIONS,
        sql_conn_id=BACKLOG_CONN_ID,
        sql_parameters={"run_id": "{{ run_id }}"},
        id_field="section_id",
        prompt_template=SECTION_TEMPLATE,
        system_prompt=SECTION_SYSTEM,
        output_model=SectionSummary,
        model="{{ params.model }}",
        max_tokens=SECTION_MAX_TOKENS,
        max_cost_usd="{{ params.budget_usd }}",  # refuses before the first create when over
        rerun=RERUN,
    )
    wait_sections = FableBatchSensor(
        task_id="wait_sections", batch_ids=submit_sections.output, poll_interval=POLL_SECONDS
    )
    load_sections = FableValidateLoadOperator(
        task_id="load_sections",
        batch_ids=wait_sections.output,
        output_model=SectionSummary,
        destination_conn_id=BACKLOG_CONN_ID,
        table="section_summaries",
        id_column="section_id",
        submit_manifest=submit_sections.output,
    )

    @task
    def plan_combine(params: dict[str, Any], run_id: str, ti: Any = None) -> dict[str, Any]:
        """Combine inputs for complete documents; report the incomplete ones instead.

        Also what is left of ``params.budget_usd`` after the sections' actual cost: the combine
        submit's ``max_cost_usd``.
        """
        from datetime import timezone

        import sqlalchemy as sa

        from airflow_provider_fable.core.manifest import normalise_batch_ids
        from airflow_provider_fable.hooks.sql import sqlalchemy_engine

        batch_ids = normalise_batch_ids(ti.xcom_pull(task_ids="wait_sections") or [])
        sections_cost = (ti.xcom_pull(task_ids="load_sections") or {}).get("cost_usd") or 0.0
        budget = params["budget_usd"]
        # mode=failed sends only the sections not accepted before: the others count from any batch.
        any_batch = params["mode"] == "failed"
        now = datetime.now(timezone.utc).isoformat()
        engine = sqlalchemy_engine(BACKLOG_CONN_ID)
        try:
            tables = _tables(engine)
            with engine.begin() as conn:
                work = (
                    conn.execute(
                        sa.text(
                            "SELECT w.doc_id, w.path, w.sections, d.title, d.doc_type, d.body FROM doc_work AS w "
                            "JOIN documents AS d ON d.doc_id = w.doc_id WHERE w.run_id = :r ORDER BY w.doc_id"
                        ),
                        {"r": run_id},
                    )
                    .mappings()
                    .all()
                )
                summaries: dict[str, list[dict[str, Any]]] = {}
                reasons: dict[str, str] = {}
                if batch_ids or any_batch:
                    stmt = sa.text(
                        "SELECT s.section_id, s.doc_id, s.section_no, s.section_count, r.summary, r.key_points, "
                        "r.risks, r.open_questions FROM document_sections AS s JOIN doc_work AS w "
                        "ON w.doc_id = s.doc_id AND w.run_id = :r JOIN section_summaries AS r "
                        "ON r.section_id = s.section_id"
                        + ("" if any_batch else " AND r._batch_id IN :b")
                        + " ORDER BY s.section_id"
                    )
                    binds = {"r": run_id}
                    if not any_batch:
                        stmt = stmt.bindparams(sa.bindparam("b", expanding=True))
                        binds["b"] = batch_ids
                    for row in conn.execute(stmt, binds).mappings():
                        summaries.setdefault(row["doc_id"], []).append(dict(row))
                if batch_ids:
                    rej = sa.text(
                        "SELECT record_id, reason FROM section_summaries_rejects WHERE batch_id IN :b"
                    ).bindparams(sa.bindparam("b", expanding=True))
                    reasons = {r.record_id: r.reason for r in conn.execute(rej, {"b": batch_ids})}
                inputs, incomplete = [], []
                for doc in work:
                    if doc["path"] == "direct":
                        material, note = doc["body"], "The text above is the full document."
                    else:
                        got = summaries.get(doc["doc_id"], [])
                        if len(got) < doc["sections"]:
                            have = {r["section_no"] for r in got}
                            missing = [n for n in range(1, doc["sections"] + 1) if n not in have]
                            why = sorted(
                                {reasons.get(f"{doc['doc_id']}-s{n:03d}", "no result") for n in missing}
                            )
                            incomplete.append(
                                {
                                    "run_id": run_id, "doc_id": doc["doc_id"], "sections": doc["sections"],
                                    "missing_sections": ",".join(map(str, missing)), "reasons": ",".join(why),
                                    "reported_at": now,
                                }
                            )  # fmt: skip
                            continue
                        material = material_from_sections(got)
                        note = f"The text above is the summaries of its {doc['sections']} sections, in order."
                    inputs.append(
                        {
                            "run_id": run_id, "doc_id": doc["doc_id"], "title": doc["title"],
                            "doc_type": doc["doc_type"], "material": material, "source_note": note,
                        }
                    )  # fmt: skip
                for name in ("document_combine_inputs", "document_summary_incomplete"):
                    conn.execute(tables[name].delete().where(tables[name].c.run_id == run_id))
                if inputs:
                    conn.execute(tables["document_combine_inputs"].insert(), inputs)
                if incomplete:
                    conn.execute(tables["document_summary_incomplete"].insert(), incomplete)
        finally:
            engine.dispose()
        return {
            "to_combine": len(inputs),
            "incomplete": len(incomplete),
            "incomplete_docs": [r["doc_id"] for r in incomplete][:50],
            "budget_left_usd": None if budget is None else round(max(0.0, budget - sections_cost), 6),
        }

    submit_combine = FableBatchSubmitOperator(
        task_id="submit_combine",
        sql=SELECT_COMBINE,
        sql_conn_id=BACKLOG_CONN_ID,
        sql_parameters={"run_id": "{{ run_id }}"},
        id_field="doc_id",
        prompt_template=COMBINE_TEMPLATE,
        system_prompt=COMBINE_SYSTEM,
        output_model=DocumentSummary,
        model="{{ params.model }}",
        max_tokens=COMBINE_MAX_TOKENS,
        # What the sections left of params.budget_usd ("None" when there is no budget).
        max_cost_usd="{{ ti.xcom_pull(task_ids='plan_combine')['budget_left_usd'] }}",
        rerun=RERUN,
    )
    wait_combine = FableBatchSensor(
        task_id="wait_combine", batch_ids=submit_combine.output, poll_interval=POLL_SECONDS
    )
    load_combine = FableValidateLoadOperator(
        task_id="load_combine",
        batch_ids=wait_combine.output,
        output_model=DocumentSummary,
        destination_conn_id=BACKLOG_CONN_ID,
        table="document_summaries",
        id_column="doc_id",
        submit_manifest=submit_combine.output,
        outlets=[DOCUMENT_SUMMARIES],
    )

    @task
    def report(params: dict[str, Any], ti: Any = None) -> dict[str, Any]:
        """Documents by path, sections, combined summaries, incomplete documents, stage costs."""
        from airflow_provider_fable import example_data as ex
        from airflow_provider_fable.core.cost import usage_cost_usd
        from airflow_provider_fable.core.results import Usage

        plan = ti.xcom_pull(task_ids="plan_sections") or {}
        sections = ti.xcom_pull(task_ids="load_sections") or {}
        combine = ti.xcom_pull(task_ids="plan_combine") or {}
        combined = ti.xcom_pull(task_ids="load_combine") or {}
        prices = ex.example_prices()

        def cost(summary: dict[str, Any]) -> float:
            return usage_cost_usd(Usage(**summary.get("usage", {})), params["model"], prices=prices) or 0.0

        return {
            "documents": plan.get("documents", 0),
            "direct": plan.get("direct", 0),
            "chunked": plan.get("chunked", 0),
            "sections": plan.get("sections", 0),
            "sections_accepted": sections.get("accepted", 0),
            "sections_rejected": sections.get("rejected", 0),
            "combined_submitted": combine.get("to_combine", 0),
            "summaries_loaded": combined.get("accepted", 0),
            "summaries_rejected": combined.get("rejected", 0),
            "incomplete_documents": combine.get("incomplete", 0),
            "incomplete_docs": combine.get("incomplete_docs", []),
            "stage_cost_usd": {"sections": round(cost(sections), 6), "combine": round(cost(combined), 6)},
        }

    planned = plan_sections()
    combine_plan = plan_combine()
    planned >> submit_sections >> wait_sections >> load_sections >> combine_plan
    combine_plan >> submit_combine >> wait_combine >> load_combine >> report()


def _tables(engine: Any) -> dict[str, Any]:
    """The DAG's own tables (created if missing)."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    sa.Table(
        "doc_work",
        meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("doc_id", sa.Text, primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sections", sa.Integer, nullable=False),
    )
    sa.Table(
        "document_sections",
        meta,
        sa.Column("section_id", sa.Text, primary_key=True),
        sa.Column("doc_id", sa.Text, nullable=False, index=True),
        sa.Column("section_no", sa.Integer, nullable=False),
        sa.Column("section_count", sa.Integer, nullable=False),
        sa.Column("heading", sa.Text),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("est_tokens", sa.Integer),
    )
    sa.Table(
        "document_combine_inputs",
        meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("doc_id", sa.Text, primary_key=True),
        sa.Column("title", sa.Text),
        sa.Column("doc_type", sa.Text),
        sa.Column("material", sa.Text, nullable=False),
        sa.Column("source_note", sa.Text),
    )
    sa.Table(
        "document_summary_incomplete",
        meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("doc_id", sa.Text, primary_key=True),
        sa.Column("sections", sa.Integer),
        sa.Column("missing_sections", sa.Text),
        sa.Column("reasons", sa.Text),
        sa.Column("reported_at", sa.Text),
    )
    meta.create_all(engine)
    return meta.tables

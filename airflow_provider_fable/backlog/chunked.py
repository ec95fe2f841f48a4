"""Chunk-then-combine inside a ``Backlog`` (``Chunking(...)``): the section step before the stages.

Kept apart from ``unit.py``/``runtime.py`` (which build and run the stages) so the two evolve
separately; ``Backlog`` calls :func:`section_tasks` and :class:`CombineStageSubmit` when it has a
``chunking`` config, and nothing else changes for it.

Per pass (pilot, full) the graph gains, before the first stage::

    <p>sections_submit -> <p>sections_wait -> <p>sections_load -> <p>combine_plan -> <p>s1_submit ...

- ``sections_submit`` reads the pass's records (the work table, as the first stage would),
  splits each record's long field with ``core.chunking`` and sends the sections
  (``id_field="section_id"``, ``rerun="unaccepted"``: a section the sections job accepted in any
  earlier run is never paid for again). Splitting is deterministic, so nothing is stored between
  tasks: every task that needs the sections splits the records again and gets the same ids.
- ``sections_load`` writes the section answers into ``<table>__sections`` (rejects in
  ``<table>__sections_rejects``).
- ``combine_plan`` splits again, looks every expected section up (ledger verdict of the sections
  job, answer from the sections table), writes one combine input per complete record into
  ``<table>__combine`` (``run_id``, ``pass_name``, id, the input as JSON) and one row per
  incomplete record into ``<table>_incomplete`` (missing and rejected sections with reasons);
  it returns what the sections' actual cost left of the budget, for the first stage's submit.
- the stages' submits (:class:`CombineStageSubmit`) read their records from ``<table>__combine``
  instead of the source: the unit's prompt, output model, escalation and final table then work
  on combine inputs exactly as they work on records.

Importing this module costs what ``unit`` costs (the operators' cheap modules); the core, the
ledger and SQLAlchemy are imported inside the tasks.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

# Imported only from ``Backlog`` while it builds the graph, when ``unit`` is loaded already; the
# operator modules import nothing heavy at module level.
from airflow_provider_fable.backlog.unit import BacklogStageSubmit

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

MATERIAL_FIELD = "material"
NOTE_FIELD = "material_note"
_CHUNK = 500


def spec_entries(unit: Any) -> dict[str, Any]:
    """What the chunked tasks need in the unit's spec (plain values and config objects)."""
    chunking = unit.chunking
    table = unit.destination.table
    return {
        "chunking": chunking,
        "section_prompt": chunking.prompt.resolve(unit.search_path),
        "sections_table": f"{table}__sections",
        "combine_table": f"{table}__combine",
        "incomplete_table": f"{table}_incomplete",
    }


def _budget_template(unit: Any, pass_name: str) -> str:
    """The sections submit's ``max_cost_usd``: what the first stage's submit would have had."""
    if pass_name == "pilot":
        return "{{ params.budget_usd }}"
    source = unit.task_id("project" if unit.with_pilot else "select")
    return f"{{{{ (ti.xcom_pull(task_ids='{source}') or {{}}).get('budget_left_usd') }}}}"


def section_tasks(unit: Any, pass_name: str) -> tuple[Any, Any]:
    """The section step of one pass: (first task, last task) = (sections_submit, combine_plan)."""
    from airflow_provider_fable.operators.load import FableValidateLoadOperator
    from airflow_provider_fable.sensors.batch import FableBatchSensor

    spec, chunking = unit.spec, unit.chunking
    prefix = "" if pass_name == "full" else f"{pass_name}_"
    prompt = spec["section_prompt"]
    submit = SectionsSubmit(
        task_id=f"{prefix}sections_submit",
        spec=spec,
        pass_name=pass_name,
        stage_index=0,
        prompt_template=prompt.template,
        system_prompt=prompt.system,
        few_shot_examples=prompt.few_shot,
        output_model=chunking.output_model,
        id_field="section_id",
        model=chunking.model,
        max_tokens=chunking.max_tokens,
        rerun="unaccepted",
        max_cost_usd=_budget_template(unit, pass_name),
        fable_conn_id=unit.fable_conn_id,
        ledger_conn_id=unit.ledger_conn_id,
        prices=unit.prices,
        sample_seed=unit.seed,
    )
    wait = FableBatchSensor(
        task_id=f"{prefix}sections_wait", batch_ids=submit.output, fable_conn_id=unit.fable_conn_id,
        poll_interval=unit.poll_interval,
    )  # fmt: skip
    load = FableValidateLoadOperator(
        task_id=f"{prefix}sections_load",
        batch_ids=wait.output,
        output_model=chunking.output_model,
        destination_conn_id=unit.destination.conn_id,
        table=spec["sections_table"],
        id_column="section_id",
        fable_conn_id=unit.fable_conn_id,
        ledger_conn_id=unit.ledger_conn_id,
        submit_manifest=submit.output,
        prices=unit.prices,
        qa_size=0,
        # A rejected section makes its record incomplete (reported); the run goes on.
        fail_when_all_rejected=False,
    )
    plan = unit._py(f"{prefix}combine_plan", plan_combine, pass_name=pass_name)
    submit >> wait >> load >> plan
    return submit, plan


class SectionsSubmit(BacklogStageSubmit):
    """A stage submit whose records are the sections of the pass's records."""

    def execute(self, context: Context) -> dict[str, Any]:
        self._params = dict(context.get("params") or {})
        return super().execute(context)

    def iter_source(self, engine: Any = None) -> Any:
        params = getattr(self, "_params", {})
        records = section_records(self.spec, self._run_id or "", self.pass_name, params)
        return self._excerpt_tap(self._sampled(records))


class CombineStageSubmit(BacklogStageSubmit):
    """A stage submit whose records are the combine inputs ``combine_plan`` wrote."""

    def iter_source(self, engine: Any = None) -> Any:
        records = combine_records(self.spec, self._run_id or "", self.pass_name, self.stage_index)
        return self._excerpt_tap(self._sampled(records))


# ------------------------------------------------------------------ run time
def section_tokens(spec: Mapping[str, Any], params: Mapping[str, Any]) -> int:
    """The section bound of this run: a ``section_tokens`` Param of the DAG, else the config's."""
    value = params.get("section_tokens")
    return int(value) if value not in (None, "", "None") else int(spec["chunking"].section_tokens)


def _split(spec: Mapping[str, Any], records: Any, params: Mapping[str, Any]) -> Any:
    from airflow_provider_fable.core.chunking import chunk_records

    c = spec["chunking"]
    return chunk_records(
        records, id_field=spec["source"].id_field, text_field=c.field, max_tokens=section_tokens(spec, params),
        chars_per_token=float(c.chars_per_token), overlap_paragraphs=c.overlap_paragraphs,
        always_split=c.always_split, on_empty=c.on_empty,
    )  # fmt: skip


def _pass_records(spec: Mapping[str, Any], run_id: str, pass_name: str) -> list[dict[str, Any]]:
    from airflow_provider_fable.backlog import runtime

    return list(runtime.stage_records(dict(spec), run_id, pass_name, 0))


def section_records(
    spec: Mapping[str, Any], run_id: str, pass_name: str, params: Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    """The sections of the pass's records (direct records have none), in a deterministic order."""
    plan = _split(spec, _pass_records(spec, run_id, pass_name), params)
    log.info("Chunking: %s", plan.summary())
    yield from plan.sections


def _engine(conn_id: str) -> Any:
    from airflow_provider_fable.hooks.sql import sqlalchemy_engine

    return sqlalchemy_engine(conn_id)


def _tables(spec: Mapping[str, Any]) -> tuple[Any, Any]:
    import sqlalchemy as sa

    meta = sa.MetaData()
    combine = sa.Table(
        spec["combine_table"], meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("pass_name", sa.Text, primary_key=True),
        sa.Column("record_id", sa.Text, primary_key=True),
        sa.Column("sections", sa.Integer, nullable=False),
        sa.Column("record", sa.Text, nullable=False),
    )  # fmt: skip
    incomplete = sa.Table(
        spec["incomplete_table"], meta,
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("pass_name", sa.Text, primary_key=True),
        sa.Column(spec["id_column"], sa.Text, primary_key=True),
        sa.Column("sections", sa.Integer),
        sa.Column("missing_sections", sa.Text),
        sa.Column("rejected_sections", sa.Text),
        sa.Column("reasons", sa.Text),
        sa.Column("note", sa.Text),
        sa.Column("reported_at", sa.Text),
    )  # fmt: skip
    return combine, incomplete


def _section_verdicts(
    spec: Mapping[str, Any], context: Any, pass_name: str, section_ids: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(answers, rejects) of the sections job: ledger verdicts, answers from the sections table."""
    import sqlalchemy as sa

    from airflow_provider_fable.core.job import import_output_model
    from airflow_provider_fable.core.sinks import output_columns
    from airflow_provider_fable.hooks.ledger import open_ledger

    prefix = "" if pass_name == "full" else f"{pass_name}_"
    manifest = context["ti"].xcom_pull(task_ids=f"{spec['group']}.{prefix}sections_submit") or {}
    job_id = manifest.get("job_fingerprint")
    if not job_id or not section_ids:
        return {}, {}
    ledger = open_ledger(spec["ledger_conn_id"], spec["fable_conn_id"], log)
    try:
        states = ledger.record_states(job_id, section_ids)
    finally:
        ledger.engine.dispose()
    accepted = [sid for sid, st in states.items() if st.status == "accepted"]
    rejected = [sid for sid, st in states.items() if st.status == "rejected"]
    kinds = output_columns(import_output_model(spec["chunking"].output_model))
    answers: dict[str, dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    table, rejects = spec["sections_table"], f"{spec['sections_table']}_rejects"
    engine = _engine(spec["destination"].conn_id)
    try:
        inspector = sa.inspect(engine)
        with engine.connect() as conn:
            if accepted and inspector.has_table(table):
                stmt = sa.text(f'SELECT * FROM "{table}" WHERE section_id IN :ids').bindparams(
                    sa.bindparam("ids", expanding=True)
                )
                for start in range(0, len(accepted), _CHUNK):
                    for row in conn.execute(stmt, {"ids": accepted[start : start + _CHUNK]}).mappings():
                        answer = {}
                        for name, kind in kinds.items():
                            value = row.get(name)
                            if kind == "json" and isinstance(value, str):
                                value = json.loads(value)
                            answer[name] = value
                        answers[str(row["section_id"])] = answer
            if rejected and inspector.has_table(rejects):
                stmt = sa.text(
                    f'SELECT record_id, reason FROM "{rejects}" WHERE record_id IN :ids ORDER BY rejected_at'
                ).bindparams(sa.bindparam("ids", expanding=True))
                for start in range(0, len(rejected), _CHUNK):
                    for rid, reason in conn.execute(stmt, {"ids": rejected[start : start + _CHUNK]}):
                        reasons[str(rid)] = reason  # the latest wins (ordered by time)
    finally:
        engine.dispose()
    rejects_out = {sid: reasons.get(sid, "rejected") for sid in rejected if sid not in answers}
    return answers, rejects_out


def plan_combine(spec: dict[str, Any], context: Any, *, pass_name: str) -> dict[str, Any]:
    """Combine inputs for the records whose every section is accepted; the others reported."""
    from airflow_provider_fable.core.chunking import build_combine_inputs

    run_id = str(context["run_id"])
    records = _pass_records(spec, run_id, pass_name)
    plan = _split(spec, records, context["params"])
    id_field, text_field = spec["source"].id_field, spec["chunking"].field
    answers, rejects = _section_verdicts(spec, context, pass_name, [s["section_id"] for s in plan.sections])
    direct = set(plan.direct)
    combined = build_combine_inputs(
        plan.sections, answers, rejects, id_field=id_field, text_field=text_field,
        direct=[r for r in records if str(r.get(id_field)) in direct], material_field=MATERIAL_FIELD,
    )  # fmt: skip
    now = datetime.now(timezone.utc).isoformat()
    inputs = []
    for item in combined.inputs:
        n = item["section_count"]
        item[NOTE_FIELD] = (
            f"The text above is the answers for its {n} sections, in order."
            if n
            else "The text above is the full text."
        )
        item.pop("section_answers", None)  # the material carries them; keep the JSON small
        rid = str(item[id_field])
        inputs.append({
            "run_id": run_id, "pass_name": pass_name, "record_id": rid, "sections": n,
            "record": json.dumps(item, default=str, ensure_ascii=False),
        })  # fmt: skip
    incomplete = [
        {
            "run_id": run_id, "pass_name": pass_name, spec["id_column"]: i.record_id, "sections": i.count,
            "missing_sections": ",".join(map(str, i.missing)),
            "rejected_sections": ",".join(map(str, sorted(i.rejected))),
            "reasons": ",".join(sorted(set(i.rejected.values()) | ({"no result"} if i.missing else set()))),
            "note": i.note, "reported_at": now,
        }
        for i in combined.incomplete
    ]  # fmt: skip
    incomplete += [
        {"run_id": run_id, "pass_name": pass_name, spec["id_column"]: rid, "sections": 0, "missing_sections": "",
         "rejected_sections": "", "reasons": reason, "note": "empty text, not sent", "reported_at": now}
        for rid, reason in plan.skipped.items()
    ]  # fmt: skip
    combine, inc = _tables(spec)
    engine = _engine(spec["destination"].conn_id)
    try:
        combine.metadata.create_all(engine, checkfirst=True)
        with engine.begin() as conn:
            for table in (combine, inc):
                conn.execute(table.delete().where(table.c.run_id == run_id, table.c.pass_name == pass_name))
            for start in range(0, len(inputs), _CHUNK):
                conn.execute(combine.insert(), inputs[start : start + _CHUNK])
            if incomplete:
                conn.execute(inc.insert(), incomplete)
    finally:
        engine.dispose()
    prefix = "" if pass_name == "full" else f"{pass_name}_"
    ti = context["ti"]
    load = ti.xcom_pull(task_ids=f"{spec['group']}.{prefix}sections_load") or {}
    submit = ti.xcom_pull(task_ids=f"{spec['group']}.{prefix}sections_submit") or {}
    budget = _budget_in(spec, context, pass_name)
    cost = float(load.get("cost_usd") or 0.0)
    out = {
        **plan.summary(),
        **combined.summary(limit=50),
        "sections_sent": submit.get("submitted", 0),
        "sections_reused": submit.get("skipped", 0),
        "sections_cost_usd": round(cost, 6),
        "budget_left_usd": None if budget is None else round(max(0.0, budget - cost), 6),
    }
    for i in combined.incomplete[:20]:
        log.info("Not combined: %s", i.describe())
    log.info(
        "Chunk-then-combine, %s pass: %s",
        pass_name,
        {k: v for k, v in out.items() if k != "incomplete_records"},
    )
    return out


def _budget_in(spec: Mapping[str, Any], context: Any, pass_name: str) -> float | None:
    """The budget the sections submit had (its ``max_cost_usd`` template, evaluated here)."""
    params = context["params"]
    if pass_name == "pilot":
        value = params.get("budget_usd")
    else:
        source = "project" if spec.get("with_pilot") else "select"
        value = (context["ti"].xcom_pull(task_ids=f"{spec['group']}.{source}") or {}).get("budget_left_usd")
    if value in (None, "", "None"):
        return None
    return float(value)


def combine_records(
    spec: Mapping[str, Any], run_id: str, pass_name: str, stage_index: int
) -> Iterator[dict[str, Any]]:
    """Combine inputs of this run's pass for the records the work table holds at this stage."""
    import sqlalchemy as sa

    from airflow_provider_fable.backlog import selection as sel
    from airflow_provider_fable.backlog.runtime import _tables as unit_tables

    engine = _engine(spec["destination"].conn_id)
    combine, _ = _tables(spec)
    try:
        wanted = set(
            sel.work_rows(engine, unit_tables(spec), run_id=run_id, pass_name=pass_name, stage=stage_index)
        )
        if not wanted or not sa.inspect(engine).has_table(spec["combine_table"]):
            return
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(combine.c.record_id, combine.c.record)
                .where(combine.c.run_id == run_id, combine.c.pass_name == pass_name)
                .order_by(combine.c.record_id)
            ).all()
    finally:
        engine.dispose()
    for rid, record in rows:
        if rid in wanted:
            yield json.loads(record)


def sections_cost(context: Any, spec: Mapping[str, Any], pass_name: str) -> float:
    """What the pass's section requests cost (the sections load's summary)."""
    prefix = "" if pass_name == "full" else f"{pass_name}_"
    load = context["ti"].xcom_pull(task_ids=f"{spec['group']}.{prefix}sections_load") or {}
    return round(float(load.get("cost_usd") or 0.0), 6)


def incomplete_reasons(
    engine: Any, spec: Mapping[str, Any], run_id: str, pass_name: str
) -> dict[str, tuple[str, str]]:
    """record id -> (reason, detail) of the records ``combine_plan`` left out in this pass.

    ``finalize`` uses them as the reject reason of a record no stage answered because it was
    never combined: ``sections_incomplete`` with the missing/rejected sections, or the empty-text
    rule, instead of a bare ``no_answer``.
    """
    import sqlalchemy as sa

    _, inc = _tables(spec)
    if not sa.inspect(engine).has_table(spec["incomplete_table"]):
        return {}
    idc = spec["id_column"]
    out: dict[str, tuple[str, str]] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(inc).where(inc.c.run_id == run_id, inc.c.pass_name == pass_name)
        ).mappings()
        for r in rows:
            if r["sections"]:
                detail = f"{r['sections']} sections; missing: {r['missing_sections'] or '-'}; rejected: {r['rejected_sections'] or '-'} ({r['reasons']})"
                out[str(r[idc])] = ("sections_incomplete", detail)
            else:
                out[str(r[idc])] = (str(r["reasons"]), str(r["note"]))
    return out


def _full_pass_split(spec: Mapping[str, Any], context: Any) -> Any:
    """The full pass's sections, split as its sections submit will split them (deterministic)."""
    return _split(spec, _pass_records(spec, str(context["run_id"]), "full"), context["params"])


def _add_row(out: dict[str, Any], row: dict[str, Any]) -> None:
    """Put a ``sections`` row first in a projection (its stages, total and markdown table)."""
    out["stages"] = [row, *out.get("stages", [])]
    if row["projected_cost_usd"] is not None:
        out["projected_cost_usd"] = round(
            float(out.get("projected_cost_usd") or 0.0) + row["projected_cost_usd"], 6
        )
    unit, projected = row["cost_per_request_usd"], row["projected_cost_usd"]
    line = (
        f"| sections | {row['model']} | {row['requests']:g} | {'?' if unit is None else f'{unit:.6f}'} | "
        f"{'?' if projected is None else f'{projected:.4f}'} | {row['basis']} |"
    )
    md = out.get("markdown", "").split("\n")
    at = next((n + 1 for n, x in enumerate(md) if x.startswith("|---")), len(md))
    md.insert(at, line)
    total = f"projected ${float(out.get('projected_cost_usd') or 0.0):.4f} (sections included)**"
    md = [re.sub(r"projected \$[0-9.]+\*\*", total, x) if x.startswith("**Full run") else x for x in md]
    out["markdown"] = "\n".join(md)


def project_sections(spec: Mapping[str, Any], context: Any, out: dict[str, Any]) -> float:
    """Add the full pass's section requests to ``project``'s projection; return the pilot's cost.

    The number of sections is exact: the full pass's records are split here as its sections
    submit will split them. The cost per section is what the pilot paid per section it sent
    (its ``sections_load``); without one, the mean of earlier section answers or an upper bound.
    """
    ti = context["ti"]
    plan = ti.xcom_pull(task_ids=f"{spec['group']}.pilot_combine_plan") or {}
    cost = sections_cost(context, spec, "pilot")
    sent = plan.get("sections_sent") or 0
    split = _full_pass_split(spec, context)
    if sent:
        unit: float | None = cost / sent
        basis = f"pilot: ${cost:.6f} for {sent} section(s)"
    else:
        unit, basis = _unit_cost_without_pilot(spec, split)
    n = len(split.sections)
    row = {
        "stage": "sections", "model": spec["chunking"].model, "requests": float(n), "cost_per_request_usd": unit,
        "projected_cost_usd": None if unit is None else round(n * unit, 6),
        "basis": f"{basis}; exact count: the full pass splits into {n} section(s)",
    }  # fmt: skip
    _add_row(out, row)
    return cost


def estimate_sections(spec: Mapping[str, Any], context: Any, out: dict[str, Any]) -> None:
    """An ``estimate_only`` run without a pilot: add the section requests to ``select``'s projection
    (exact count from the split; cost per section measured on earlier runs, else an upper bound)."""
    split = _full_pass_split(spec, context)
    unit, basis = _unit_cost_without_pilot(spec, split)
    n = len(split.sections)
    _add_row(out, {
        "stage": "sections", "model": spec["chunking"].model, "requests": float(n), "cost_per_request_usd": unit,
        "projected_cost_usd": None if unit is None else round(n * unit, 6),
        "basis": f"{basis}; exact count: the full pass splits into {n} section(s)",
    })  # fmt: skip


def _unit_cost_without_pilot(spec: Mapping[str, Any], split: Any) -> tuple[float | None, str]:
    """Mean cost of a section answer measured in ``<table>__sections`` (any run), else an upper
    bound: the section's estimated tokens plus the prompt's (4 characters a token), nothing
    cached, ``max_tokens`` out."""
    import sqlalchemy as sa

    from airflow_provider_fable.backlog.runtime import _prices
    from airflow_provider_fable.core.chunking import estimate_tokens
    from airflow_provider_fable.core.cost import usage_cost_usd
    from airflow_provider_fable.core.results import Usage

    c, prices = spec["chunking"], _prices(spec)
    engine = _engine(spec["destination"].conn_id)
    try:
        if sa.inspect(engine).has_table(spec["sections_table"]):
            with engine.connect() as conn:
                n, tin, tout = conn.execute(
                    sa.text(
                        f'SELECT count(*), avg("_input_tokens"), avg("_output_tokens") FROM "{spec["sections_table"]}" '
                        'WHERE "_model" = :m'
                    ),
                    {"m": c.model},
                ).one()
            if n:
                usage = Usage(input_tokens=int(round(tin or 0)), output_tokens=int(round(tout or 0)))
                return usage_cost_usd(usage, c.model, prices=prices), f"mean of {n} earlier section answer(s)"
    finally:
        engine.dispose()
    if not split.sections:
        return None, "no sections"
    prompt = spec["section_prompt"]
    fixed = (
        len(prompt.system or "") + len(prompt.template) + sum(len(str(x)) for x in prompt.few_shot)
    ) // 4 + 10
    tokens = sum(estimate_tokens(s[c.field], c.chars_per_token) for s in split.sections)
    mean_in = fixed + tokens / len(split.sections)
    usage = Usage(input_tokens=int(mean_in), output_tokens=c.max_tokens)
    return usage_cost_usd(usage, c.model, prices=prices), "upper bound (max_tokens out, nothing cached)"

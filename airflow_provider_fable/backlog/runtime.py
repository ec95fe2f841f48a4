"""What the ``Backlog`` unit's own tasks do at run time (imported only inside tasks).

Each function takes the unit's ``spec`` (plain values + the config objects), the task context and
its own arguments. Selection SQL is ``backlog.selection``'s; the final table is built here from
the stage tables the loads wrote and the ledger's verdicts, never from a task's local disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)
_CHUNK = 500
PILOT_MODES = ("backlog", "all")


# ------------------------------------------------------------------ small helpers
def _tables(spec: Mapping[str, Any]) -> Any:
    from airflow_provider_fable.backlog.selection import UnitTables

    return UnitTables(
        final=spec["table"], rejects=spec["rejects_table"], review=spec["review_table"],
        work=spec["work_table"], id_column=spec["id_column"],
    )  # fmt: skip


def _engine(conn_id: str) -> Any:
    from airflow_provider_fable.hooks.sql import sqlalchemy_engine

    return sqlalchemy_engine(conn_id)


def _same_db(spec: Mapping[str, Any]) -> bool:
    src = spec["source"]
    return src.kind == "sql" and src.conn_id == spec["destination"].conn_id


def _tid(spec: Mapping[str, Any], name: str) -> str:
    return f"{spec['group']}.{name}"


def _prefix(pass_name: str) -> str:
    return "" if pass_name == "full" else f"{pass_name}_"


def _stage_task(spec: Mapping[str, Any], pass_name: str, i: int, what: str) -> str:
    return _tid(spec, f"{_prefix(pass_name)}{spec['stage_names'][i]}_{what}")


def _xcom(context: Any, task_id: str) -> Any:
    return context["ti"].xcom_pull(task_ids=task_id)


def _float(value: Any) -> float | None:
    if value in (None, "", "None", "none", "null"):
        return None
    return float(value)


def effective_mode(
    spec: Mapping[str, Any], context: Mapping[str, Any], mode: str
) -> tuple[str, tuple[datetime, datetime] | None]:
    """(mode, window). ``auto`` is ``interval`` for scheduled and backfill runs when the source has
    a date field, else ``backlog``; a run triggered without a logical date has no data interval."""
    from airflow_provider_fable.backlog.config import RUN_MODES

    if mode not in RUN_MODES:
        raise ValueError(f"params.mode must be one of {', '.join(RUN_MODES)}, got {mode!r}")
    date_field = spec["source"].date_field
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    has_interval = start is not None and end is not None and end > start
    if mode == "interval":
        if not date_field:
            raise ValueError(
                "mode='interval' needs Source(date_field=...): the backlog has no field dating a record"
            )
        if not has_interval:
            raise ValueError(
                "mode='interval' needs a run with a data interval (trigger with --logical-date, or a "
                "scheduled/backfill run)"
            )
        return "interval", (start, end)  # type: ignore[return-value]  # has_interval: both set
    if mode != "auto":
        return mode, None
    run = context.get("dag_run")
    run_type = str(getattr(getattr(run, "run_type", None), "value", getattr(run, "run_type", "")))
    if date_field and has_interval and run_type in ("scheduled", "backfill"):
        return "interval", (start, end)  # type: ignore[return-value]
    return "backlog", None


def ensure_final_table(engine: Any, spec: Mapping[str, Any]) -> Any:
    """The final table (created when missing): the answer's columns plus where it came from."""
    import sqlalchemy as sa

    from airflow_provider_fable.core.job import import_output_model
    from airflow_provider_fable.core.sinks import output_columns

    types = {"string": sa.Text, "integer": sa.BigInteger, "number": sa.Float, "decimal": sa.Numeric,
             "boolean": sa.Boolean, "json": sa.Text}  # fmt: skip
    kinds = output_columns(import_output_model(spec["output_model"]))
    meta = sa.MetaData()
    table = sa.Table(
        spec["table"],
        meta,
        sa.Column(spec["id_column"], sa.Text, primary_key=True),
        *(sa.Column(name, types[kind]()) for name, kind in kinds.items()),
        sa.Column("_stage", sa.Text),
        sa.Column("_model", sa.Text),
        sa.Column("_escalation_reason", sa.Text),
        sa.Column("_batch_id", sa.Text),
        sa.Column("_run_id", sa.Text),
        sa.Column("_input_tokens", sa.BigInteger),
        sa.Column("_output_tokens", sa.BigInteger),
        sa.Column("_final_at", sa.Text),
    )
    meta.create_all(engine, checkfirst=True)
    return table


# ------------------------------------------------------------------ select
def select(spec: dict[str, Any], context: Any) -> dict[str, Any]:
    """Decide the run mode and window; write the pilot sample and the full pass into the work table."""
    from airflow_provider_fable.backlog import selection as sel
    from airflow_provider_fable.core.sources import iter_records, iter_sql

    params = context["params"]
    run_id = str(context["run_id"])
    mode, window = effective_mode(spec, context, params.get("mode", "auto"))
    src, t = spec["source"], _tables(spec)
    limit = params.get("limit")
    estimate_only = bool(params.get("estimate_only"))
    pilot = (
        int(params.get("pilot") or 0)
        if spec["with_pilot"] and mode in PILOT_MODES and not estimate_only
        else 0
    )
    engine = _engine(spec["destination"].conn_id)
    try:
        sel.ensure_state_tables(engine, t)
        ensure_final_table(engine, spec)
        sel.clear_run(engine, t, run_id)
        binds = sel.window_binds(engine, window) if window else {}
        if _same_db(spec):
            sql = sel.selection_sql(
                src.sql, mode, t, id_field=src.id_field, date_field=src.date_field, windowed=window is not None,
                limit=limit,
            )  # fmt: skip
            pilot_ids = (
                sel.sample_ids(sel.select_ids(engine, sql, binds), pilot, spec["seed"]) if pilot else []
            )
            sel.write_work(
                engine, t, run_id=run_id, pass_name="pilot", stage=0, rows=((r, None) for r in pilot_ids)
            )
            full = sel.insert_selection(
                engine,
                sql,
                binds,
                t,
                run_id=run_id,
                pass_name="full",
                exclude_pass="pilot" if pilot_ids else None,
            )
        else:
            state = sel.State.read(engine, t)
            src_engine = _engine(src.conn_id) if src.kind == "sql" else None
            try:
                records = (
                    iter_sql(src_engine, src.sql)
                    if src_engine is not None
                    else iter_records(src.records if src.kind == "records" else src.callable)
                )
                ids = list(
                    sel.filter_records(
                        records, state, mode, id_field=src.id_field, date_field=src.date_field, window=window
                    )
                )
            finally:
                if src_engine is not None:
                    src_engine.dispose()
            if limit:
                ids = ids[: int(limit)]
            pilot_ids = sel.sample_ids(ids, pilot, spec["seed"]) if pilot else []
            chosen = set(pilot_ids)
            sel.write_work(
                engine, t, run_id=run_id, pass_name="pilot", stage=0, rows=((r, None) for r in pilot_ids)
            )
            full = sel.write_work(
                engine,
                t,
                run_id=run_id,
                pass_name="full",
                stage=0,
                rows=((r, None) for r in ids if r not in chosen),
            )
    finally:
        engine.dispose()
    budget = _float(params.get("budget_usd"))
    out: dict[str, Any] = {
        "mode": mode,
        "window": [window[0].isoformat(), window[1].isoformat()] if window else None,
        "pilot": len(pilot_ids),
        "full": full,
        "estimate_only": estimate_only,
        "budget_left_usd": budget,
    }
    log.info("Backlog %s, run %s: mode %s%s; pilot %d record(s), full pass %d record(s)",
             spec["backlog_id"], run_id, mode, f" {out['window']}" if window else "", len(pilot_ids), full)  # fmt: skip
    if estimate_only and not spec["with_pilot"]:
        out["projection"] = projection(spec, context, full_records=full, pilot=None)
        if spec.get("chunking") is not None:  # chunking (backlog/chunked.py): the section requests too
            from airflow_provider_fable.backlog import chunked

            chunked.estimate_sections(spec, context, out["projection"])
        log.info("Estimate only, nothing is paid for:\n%s", out["projection"]["markdown"])
    return out


# ------------------------------------------------------------------ stage records
def stage_records(
    spec: dict[str, Any], run_id: str, pass_name: str, stage_index: int
) -> Iterator[dict[str, Any]]:
    """Source records of this run's pass and stage (work table rows joined to the source)."""
    from airflow_provider_fable.backlog import selection as sel
    from airflow_provider_fable.core.sources import iter_records, iter_sql

    src, t = spec["source"], _tables(spec)
    binds = {"run_id": run_id, "pass_name": pass_name, "stage": stage_index}
    engine = _engine(spec["destination"].conn_id)
    try:
        if _same_db(spec):
            yield from iter_sql(engine, sel.work_join_sql(src.sql, t, id_field=src.id_field), binds)
            return
        wanted = set(sel.work_rows(engine, t, run_id=run_id, pass_name=pass_name, stage=stage_index))
    finally:
        engine.dispose()
    if not wanted:
        return
    if src.kind == "sql":
        src_engine = _engine(src.conn_id)
        try:
            records: Any = iter_sql(src_engine, src.sql)
            yield from (r for r in records if str(r.get(src.id_field)) in wanted)
        finally:
            src_engine.dispose()
        return
    records = iter_records(src.records if src.kind == "records" else src.callable)
    yield from (r for r in records if str(r.get(src.id_field)) in wanted)


# ------------------------------------------------------------------ verdicts and answers
def _verdicts(spec: Mapping[str, Any], job_id: str | None, ids: list[str]) -> dict[str, Any]:
    """The ledger's current state of each record in the stage's job (absent: never sent)."""
    if not job_id or not ids:
        return {}
    from airflow_provider_fable.hooks.ledger import open_ledger

    ledger = open_ledger(spec["ledger_conn_id"], spec["fable_conn_id"], log)
    try:
        return ledger.record_states(job_id, ids)
    finally:
        ledger.engine.dispose()


def _answers(engine: Any, table: str, id_column: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Rows of a stage table for these ids (one query per 500 ids)."""
    import sqlalchemy as sa

    if not ids or not sa.inspect(engine).has_table(table):
        return {}
    stmt = sa.text(f'SELECT * FROM "{table}" WHERE CAST("{id_column}" AS TEXT) IN :ids').bindparams(
        sa.bindparam("ids", expanding=True)
    )
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            for row in conn.execute(stmt, {"ids": ids[start : start + _CHUNK]}).mappings():
                out[str(row[id_column])] = dict(row)
    return out


def _job_of(context: Any, spec: Mapping[str, Any], pass_name: str, i: int) -> str | None:
    manifest = _xcom(context, _stage_task(spec, pass_name, i, "submit")) or {}
    return manifest.get("job_fingerprint")


def _stage_cost(context: Any, spec: Mapping[str, Any], pass_name: str, i: int) -> float:
    summary = _xcom(context, _stage_task(spec, pass_name, i, "load")) or {}
    return float(summary.get("cost_usd") or 0.0)


def _prices(spec: Mapping[str, Any]) -> dict[str, Any]:
    from airflow_provider_fable.core.cost import merge_prices

    overrides = None
    try:
        from airflow_provider_fable.hooks.fable import FableHook

        overrides = FableHook(spec["fable_conn_id"]).price_overrides
    except Exception as exc:  # noqa: BLE001 - an estimate without the connection's overrides
        log.debug("no price overrides from the connection: %s", exc)
    return merge_prices(overrides, spec["prices"])


def measured_request_cost(
    engine: Any, spec: Mapping[str, Any], i: int, prices: Mapping[str, Any]
) -> tuple[float | None, str]:
    """Mean cost of one request of stage ``i`` measured on the rows its loads wrote (any run)."""
    import sqlalchemy as sa

    from airflow_provider_fable.core.cost import usage_cost_usd
    from airflow_provider_fable.core.results import Usage

    table = spec["stage_tables"][i]
    model = spec["stages"][i].model
    if not sa.inspect(engine).has_table(table):
        return None, "no measurement"
    with engine.connect() as conn:
        n, tin, tout = conn.execute(
            sa.text(
                f'SELECT count(*), avg("_input_tokens"), avg("_output_tokens") FROM "{table}" WHERE "_model" = :m'
            ),
            {"m": model},
        ).one()
    if not n:
        return None, "no measurement"
    cost = usage_cost_usd(
        Usage(input_tokens=int(round(tin or 0)), output_tokens=int(round(tout or 0))), model, prices=prices
    )
    return cost, f"mean of {n} earlier answer(s) of {model}"


def upper_bound_request_cost(
    spec: Mapping[str, Any], i: int, record: Mapping[str, Any] | None, prices: Mapping[str, Any]
) -> float | None:
    """An upper bound for one request: 4 characters a token, nothing cached, max_tokens out."""
    from airflow_provider_fable.core.cost import usage_cost_usd
    from airflow_provider_fable.core.results import Usage

    prompt = spec["prompt"]
    chars = len(prompt.system or "") + sum(len(str(x)) for x in prompt.few_shot) + len(prompt.template)
    chars += sum(len(str(v)) for v in (record or {}).values())
    stage = spec["stages"][i]
    return usage_cost_usd(
        Usage(input_tokens=chars // 4 + 10, output_tokens=stage.max_tokens), stage.model, prices=prices
    )


# ------------------------------------------------------------------ plan
def plan_escalation(
    spec: dict[str, Any], context: Any, *, pass_name: str, stage_index: int
) -> dict[str, Any]:
    """Which answers of stage ``stage_index`` go to the next stage, in priority order within the budget.

    Rules are the stage's ``escalate`` list; the first that fires is the reason. Candidates are
    ordered by rule (earlier first), then ``priority_field`` (higher first), then id; each costs
    the next stage's measured mean request (or an upper bound) and is taken while the budget
    left after this stage's actual cost covers it.
    """
    from airflow_provider_fable.backlog import selection as sel

    i, run_id = stage_index, str(context["run_id"])
    stage, t = spec["stages"][i], _tables(spec)
    engine = _engine(spec["destination"].conn_id)
    try:
        work = sel.work_rows(engine, t, run_id=run_id, pass_name=pass_name, stage=i)
        ids = sorted(work)
        states = _verdicts(spec, _job_of(context, spec, pass_name, i), ids)
        accepted = [r for r in ids if getattr(states.get(r), "status", None) == "accepted"]
        answers = _answers(engine, spec["stage_tables"][i], spec["id_column"], accepted)
        # The source records only when a rule, the priority or the upper-bound cost of the next
        # request reads them (rejected/below/equals without when_record decide on the answer alone).
        prices = _prices(spec)
        unit, basis = measured_request_cost(engine, spec, i + 1, prices)
        needs_record = (
            unit is None
            or stage.priority_field
            or any(r.kind in ("not_quoted", "when") or r.when_record is not None for r in stage.escalate)
        )
        records = (
            {str(r[spec["source"].id_field]): r for r in stage_records(spec, run_id, pass_name, i)}
            if ids and needs_record
            else {}
        )
        candidates: list[tuple[int, float, str, str]] = []
        for rid in ids:
            if spec.get("chunking") is not None and rid not in states:
                continue  # chunking: never combined (sections incomplete), nothing to escalate
            answer = answers.get(rid) if rid in accepted else None
            record = records.get(rid, {})
            hit = stage.first_reason(answer, record)
            if hit is None:
                continue
            prio = 0.0
            if stage.priority_field:
                try:
                    prio = -float(record.get(stage.priority_field) or 0)
                except (TypeError, ValueError):
                    prio = 0.0
            candidates.append((hit[0], prio, rid, hit[1].reason))
        prev = _budget_before(spec, context, pass_name, i)
        spent = _stage_cost(context, spec, pass_name, i)
        left = None if prev is None else round(max(0.0, prev - spent), 6)
        chosen, over, planned = fit_escalations(
            candidates,
            lambda rid: (
                unit if unit is not None else upper_bound_request_cost(spec, i + 1, records.get(rid), prices)
            ),
            left,
        )
        sel.write_work(engine, t, run_id=run_id, pass_name=pass_name, stage=i + 1, rows=chosen)
    finally:
        engine.dispose()
    by_reason: dict[str, int] = {}
    for _, reason in chosen:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    out = {
        "stage": spec["stage_names"][i],
        "records": len(ids),
        "escalated": len(chosen),
        "by_reason": by_reason,
        "not_escalated_over_budget": over,
        "stage_cost_usd": spent,
        "budget_left_usd": left,
        "planned_next_cost_usd": round(planned, 6),
        "next_request_cost_basis": basis if unit is not None else "upper bound (max_tokens, nothing cached)",
    }
    log.info("Escalation after %s (%s): %s", spec["stage_names"][i], pass_name, out)
    return out


def fit_escalations(
    candidates: list[tuple[int, float, str, str]], cost_of: Any, left: float | None
) -> tuple[list[tuple[str, str]], int, float]:
    """Candidates ``(rule index, -priority, id, reason)`` in priority order, taken while ``left``
    covers their cost: (chosen (id, reason), how many did not fit, planned cost).

    Earlier rules first, then higher ``priority_field``, then id; a candidate that does not fit is
    skipped and cheaper later ones may still fit. ``left=None``: no budget, all are taken.
    """
    chosen: list[tuple[str, str]] = []
    over, planned = 0, 0.0
    for _, _, rid, reason in sorted(candidates):
        cost = cost_of(rid)
        if left is not None and cost is not None and planned + cost > left:
            over += 1
            continue
        planned += cost or 0.0
        chosen.append((rid, reason))
    return chosen, over, planned


def _budget_before(spec: Mapping[str, Any], context: Any, pass_name: str, i: int) -> float | None:
    """What the budget left when stage ``i`` of the pass was submitted (as its submit was told)."""
    if i > 0:
        return _float(
            (_xcom(context, _stage_task(spec, pass_name, i - 1, "plan")) or {}).get("budget_left_usd")
        )
    if pass_name == "pilot":
        return _float(context["params"].get("budget_usd"))
    source = "project" if spec["with_pilot"] else "select"
    return _float((_xcom(context, _tid(spec, source)) or {}).get("budget_left_usd"))


# ------------------------------------------------------------------ finalize
def finalize(spec: dict[str, Any], context: Any, *, pass_name: str) -> dict[str, Any]:
    """One final row per record of the pass; rejects with their last reason; needs_review; QA; guardrails.

    A record's answer is the last stage that answered it without escalating; when a later stage
    failed after an escalation whose rule keeps the answer (``below``/``equals``), the earlier
    answer is kept. A record no stage answered goes to ``<table>_rejects`` with its last reason;
    rejected by the last stage for the same reason ``review_after`` times (ledger outcomes), it
    goes to ``<table>_review`` and is not selected again automatically.
    """
    import sqlalchemy as sa

    from airflow_provider_fable.backlog import selection as sel

    run_id = str(context["run_id"])
    t, n_stages = _tables(spec), len(spec["stages"])
    names, stages = spec["stage_names"], spec["stages"]
    engine = _engine(spec["destination"].conn_id)
    summary: dict[str, Any] = {"pass": pass_name, "records": 0, "accepted": 0, "rejected": 0}
    try:
        final = ensure_final_table(engine, spec)
        work = [
            sel.work_rows(engine, t, run_id=run_id, pass_name=pass_name, stage=i) for i in range(n_stages)
        ]
        ids = sorted(work[0])
        if not ids:
            return summary
        jobs = [_job_of(context, spec, pass_name, i) for i in range(n_stages)]
        states = [_verdicts(spec, jobs[i], sorted(work[i])) for i in range(n_stages)]
        answers = [
            _answers(engine, spec["stage_tables"][i], spec["id_column"],
                     [r for r in work[i] if getattr(states[i].get(r), "status", None) == "accepted"])
            for i in range(n_stages)
        ]  # fmt: skip
        keeps = [{rule.reason: rule.keep_answer for rule in s.escalate} for s in stages]
        why = [
            _reject_details(engine, f"{spec['stage_tables'][i]}_rejects",
                            {r: getattr(st, "batch_id", None) for r, st in states[i].items() if st.status == "rejected"})
            for i in range(n_stages)
        ]  # fmt: skip
        if spec.get("chunking") is not None:  # chunking (backlog/chunked.py): why it was never combined
            from airflow_provider_fable.backlog import chunked

            never_combined = chunked.incomplete_reasons(engine, spec, run_id, pass_name)
            why = [{**never_combined, **w} for w in why]  # whichever stage it was last planned for
        now = datetime.now(timezone.utc).isoformat()
        rows, rejects = [], []
        by_stage: dict[str, int] = {}
        for rid in ids:
            chosen = kept = last_reject = None
            for i in range(n_stages):
                if rid not in work[i]:
                    break
                escalated = i + 1 < n_stages and rid in work[i + 1]
                state = states[i].get(rid)
                answer = answers[i].get(rid)
                if answer is not None:
                    if not escalated:
                        chosen = (i, answer, work[i].get(rid))
                        break
                    if keeps[i].get(work[i + 1][rid] or "", False):
                        kept = (i, answer, work[i].get(rid))
                else:
                    last_reject = (i, state)
                    if not escalated:
                        break
            if chosen is None and kept is not None:
                i, answer, reason = kept
                failed = names[last_reject[0]] if last_reject else "the next stage"
                chosen = (i, answer, f"{reason + '; ' if reason else ''}kept: {failed} gave no valid answer")
            if chosen is not None:
                i, answer, reason = chosen
                by_stage[names[i]] = by_stage.get(names[i], 0) + 1
                row = {
                    c.name: answer.get(c.name)
                    for c in final.columns
                    if c.name in answer and not c.name.startswith("_")
                }
                row.update({
                    spec["id_column"]: rid, "_stage": names[i], "_model": answer.get("_model") or stages[i].model,
                    "_escalation_reason": reason, "_batch_id": answer.get("_batch_id"), "_run_id": run_id,
                    "_input_tokens": answer.get("_input_tokens"), "_output_tokens": answer.get("_output_tokens"),
                    "_final_at": now,
                })  # fmt: skip
                rows.append(row)
            else:
                i, state = last_reject if last_reject else (0, None)
                reason, detail = why[i].get(rid, ("no_answer", None))
                retryable = bool(getattr(state, "retryable", True) if state is not None else True)
                if getattr(state, "status", None) == "accepted":
                    # The ledger holds an accepted answer the stage table does not have: the
                    # table was dropped, or the ledger is shared with another destination. The
                    # stage will not pay for it again by itself, so a failed rerun cannot help.
                    reason, retryable = "answer_missing", False
                    detail = (
                        f"the ledger holds an accepted answer of job {jobs[i]} but {spec['stage_tables'][i]} "
                        "has no row for it (table dropped, or a ledger shared with another destination)"
                    )
                rejects.append({
                    spec["id_column"]: rid, "_stage": names[i], "_model": stages[i].model,
                    "reason": reason, "detail": detail, "retryable": retryable,
                    "_batch_id": getattr(state, "batch_id", None), "_run_id": run_id, "_rejected_at": now,
                    "last_stage": i == n_stages - 1,
                })  # fmt: skip
        review = _needs_review(spec, jobs[-1], [r for r in rejects if r["last_stage"]])
        _write_final(engine, spec, final, rows, rejects, review, now, run_id)
        summary.update(
            records=len(ids), accepted=len(rows), rejected=len(rejects), needs_review=len(review), by_stage=by_stage,
            escalated={names[i + 1]: len(work[i + 1]) for i in range(n_stages - 1)},
            cost_usd_by_stage={names[i]: _stage_cost(context, spec, pass_name, i) for i in range(n_stages)},
            reject_reasons=_count(r["reason"] for r in rejects),
        )  # fmt: skip
        if spec.get("chunking") is not None:  # chunking: the section requests are part of the cost
            summary["cost_usd_by_stage"] = {"sections": chunked.sections_cost(context, spec, pass_name),
                                             **summary["cost_usd_by_stage"]}  # fmt: skip
        summary["cost_usd"] = round(sum(summary["cost_usd_by_stage"].values()), 6)
        summary["distribution"] = _distribution(spec, rows)
        batch_ids = sorted({str(r["_batch_id"]) for r in rows if r.get("_batch_id")})
        if spec["qa_size"]:
            from airflow_provider_fable.core.qa import write_qa_sample

            first = _xcom(context, _stage_task(spec, pass_name, 0, "submit")) or {}
            summary["qa_table"], summary["qa_rows"] = write_qa_sample(
                engine, table=final, id_column=spec["id_column"], batch_ids=batch_ids, size=spec["qa_size"],
                seed=spec["seed"], excerpts=(first.get("qa_excerpts") or {}).get("records") or {},
                qa_table=spec["qa_table"],
            )  # fmt: skip
        if spec["destination"].parquet and rows:
            _write_parquet(spec, final, rows, pass_name, run_id)
    finally:
        engine.dispose()
    _check(spec, context, summary, sa)
    log.info("Backlog %s, %s pass: %s", spec["backlog_id"], pass_name, summary)
    return summary


def _reject_details(
    engine: Any, table: str, current: Mapping[str, str | None]
) -> dict[str, tuple[str, str | None]]:
    """(reason, detail) of each record's reject in its current batch, from a stage's rejects table."""
    import sqlalchemy as sa

    if not current or not sa.inspect(engine).has_table(table):
        return {}
    ids = sorted(current)
    stmt = sa.text(
        f'SELECT record_id, batch_id, reason, detail FROM "{table}" WHERE record_id IN :ids'
    ).bindparams(sa.bindparam("ids", expanding=True))
    out: dict[str, tuple[str, str | None]] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            for rid, batch, reason, detail in conn.execute(stmt, {"ids": ids[start : start + _CHUNK]}):
                if batch == current.get(rid) or rid not in out:
                    out[rid] = (reason, detail)
    return out


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _distribution(spec: Mapping[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    from airflow_provider_fable.core.job import import_output_model
    from airflow_provider_fable.core.loading import distribution_fields

    fields = distribution_fields(import_output_model(spec["output_model"]))
    return {f: _count(str(r.get(f)) for r in rows) for f in fields}


def _needs_review(
    spec: Mapping[str, Any], last_job: str | None, rejects: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rejects of the last stage that failed the same way ``review_after`` times (ledger outcomes)."""
    if not last_job or not rejects:
        return []
    from airflow_provider_fable.hooks.ledger import open_ledger

    ledger = open_ledger(spec["ledger_conn_id"], spec["fable_conn_id"], log)
    try:
        return review_candidates(ledger, last_job, rejects, id_column=spec["id_column"],
                                 limit=spec["guardrails"].review_after)  # fmt: skip
    finally:
        ledger.engine.dispose()


def review_candidates(
    ledger: Any, job_id: str, rejects: list[dict[str, Any]], *, id_column: str, limit: int
) -> list[dict[str, Any]]:
    """The rejects whose record the job rejected ``limit`` or more times for the same reason.

    Counted on the ledger's outcome rows (one per record and batch, so one per attempt), which
    outlive the destination's tables. Each reject gets its count as ``attempts``. When the ledger
    has a ``needs_review`` status (``Ledger.mark_needs_review``), the records are marked there too,
    so no submit sends them again automatically.
    """
    import sqlalchemy as sa

    ledger.ensure_schema()
    o = ledger.outcomes.c
    ids = [r[id_column] for r in rejects]
    counts: dict[tuple[str, str], int] = {}
    with ledger.engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            q = (
                sa.select(o.record_id, o.reason, sa.func.count())
                .where(
                    o.job_id == job_id, o.status == "rejected", o.record_id.in_(ids[start : start + _CHUNK])
                )
                .group_by(o.record_id, o.reason)
            )
            for rid, reason, n in conn.execute(q):
                counts[(rid, reason or "")] = int(n)
    out = []
    for r in rejects:
        r["attempts"] = counts.get((r[id_column], r["reason"]), 0)
        if r["attempts"] >= limit:
            out.append(r)
    marker = getattr(ledger, "mark_needs_review", None)
    if out and callable(marker):  # the ledger's own status (the core marks it on load as well)
        marker(job_id, [r[id_column] for r in out], review_after=limit)
    return out


def _write_final(engine: Any, spec: Mapping[str, Any], final: Any, rows: list[dict[str, Any]],
                 rejects: list[dict[str, Any]], review: list[dict[str, Any]], now: str, run_id: str) -> None:  # fmt: skip
    """Replace the pass's records in the final, rejects and review tables (one transaction)."""
    import sqlalchemy as sa

    from airflow_provider_fable.backlog import selection as sel

    meta = sa.MetaData()
    rej = sel.rejects_table(meta, spec["rejects_table"], spec["id_column"])
    rev = sel.review_table(meta, spec["review_table"], spec["id_column"])
    idc = spec["id_column"]
    answered = [r[idc] for r in rows]
    failed = [r[idc] for r in rejects]
    with engine.begin() as conn:
        for start in range(0, len(answered), _CHUNK):
            part = answered[start : start + _CHUNK]
            for table in (final, rej, rev):
                conn.execute(table.delete().where(table.c[idc].in_(part)))
        for start in range(0, len(rows), _CHUNK):
            conn.execute(final.insert(), rows[start : start + _CHUNK])
        for start in range(0, len(failed), _CHUNK):
            part = failed[start : start + _CHUNK]
            conn.execute(final.delete().where(final.c[idc].in_(part)))
            conn.execute(rej.delete().where(rej.c[idc].in_(part)))
        cols = {c.name for c in rej.columns}
        if rejects:
            conn.execute(rej.insert(), [{k: v for k, v in r.items() if k in cols} for r in rejects])
        if review:
            conn.execute(rev.delete().where(rev.c[idc].in_([r[idc] for r in review])))
            conn.execute(rev.insert(), [
                {idc: r[idc], "_stage": r["_stage"], "_model": r["_model"], "reason": r["reason"],
                 "attempts": r.get("attempts"), "_run_id": run_id, "_since": now}
                for r in review
            ])  # fmt: skip


def _write_parquet(
    spec: Mapping[str, Any], final: Any, rows: list[dict[str, Any]], pass_name: str, run_id: str
) -> None:
    """The pass's final rows as one Parquet file (``Destination.parquet``; ``{run_id}``/``{pass}`` expand)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(spec["destination"].parquet).format(
        run_id=run_id.replace(":", "_").replace("+", "_"), pass_name=pass_name
    )
    pq.write_table(pa.Table.from_pylist(rows), path)


def _check(spec: Mapping[str, Any], context: Any, summary: dict[str, Any], sa: Any) -> None:
    """The run's guardrails on its final outcome; a breach fails the task without retries."""
    from airflow_provider_fable.core.guardrails import GuardrailError, check_guardrails
    from airflow_provider_fable.retries import not_retried

    g = spec["guardrails"]
    selected = _xcom(context, _tid(spec, "select")) or {}
    rate = g.failed_max_reject_rate if selected.get("mode") == "failed" else g.max_reject_rate
    breaches = check_guardrails(
        summary, max_share=g.max_share, min_share=g.min_share, max_reject_rate=rate,
        min_accepted=g.min_accepted, fail_when_all_rejected=False,
    )  # fmt: skip
    summary["guardrails"] = [b.message for b in breaches]
    if breaches:
        context["ti"].xcom_push(key="summary", value=summary)
        raise not_retried(
            GuardrailError(
                f"{len(breaches)} guardrail(s) breached: "
                + "; ".join(b.message for b in breaches)
                + f". The rows are written ({spec['table']}, rejects in {spec['rejects_table']})"
            )
        )


# ------------------------------------------------------------------ projection / approval
def projection(
    spec: Mapping[str, Any], context: Any, *, full_records: int, pilot: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The full pass's cost per stage: requests x cost per request.

    Requests: the full pass's records for the first stage; later stages by the escalation rate
    the pilot measured (else every record, an upper bound). Cost per request: what the pilot
    paid per request of that stage, else the mean of earlier answers in the stage table, else
    an upper bound (max_tokens out, 4 characters a token in, nothing cached).
    """
    prices = _prices(spec)
    engine = _engine(spec["destination"].conn_id)
    stages_out, total, requests = [], 0.0, float(full_records)
    try:
        for i, stage in enumerate(spec["stages"]):
            basis_rate = "all records"
            if i > 0:
                if pilot and pilot["records"][i - 1]:
                    m = pilot["records"][i - 1]
                    rate = pilot["records"][i] / m
                    # The pilot is a sample: say how far its rate may be off (95 %, normal approx.).
                    margin = 1.96 * (rate * (1 - rate) / m) ** 0.5
                    basis_rate = f"pilot escalation rate {rate:.3f} ± {margin:.3f}"
                else:
                    rate = 1.0
                    basis_rate = "no pilot: every record (upper bound)"
                requests *= rate
            if pilot and pilot["records"][i] and pilot["costs"][i] is not None:
                unit: float | None = pilot["costs"][i] / pilot["records"][i]
                basis = f"pilot: ${pilot['costs'][i]:.6f} for {pilot['records'][i]} request(s)"
            else:
                unit, basis = measured_request_cost(engine, spec, i, prices)
                if unit is None:
                    unit, basis = upper_bound_request_cost(spec, i, None, prices), "upper bound (max_tokens)"
            cost = None if unit is None else round(requests * unit, 6)
            total += cost or 0.0
            stages_out.append({
                "stage": spec["stage_names"][i], "model": stage.model, "requests": round(requests, 1),
                "cost_per_request_usd": unit, "projected_cost_usd": cost, "basis": f"{basis}; {basis_rate}",
            })  # fmt: skip
    finally:
        engine.dispose()
    lines = ["| stage | model | requests | $/request | projected $ | basis |", "|---|---|---|---|---|---|"]
    for s in stages_out:
        per_text = "?" if s["cost_per_request_usd"] is None else f"{s['cost_per_request_usd']:.6f}"
        cost_text = "?" if s["projected_cost_usd"] is None else f"{s['projected_cost_usd']:.4f}"
        lines.append(
            f"| {s['stage']} | {s['model']} | {s['requests']:g} | {per_text} | {cost_text} | {s['basis']} |"
        )
    lines.append(f"\n**Full run: {full_records} record(s), projected ${total:.4f}**")
    return {
        "stages": stages_out,
        "projected_cost_usd": round(total, 6),
        "records": full_records,
        "markdown": "\n".join(lines),
    }


def project(spec: dict[str, Any], context: Any) -> dict[str, Any]:
    """The full pass's projected cost per stage from the pilot (or earlier runs), as markdown for the approval."""
    import sqlalchemy as sa

    from airflow_provider_fable.backlog import selection as sel

    selected = _xcom(context, _tid(spec, "select")) or {}
    run_id = str(context["run_id"])
    n = len(spec["stages"])
    engine = _engine(spec["destination"].conn_id)
    try:
        counts = [
            sel.count_work(engine, _tables(spec), run_id=run_id, pass_name="pilot", stage=i) for i in range(n)
        ]
        sample_rows: list[dict[str, Any]] = []
        if counts[0]:
            with engine.connect() as conn:
                sample_rows = [dict(r) for r in conn.execute(
                    sa.text(f'SELECT * FROM "{spec["qa_table"]}" ORDER BY qa_rank LIMIT 10')
                ).mappings()] if sa.inspect(engine).has_table(spec["qa_table"]) else []  # fmt: skip
    finally:
        engine.dispose()
    costs = [_stage_cost(context, spec, "pilot", i) for i in range(n)]
    pilot = {"records": counts, "costs": costs} if counts[0] else None
    out = projection(spec, context, full_records=int(selected.get("full") or 0), pilot=pilot)
    spent = round(sum(costs), 6)
    if spec.get("chunking") is not None:  # chunking (backlog/chunked.py): the section requests too
        from airflow_provider_fable.backlog import chunked

        spent = round(spent + chunked.project_sections(spec, context, out), 6)
    budget = _float(context["params"].get("budget_usd"))
    out["pilot_cost_usd"] = spent
    out["pilot"] = pilot
    out["budget_left_usd"] = None if budget is None else round(max(0.0, budget - spent), 6)
    finals = _xcom(context, _tid(spec, "pilot_finalize")) or {}
    md = [f"## Backlog {spec['backlog_id']}: pilot of {counts[0]} record(s) cost ${spent:.4f}",
          f"Pilot outcome: {finals.get('accepted', 0)} answered ({finals.get('by_stage', {})}), "
          f"{finals.get('rejected', 0)} without an answer; escalated {finals.get('escalated', {})}.", "",
          out["markdown"]]  # fmt: skip
    if budget is not None:
        md.append(f"Budget left after the pilot: ${out['budget_left_usd']:.4f} (of ${budget:.4f})")
    if sample_rows:
        cols = [c for c in sample_rows[0] if c not in ("qa_rank", "_sampled_at", "_batch_id")]
        md += ["", f"### QA sample ({len(sample_rows)} of the pilot's answers, table {spec['qa_table']})",
               "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
        for r in sample_rows:
            md.append(
                "| "
                + " | ".join(str(r.get(c, ""))[:80].replace("|", "/").replace("\n", " ") for c in cols)
                + " |"
            )
    out["markdown"] = "\n".join(md)
    log.info("%s", out["markdown"])
    return out


def gate(spec: dict[str, Any], context: Any, *, approve: str, no_approval: str) -> list[str]:
    """Branch: ask for approval, go straight on, or stop an estimate_only run."""
    params = context["params"]
    if params.get("estimate_only"):
        log.info("estimate_only: stopping before the full run; nothing is paid for")
        return []
    projected = _xcom(context, _tid(spec, "project")) or {}
    if params.get("approval") == "ask" and projected.get("pilot"):
        return [approve]
    return [no_approval]


def gate_no_pilot(spec: dict[str, Any], context: Any) -> bool:
    """Short-circuit: False stops an estimate_only run before anything is paid for."""
    return not context["params"].get("estimate_only")

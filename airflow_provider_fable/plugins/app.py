"""The Backlogs pages: a FastAPI app mounted by the plugin on Airflow's API server (``/fable``).

Why server-rendered HTML with inline SVG charts: the page must work with no internet and nothing
to build, and everything it shows is a few aggregates; no script or style is fetched from
anywhere (the only script is a few lines inline, for the rerun button).

Security: every route depends on Airflow's own ``requires_access_dag`` (the JWT in the session
cookie Airflow's UI sets, or a bearer token), so an anonymous request gets 401/403 and a user sees
only the DAGs the auth manager lets them read; starting a rerun needs the right to create runs of
that DAG (``POST`` on ``DagAccessEntity.RUN``), and a header a cross-site form cannot send.

Where the ledger is: ``[fable] ledger_conn_id`` (``AIRFLOW__FABLE__LEDGER_CONN_ID``), else the
``ledger_conn_id`` extra of the ``fable_default`` connection (``[fable] conn_id`` to name another),
the same connection the operators use. With neither, the operators use an embedded SQLite file
on each worker, which the API server cannot read: the page says so and how to fix it.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from airflow_provider_fable.core.ledger import Ledger
from airflow_provider_fable.core.report import STATUSES, Report, ReportError

ACTION_HEADER = "X-Fable-Action"
_engines: dict[str, Any] = {}
_reports: dict[str, Report] = {}
_lock = threading.Lock()


# ---------------------------------------------------------------------- ledger and destinations
def ledger_conn_id() -> str | None:
    """The ledger's connection id as the operators resolve it (config, then the fable connection)."""
    from airflow.configuration import conf

    configured = conf.get("fable", "ledger_conn_id", fallback=None)
    if configured:
        return configured
    fable_conn_id = conf.get("fable", "conn_id", fallback="fable_default")
    try:
        from airflow.models.connection import Connection

        conn = Connection.get_connection_from_secrets(fable_conn_id)
    except Exception:  # noqa: BLE001 - no fable connection: no shared ledger configured
        return None
    return (conn.extra_dejson or {}).get("ledger_conn_id") or None


def _engine(conn_id: str) -> Any:
    """One pooled engine per connection for the life of the API server (pages stay fast)."""
    with _lock:
        engine = _engines.get(conn_id)
        if engine is None:
            from airflow.models.connection import Connection

            hook = Connection.get_connection_from_secrets(conn_id).get_hook()
            engine = _engines[conn_id] = hook.get_sqlalchemy_engine()
        return engine


def _report(conn_id: str) -> Report:
    with _lock:
        report = _reports.get(conn_id)
    if report is None:
        report = Report(Ledger(_engine(conn_id))).ensure_schema()
        with _lock:
            _reports[conn_id] = report
    return report


# ---------------------------------------------------------------------- app
def create_app() -> FastAPI:
    app = FastAPI(title="Fable backlogs", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(requires_access_dag("GET"))])
    def jobs_page(request: Request, user: GetUserDep) -> HTMLResponse:
        conn_id = ledger_conn_id()
        if not conn_id:
            return HTMLResponse(_page("Backlogs", _no_shared_ledger()))
        rows = _visible_jobs(conn_id, user)
        return HTMLResponse(_page("Backlogs", _jobs_html(rows, conn_id)))

    @app.get("/api/jobs", dependencies=[Depends(requires_access_dag("GET"))])
    def jobs_json(user: GetUserDep) -> JSONResponse:
        conn_id = ledger_conn_id()
        if not conn_id:
            raise HTTPException(409, "no shared ledger configured (see the Backlogs page)")
        return JSONResponse(_visible_jobs(conn_id, user))

    @app.get(
        "/dags/{dag_id}/jobs/{job_id}",
        response_class=HTMLResponse,
        dependencies=[Depends(requires_access_dag("GET"))],
    )
    def job_page(dag_id: str, job_id: str) -> HTMLResponse:
        conn_id = ledger_conn_id()
        if not conn_id:
            return HTMLResponse(_page("Backlog", _no_shared_ledger()))
        data = _job_data(conn_id, dag_id, job_id)
        return HTMLResponse(_page(f"Backlog {job_id[:12]}", _job_html(data)))

    @app.get("/api/dags/{dag_id}/jobs/{job_id}", dependencies=[Depends(requires_access_dag("GET"))])
    def job_json(dag_id: str, job_id: str) -> JSONResponse:
        conn_id = ledger_conn_id()
        if not conn_id:
            raise HTTPException(409, "no shared ledger configured (see the Backlogs page)")
        return JSONResponse(json.loads(json.dumps(_job_data(conn_id, dag_id, job_id), default=str)))

    @app.post(
        "/dags/{dag_id}/jobs/{job_id}/rerun",
        dependencies=[Depends(requires_access_dag("POST", DagAccessEntity.RUN))],
    )
    def rerun(dag_id: str, job_id: str, request: Request, user: GetUserDep) -> JSONResponse:
        if request.headers.get(ACTION_HEADER) != "rerun":
            raise HTTPException(403, f"missing {ACTION_HEADER} header (start reruns from the Backlogs page)")
        conn_id = ledger_conn_id()
        if not conn_id:
            raise HTTPException(409, "no shared ledger configured")
        _job_data(conn_id, dag_id, job_id, light=True)  # 404 unless the job belongs to the DAG
        return JSONResponse(_trigger_rerun(dag_id, user))

    return app


def _visible_jobs(conn_id: str, user: Any) -> list[dict[str, Any]]:
    from airflow.api_fastapi.app import get_auth_manager

    allowed = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
    return [r for r in _report(conn_id).jobs(fast=True) if r.get("dag_id") in allowed]


def _job_data(conn_id: str, dag_id: str, job_id: str, *, light: bool = False) -> dict[str, Any]:
    report = _report(conn_id)
    try:
        full_id = report.resolve_job(job_id)
    except ReportError as exc:
        raise HTTPException(404, str(exc)) from None
    status = report.status(full_id)
    if status["dag_id"] != dag_id:
        raise HTTPException(404, f"job {job_id!r} was not submitted by DAG {dag_id!r}")
    if light:
        return status
    status["reject_reasons"] = report.reject_reasons(full_id, examples=3)
    status["distribution"] = report.distribution(full_id)
    status["review"] = report.review(full_id, limit=50)
    _add_destination_details(status)
    return status


def _add_destination_details(status: dict[str, Any]) -> None:
    """Reject details of the example records and the QA sample, read from the destination."""
    status["qa_sample"], status["qa_table"] = [], None
    loads = [x for x in status["loads"] if x.get("destination_conn_id") and x.get("destination")]
    if not loads:
        return
    last = loads[-1]
    try:
        engine = _engine(last["destination_conn_id"])
        names = set(sa.inspect(engine).get_table_names())
        with engine.connect() as conn:
            rejects = last.get("rejects_table")
            examples = [e for r in status["reject_reasons"] for e in r.get("examples", [])]
            if rejects in names and examples:
                t = sa.table(rejects, sa.column("record_id"), sa.column("detail"), sa.column("rejected_at"))
                details = {
                    rid: detail
                    for rid, detail in conn.execute(
                        sa.select(t.c.record_id, t.c.detail)
                        .where(t.c.record_id.in_(examples))
                        .order_by(t.c.rejected_at)
                    )
                }
                for reason in status["reject_reasons"]:
                    reason["examples"] = [
                        {"record_id": rid, "detail": details.get(rid)} for rid in reason.get("examples", [])
                    ]
            qa = last.get("qa_table")
            if qa in names:
                q = sa.select(sa.text("*")).select_from(sa.table(qa)).order_by(sa.text("qa_rank")).limit(25)
                rows = conn.execute(q).mappings()
                status["qa_sample"], status["qa_table"] = [dict(r) for r in rows], qa
    except Exception as exc:  # noqa: BLE001 - the ledger part of the page still shows
        status["destination_error"] = f"{type(exc).__name__}: {exc}"


def _trigger_rerun(dag_id: str, user: Any) -> dict[str, Any]:
    """A manual run of the DAG with ``mode=failed`` (the example DAGs' rerun Param)."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.utils.types import DagRunTriggeredByType

    run_id = f"fable_rerun__{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}"
    try:
        dr = trigger_dag(
            dag_id,
            triggered_by=DagRunTriggeredByType.UI,
            triggering_user_name=user.get_name(),
            run_id=run_id,
            conf={"mode": "failed"},
            note="failed-records rerun started from the Backlogs page",
        )
    except Exception as exc:  # noqa: BLE001 - e.g. a DAG whose params refuse mode=failed
        raise HTTPException(400, f"could not start the rerun: {exc}") from None
    return {"dag_id": dag_id, "run_id": getattr(dr, "run_id", run_id), "conf": {"mode": "failed"}}


# ---------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#1f2933;font-size:14px}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;margin:4px 0 12px}th,td{padding:4px 8px;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}
th{background:#f5f7fa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
a{color:#0b69a3}.muted{color:#7b8794}.box{border:1px solid #e4e7eb;border-radius:6px;padding:10px 14px;margin:8px 0;background:#fff}
.warn{background:#fffbea;border-color:#f0b429}.grid{display:flex;flex-wrap:wrap;gap:16px}
.kpi{min-width:120px}.kpi b{display:block;font-size:20px}code{background:#f5f7fa;padding:1px 4px;border-radius:3px}
button{background:#0b69a3;color:#fff;border:0;border-radius:4px;padding:6px 12px;cursor:pointer}
"""
_COLORS = {
    "pending": "#9aa5b1",
    "submitted": "#47a3f3",
    "accepted": "#3ebd93",
    "rejected": "#ef4e4e",
    "needs_review": "#f7c948",
    "superseded": "#cbd2d9",
}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _money(value: Any) -> str:
    return "–" if value is None else f"${value:,.4f}"


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _no_shared_ledger() -> str:
    return (
        "<h1>Backlogs</h1><div class='box warn' id='no-shared-ledger'><b>No shared ledger is configured, so "
        "there is nothing this page can read.</b><p>Without one, every worker keeps its backlog state in "
        "an embedded SQLite file (<code>$AIRFLOW_HOME/fable_ledger.db</code>) on its own disk: the API "
        "server cannot read the workers' files, and on Celery or Kubernetes each worker has its own, so "
        "exactly-once does not hold across workers either.</p><p>Configure a shared one: create an Airflow "
        "SQL connection to a PostgreSQL database (e.g. <code>fable_ledger</code>) and set it as the "
        "<code>ledger_conn_id</code> extra of the <code>fable_default</code> connection "
        '(<code>{"ledger_conn_id": "fable_ledger"}</code>), or set <code>[fable] ledger_conn_id</code> '
        "(<code>AIRFLOW__FABLE__LEDGER_CONN_ID</code>). The operators and this page then use it.</p></div>"
    )


def _jobs_html(rows: Sequence[dict[str, Any]], conn_id: str) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("DAG", "stage", "model", "job", *(s.replace("_", " ") for s in STATUSES), "estimated",
                  "cost", "last activity")
    )  # fmt: skip
    body = []
    for r in rows:
        c = r["counts"]
        link = f"dags/{_e(r['dag_id'])}/jobs/{_e(r['job_id'])}"
        cells = "".join(f"<td class='n' data-status='{s}'>{c.get(s, 0):,}</td>" for s in STATUSES)
        body.append(
            f"<tr data-job='{_e(r['job_id'])}'><td>{_e(r['dag_id'])}</td><td>{_e(r['stage'])}</td>"
            f"<td>{_e(r['model'])}</td><td><a href='{link}'><code>{_e(r['job_id'][:12])}</code></a></td>{cells}"
            f"<td class='n' data-cost='estimated'>{_money(r['estimated_cost_usd'])}</td>"
            f"<td class='n' data-cost='actual'>{_money(r['cost_usd'])}</td><td>{_e(r['last_activity'])}</td></tr>"
        )
    if not body:
        body.append(f"<tr><td colspan='{len(STATUSES) + 7}' class='muted'>No jobs you may see yet.</td></tr>")
    return (
        f"<h1>Backlogs</h1><p class='muted'>Ledger: connection <code>{_e(conn_id)}</code> · "
        f"{len(rows)} job(s)</p><table id='jobs'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _bar_chart(items: Sequence[tuple[str, int]], *, color: str = "#47a3f3", width: int = 420) -> str:
    """Horizontal bars as inline SVG (no script, no internet)."""
    if not items:
        return "<p class='muted'>No values.</p>"
    top = max(v for _, v in items) or 1
    total = sum(v for _, v in items) or 1
    row, label_w = 22, 150
    bars = []
    for i, (label, value) in enumerate(items):
        w = int((width - label_w - 90) * value / top)
        y = i * row
        bars.append(
            f"<text x='{label_w - 6}' y='{y + 15}' text-anchor='end' font-size='12'>{_e(label[:24])}</text>"
            f"<rect x='{label_w}' y='{y + 4}' width='{max(w, 1)}' height='14' fill='{color}'/>"
            f"<text x='{label_w + w + 6}' y='{y + 15}' font-size='12'>{value:,} ({100 * value / total:.0f}%)</text>"
        )
    return f"<svg width='{width}' height='{row * len(items) + 4}' role='img'>{''.join(bars)}</svg>"


def _progress(counts: dict[str, int], width: int = 640) -> str:
    total = sum(counts.get(s, 0) for s in (*STATUSES, "superseded")) or 1
    x, parts = 0.0, []
    for s in (*STATUSES, "superseded"):
        w = width * counts.get(s, 0) / total
        if w:
            parts.append(f"<rect x='{x:.1f}' y='0' width='{w:.1f}' height='18' fill='{_COLORS[s]}'><title>{s}: "
                         f"{counts.get(s, 0):,}</title></rect>")  # fmt: skip
        x += w
    return f"<svg width='{width}' height='18' role='img'>{''.join(parts)}</svg>"


def _cost_chart(loads: Sequence[dict[str, Any]], estimate: float | None, width: int = 480) -> str:
    """Cumulative actual cost after each load, with the estimate as a dashed line."""
    points, total = [("start", 0.0)], 0.0
    for load in loads:
        total += load.get("cost_usd") or 0.0
        points.append((load["at"], total))
    if len(points) == 1:
        return "<p class='muted'>No load recorded yet.</p>"
    top = max([total, estimate or 0.0]) or 1.0
    h, pad = 120, 10
    step = (width - 2 * pad) / max(len(points) - 1, 1)
    xy = [(pad + i * step, h - pad - (h - 2 * pad) * v / top) for i, (_, v) in enumerate(points)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(
        f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='#0b69a3'><title>{_e(at)}: ${v:.4f}</title></circle>"
        for (x, y), (at, v) in zip(xy, points, strict=True)
    )
    est = ""
    if estimate:
        y = h - pad - (h - 2 * pad) * estimate / top
        est = (f"<line x1='{pad}' x2='{width - pad}' y1='{y:.1f}' y2='{y:.1f}' stroke='#f0b429' "
               f"stroke-dasharray='4 3'/><text x='{width - pad}' y='{y - 3:.1f}' text-anchor='end' "
               f"font-size='11'>estimate {_money(estimate)}</text>")  # fmt: skip
    return (
        f"<svg width='{width}' height='{h}' role='img'>{est}<polyline points='{line}' fill='none' "
        f"stroke='#0b69a3' stroke-width='2'/>{dots}</svg>"
    )


def _table(rows: Iterable[dict[str, Any]], columns: Sequence[str], table_id: str) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_short(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(value: Any, n: int = 160) -> Any:
    return value[: n - 1] + "…" if isinstance(value, str) and len(value) > n else value


def _job_html(d: dict[str, Any]) -> str:
    from airflow_provider_fable.links import console_url

    c = d["counts"]
    kpis = "".join(
        f"<div class='kpi'><span class='muted'>{s.replace('_', ' ')}</span><b id='count-{s}'>{c.get(s, 0):,}</b></div>"
        for s in (*STATUSES, "superseded", "total")
    )
    costs = (
        f"<div class='kpi'><span class='muted'>estimated</span><b id='cost-estimated'>"
        f"{_money(d['estimated_cost_usd'])}</b></div><div class='kpi'><span class='muted'>actual</span>"
        f"<b id='cost-actual'>{_money(d['cost_usd'])}</b></div>"
    )
    batches = []
    for b in d["batches"]:
        link = (
            f"<a href='{_e(console_url([b['batch_id']]))}' target='_blank' rel='noopener'>console</a>"
            if b["batch_id"]
            else ""
        )
        bc = b["counts"]
        batches.append(
            f"<tr><td>{_e(b['stage'])}</td><td><code>{_e(b['batch_id'])}</code> {link}</td><td>{_e(b['state'])}</td>"
            f"<td>{_e(b['run_id'])}</td><td class='n'>{b['request_count']:,}</td>"
            + "".join(f"<td class='n'>{bc.get(s, 0):,}</td>" for s in STATUSES)
            + f"<td>{_progress(bc, 160)}</td></tr>"
        )
    bhead = "".join(f"<th>{h}</th>" for h in ("stage", "batch", "state", "run", "requests", *STATUSES, ""))
    reasons = []
    for i, r in enumerate(d["reject_reasons"][:10]):
        ex = "".join(
            f"<div><code>{_e(e['record_id'] if isinstance(e, dict) else e)}</code> "
            f"<span class='muted'>{_e(_short(e.get('detail'), 120) if isinstance(e, dict) else '')}</span></div>"
            for e in r.get("examples", [])
        )
        rid = " id='top-reason'" if i == 0 else ""
        reasons.append(
            f"<tr><td{rid}>{_e(r['reason'])}</td><td class='n'>{r['count']:,}</td><td>{ex}</td></tr>"
        )
    dist = (
        "".join(
            f"<div><h3 style='font-size:13px;margin:6px 0'>{_e(field)}</h3>"
            f"{_bar_chart(sorted(values.items(), key=lambda kv: -kv[1])[:12])}</div>"
            for field, values in sorted(d["distribution"].items())
        )
        or "<p class='muted'>No enum or bool fields counted yet.</p>"
    )
    qa = d.get("qa_sample") or []
    qa_html = (
        _table(qa, [k for k in qa[0] if k not in ("_sampled_at",)], "qa")
        if qa
        else "<p class='muted'>No QA sample.</p>"
    )
    review = d.get("review") or []
    review_html = (
        _table(review, ("record_id", "reason", "batch_id", "updated_at"), "review")
        if review
        else "<p class='muted' id='review-empty'>No record needs review.</p>"
    )
    dest_err = (
        f"<div class='box warn'>Destination not readable: {_e(d['destination_error'])}</div>"
        if d.get("destination_error")
        else ""
    )
    rerun = (
        f"<button id='rerun' data-url='{_e(d['job_id'])}/rerun'>Rerun failed records</button> "
        "<span id='rerun-result' class='muted'></span>"
        "<script>document.getElementById('rerun').onclick=async function(){"
        "const r=await fetch(this.dataset.url,{method:'POST',credentials:'same-origin',"
        f"headers:{{'{ACTION_HEADER}':'rerun'}}}});const t=await r.json();"
        "document.getElementById('rerun-result').textContent=r.ok?('started run '+t.run_id):"
        "('refused: '+(t.detail||r.status));};</script>"
    )
    return (
        f"<p><a href='../../../'>← Backlogs</a></p><h1>Backlog <code>{_e(d['job_id'][:16])}</code></h1>"
        f"<p class='muted'>DAG <b>{_e(d['dag_id'])}</b> · stage <b>{_e(d['stage'])}</b> · model "
        f"<b>{_e(d['model'])}</b> · created {_e(d['created_at'])}"
        + (f" · reruns job <code>{_e(d['parent_job'][:12])}</code>" if d.get("parent_job") else "")
        + f"</p>{dest_err}<div class='box'><div class='grid'>{kpis}{costs}</div>{_progress(c)}</div>"
        f"<div class='box'>{rerun}</div>"
        f"<h2>Progress per stage and batch</h2><table id='batches'><thead><tr>{bhead}</tr></thead>"
        f"<tbody>{''.join(batches)}</tbody></table>"
        f"<h2>Top reject reasons</h2><table id='reasons'><thead><tr><th>reason</th><th>records</th>"
        f"<th>examples</th></tr></thead><tbody>{''.join(reasons)}</tbody></table>"
        f"<h2>Distributions</h2><div class='grid'>{dist}</div>"
        f"<h2>Cost over time</h2>{_cost_chart(d['loads'], d['estimated_cost_usd'])}"
        f"<h2>QA sample{(' (' + _e(d['qa_table']) + ')') if d.get('qa_table') else ''}</h2>{qa_html}"
        f"<h2>Records needing review</h2>{review_html}"
    )

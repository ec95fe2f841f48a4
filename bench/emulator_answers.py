"""Benchmark: how plausible the emulator's answers are on the bundled datasets of every example DAG.

Not a speed figure: a quality one. Each example DAG's own request is built (its prompt template,
system prompt, few-shot turns and output model, through ``core.requests`` as the submit operator
builds it) for every record of its bundled dataset, answered by the emulator's model, and the
answer is compared with the label the dataset's generator intended:

- ``support_ticket_triage`` on support_tickets.csv: ``category``/``priority``/``escalate`` vs the
  ``expected_*`` columns (2,400 tickets);
- ``crm_lead_enrichment`` on crm_leads.csv: ``industry``/``company_size``/``persona`` vs the hand
  labels in crm_leads_labels.csv (every 12th lead, 200); ``evidence`` quoted share on all leads;
- ``cancellation_reason_cleanup`` on cancellation_reasons.csv: ``label`` vs ``expected_reason``
  (6,000 rows); ``other`` share; ``justification`` within its description-only maxLength;
- ``document_summaries`` section stage on documents.jsonl: the generator puts risks under
  risk/liability headings and undecided points under "Open ..." headings, so a section's intended
  answer is "has risks" / "has open questions" exactly when its heading says so; agreement is the
  share of sections where ``risks`` (``open_questions``) is non-empty exactly then, and
  ``item_precision`` the share of listed items taken from such a section's sentences.

For every dataset: ``agreement`` (mean over its labelled fields), the ``unknown``/``other`` share
of its enum answers, and ``conf_corr``, the Pearson correlation between the answer's confidence
field (when the schema has one) and whether the answer was right (point-biserial).

The baseline is the previous emulator: ``airflow_provider_fable/emulator/model.py`` as committed
on ``--baseline-ref`` (default ``main``), loaded from git in the same run. ``vs_baseline`` =
ours/baseline agreement, averaged over the four datasets. Description-only constraint breaks are
off (rate 0) for agreement; the separate ``break_rate`` line counts them at the default rate.

Run: ``.venv/bin/python bench/emulator_answers.py`` (``--baseline-ref REF``, ``--limit N`` rows per
dataset for a quick look).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_PATH = "airflow_provider_fable/emulator/model.py"
FALLBACKS = {"unknown", "other"}


def _load_dag(dag_id: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{dag_id}", ROOT / "dags" / f"{dag_id}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return _prompt_files(module, dag_id)


def _prompt_files(module: Any, dag_id: str) -> Any:
    """The prompt files beside the DAG (``example_data.example_prompts``), as the module constants
    these checks read, plus the unit's section split."""
    from airflow_provider_fable.core.chunking import split_text
    from airflow_provider_fable.example_data import example_prompts

    prompts = example_prompts(ROOT / "dags", dag_id)
    module.PROMPT_TEMPLATE, module.SYSTEM_PROMPT = prompts["template"], prompts["system"]
    module.FEW_SHOT = prompts["few_shot"]
    module.SECTION_TEMPLATE, module.SECTION_SYSTEM = prompts["section_template"], prompts["section_system"]
    module.split_sections = split_text
    return module


def _baseline_model(ref: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{ref}:{MODEL_PATH}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType("_baseline_emulator_model")
    module.__file__ = f"<{ref}:{MODEL_PATH}>"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _requests(dag: types.ModuleType, template: str, system: str, few_shot: Any, output_model: Any,
              records: Iterable[dict[str, Any]], id_field: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:  # fmt: skip
    from airflow_provider_fable.core.job import BatchJob
    from airflow_provider_fable.core.requests import base_params, build_request, prefix_messages

    job = BatchJob(
        prompt_template=template, output_model=output_model, id_field=id_field, system_prompt=system,
        few_shot_examples=few_shot or [], on_missing_field="empty",
    )  # fmt: skip
    shared, prefix = base_params(job), prefix_messages(job)
    return [(r, build_request(job, r, shared=shared, prefix=prefix)) for r in records]


def _answer(model: types.ModuleType, request: dict[str, Any], break_rate: float = 0.0) -> Any:
    kwargs: dict[str, Any] = {"id_seed": request["custom_id"], "description_break_rate": break_rate}
    if break_rate and "invented_quote_rate" in model.build_answer.__code__.co_varnames:
        kwargs["invented_quote_rate"] = break_rate  # the previous emulator had no such setting
    answer = model.build_answer(request["params"], **kwargs)
    text = next(b["text"] for b in answer.content if b.get("type") == "text")
    return json.loads(text)


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if not sxx or not syy:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


class Dataset:
    """One DAG's requests and how to score an answer against the intended labels."""

    def __init__(self, name: str, items: list[tuple[dict[str, Any], dict[str, Any]]],
                 fields: dict[str, Callable[[dict[str, Any], Any], bool]], enum_fields: tuple[str, ...] = (),
                 extra: Callable[[list[tuple[dict[str, Any], Any]]], dict[str, float]] | None = None) -> None:  # fmt: skip
        self.name, self.items, self.fields, self.enum_fields, self.extra = (
            name,
            items,
            fields,
            enum_fields,
            extra,
        )

    def score(self, model: types.ModuleType) -> dict[str, Any]:
        right: Counter[str] = Counter()
        fallback = enums = 0
        conf, correct = [], []
        answered = []
        for record, request in self.items:
            value = _answer(model, request)
            answered.append((record, value))
            ok_all = True
            for field, check in self.fields.items():
                ok = check(record, value)
                right[field] += ok
                ok_all &= ok
            for field in self.enum_fields:
                enums += 1
                fallback += str(value.get(field)) in FALLBACKS
            if isinstance(value.get("confidence"), (int, float)):
                conf.append(float(value["confidence"]))
                correct.append(1.0 if ok_all else 0.0)
        n = len(self.items)
        per_field = {f: right[f] / n for f in self.fields}
        out: dict[str, Any] = {
            "n": n,
            "agreement": sum(per_field.values()) / len(per_field),
            "fields": per_field,
            "fallback_share": fallback / enums if enums else None,
            "conf_corr": _pearson(conf, correct),
        }
        if self.extra:
            out.update(self.extra(answered))
        return out


def _tickets(limit: int | None) -> Dataset:
    from airflow_provider_fable import example_data as ex

    dag = _load_dag("support_ticket_triage")
    rows = list(ex.iter_dataset("support_tickets"))[:limit]
    items = _requests(
        dag, dag.PROMPT_TEMPLATE, dag.SYSTEM_PROMPT, dag.FEW_SHOT, dag.TicketTriage, rows, "ticket_id"
    )
    return Dataset(
        "tickets",
        items,
        {
            "category": lambda r, a: a.get("category") == r["expected_category"],
            "priority": lambda r, a: a.get("priority") == r["expected_priority"],
            "escalate": lambda r, a: str(a.get("escalate")).lower() == r["expected_escalate"].lower(),
        },
    )


def _crm(limit: int | None) -> tuple[Dataset, Callable[[types.ModuleType], float]]:
    from airflow_provider_fable import example_data as ex

    dag = _load_dag("crm_lead_enrichment")
    labels = {r["lead_id"]: r for r in ex.iter_dataset("crm_leads_labels")}
    leads = list(ex.iter_dataset("crm_leads"))
    labelled = [r for r in leads if r["lead_id"] in labels][:limit]
    items = _requests(
        dag, dag.PROMPT_TEMPLATE, dag.SYSTEM_PROMPT, dag.FEW_SHOT, dag.LeadEnrichment, labelled, "lead_id"
    )

    def same(field: str) -> Callable[[dict[str, Any], Any], bool]:
        return lambda r, a: a.get(field) == labels[r["lead_id"]][field]

    fields = {f: same(f) for f in dag.ENRICHED_FIELDS}
    everyone = _requests(dag, dag.PROMPT_TEMPLATE, dag.SYSTEM_PROMPT, dag.FEW_SHOT, dag.LeadEnrichment,
                         leads[: limit or None], "lead_id")  # fmt: skip

    def quoted_share(model: types.ModuleType) -> float:
        """Share of all leads whose evidence passes the DAG's verbatim-quote invariant, at the
        default rates (2 % description breaks, 2 % invented quotes)."""
        ok = sum(
            dag.evidence_is_quoted(_answer(model, req, 0.02).get("evidence"), rec) for rec, req in everyone
        )
        return ok / len(everyone)

    return Dataset("crm", items, fields, enum_fields=tuple(dag.ENRICHED_FIELDS)), quoted_share


def _cancellations(limit: int | None) -> Dataset:
    from airflow_provider_fable import example_data as ex

    dag = _load_dag("cancellation_reason_cleanup")
    rows = list(ex.iter_dataset("cancellation_reasons"))[:limit]
    few = [{"record": f["record"], "answer": f["answer"]} for f in dag.FEW_SHOT]
    items = _requests(
        dag, dag.PROMPT_TEMPLATE, dag.SYSTEM_PROMPT, few, dag.CancellationReason, rows, "cancellation_id"
    )

    def extra(answered: list[tuple[dict[str, Any], Any]]) -> dict[str, float]:
        labels = Counter(a.get("label") for _, a in answered)
        just = [a.get("justification") for _, a in answered if isinstance(a.get("justification"), str)]
        valid = 0
        for _, a in answered:
            try:
                dag.CancellationReason.model_validate(a)
                valid += 1
            except ValueError:  # pydantic's ValidationError is a ValueError
                pass
        return {
            "other_share": labels.get("other", 0) / len(answered),
            "not_stated_share": labels.get("not_stated", 0) / len(answered),
            "justification_over_200": sum(len(j) > 200 for j in just) / max(1, len(just)),
            "valid_share": valid / len(answered),
        }

    return Dataset(
        "cancellations",
        items,
        {"label": lambda r, a: a.get("label") == r["expected_reason"]},
        enum_fields=("label",),
        extra=extra,
    )


_RISK_HEADING = re.compile(r"risk|liabilit", re.IGNORECASE)
_OPEN_HEADING = re.compile(r"\bopen\b", re.IGNORECASE)


def _documents(limit: int | None) -> Dataset:
    from airflow_provider_fable import example_data as ex

    dag = _load_dag("document_summaries")
    records = []
    for doc in list(ex.iter_dataset("documents"))[: limit and max(1, limit // 10)]:
        sections = dag.split_sections(doc["body"], 500)
        for n, (heading, text) in enumerate(sections, 1):
            records.append({
                "section_id": f"{doc['doc_id']}-s{n:03d}", "text": text, "body": text, "title": doc["title"],
                "doc_type": doc["doc_type"], "section_index": n, "section_count": len(sections),
                "_heading": heading or text.split("\n", 1)[0],
            })  # fmt: skip
    items = _requests(
        dag, dag.SECTION_TEMPLATE, dag.SECTION_SYSTEM, [], dag.SectionSummary, records, "section_id"
    )

    def has(field: str, pattern: re.Pattern[str]) -> Callable[[dict[str, Any], Any], bool]:
        return lambda r, a: bool(a.get(field)) == bool(pattern.search(r["_heading"]))

    def extra(answered: list[tuple[dict[str, Any], Any]]) -> dict[str, float]:
        hits = total = 0
        for record, a in answered:
            for field, pattern in (("risks", _RISK_HEADING), ("open_questions", _OPEN_HEADING)):
                for item in a.get(field) or []:
                    total += 1
                    hits += bool(pattern.search(record["_heading"])) and item[:40] in record["text"]
        return {"item_precision": hits / total if total else 0.0}

    return Dataset(
        "documents",
        items,
        {"risks": has("risks", _RISK_HEADING), "open_questions": has("open_questions", _OPEN_HEADING)},
        extra=extra,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-ref", default="main", help="git ref of the previous model.py")
    parser.add_argument("--limit", type=int, default=None, help="rows per dataset (quick look)")
    args = parser.parse_args(argv)

    from airflow_provider_fable.emulator import model as ours

    baseline = _baseline_model(args.baseline_ref)
    started = time.perf_counter()
    crm, quoted_share = _crm(args.limit)
    datasets = [_tickets(args.limit), crm, _cancellations(args.limit), _documents(args.limit)]
    ratios = []
    summary: dict[str, str] = {}
    for ds in datasets:
        got = {"ours": ds.score(ours), "baseline": ds.score(baseline)}
        for who, res in got.items():
            fields = " ".join(f"{k}={v:.3f}" for k, v in res["fields"].items())
            rest = " ".join(f"{k}={_fmt(v)}" for k, v in res.items() if k not in ("fields", "agreement", "n"))
            print(f"{ds.name:13s} {who:8s} n={res['n']} agreement={res['agreement']:.3f} {fields} {rest}")
        ratio = (
            got["ours"]["agreement"] / got["baseline"]["agreement"] if got["baseline"]["agreement"] else 0.0
        )
        ratios.append(ratio)
        summary[ds.name] = f"{got['ours']['agreement']:.3f}/{got['baseline']['agreement']:.3f}"
        if ds.name in ("crm", "cancellations"):
            summary[f"{ds.name}_fallback"] = _fmt(got["ours"]["fallback_share"])
        if got["ours"]["conf_corr"] is not None:
            summary[f"{ds.name}_conf_corr"] = _fmt(got["ours"]["conf_corr"])
    summary["crm_quoted"] = f"{quoted_share(ours):.3f}/{quoted_share(baseline):.3f}"
    elapsed = time.perf_counter() - started
    print(f"(ours/baseline where two figures; {elapsed:.0f} s)")
    line = " ".join(f"{k}={v}" for k, v in summary.items())
    print(f"bench emulator_answers: {line} vs_baseline={sum(ratios) / len(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Guards for the datasets bundled with the three pattern DAGs (``airflow_provider_fable/example_data``).

Like the ticket CSV, they are generated: the drift test regenerates them in a fresh interpreter and
demands byte equality. The other tests pin what each DAG's technique relies on (weak evidence in the
CRM export, documents longer than one request, messy free text with near-duplicates), so a generator
change that removes the point of a pattern fails here. Nothing here imports Airflow.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_pattern_data.py"
DATA = ROOT / "airflow_provider_fable" / "example_data"
FILES = ("crm_leads.csv", "crm_leads_labels.csv", "documents.jsonl", "cancellation_reasons.csv")


def _csv(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _stamps(rows: list[dict[str, str]]) -> list[datetime]:
    return [datetime.strptime(r["created_at"], "%Y-%m-%dT%H:%M:%SZ") for r in rows]


@pytest.fixture(scope="module")
def leads() -> list[dict[str, str]]:
    return _csv("crm_leads.csv")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, str]]:
    with (DATA / "documents.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def reasons() -> list[dict[str, str]]:
    return _csv("cancellation_reasons.csv")


def test_committed_files_match_generator(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(tmp_path)], check=True, env=env, capture_output=True
    )
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"example_data/{name} is out of date: run `python scripts/generate_pattern_data.py`"
        )


def test_files_are_small_utf8_with_lf() -> None:
    total = 0
    for name in FILES:
        raw = (DATA / name).read_bytes()
        raw.decode("utf-8")
        assert b"\r\n" not in raw
        total += len(raw)
    assert total < 3_000_000  # the repository is cloned in CI


def test_files_ship_as_package_data() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"airflow_provider_fable.example_data" = ["*.csv", "*.jsonl"]' in text
    from airflow_provider_fable.example_data import DATASETS, dataset_path

    for name in DATASETS:
        assert dataset_path(name).is_file()
    with pytest.raises(FileNotFoundError, match="known datasets"):
        dataset_path("nope")


def test_crm_leads(leads: list[dict[str, str]]) -> None:
    assert len(leads) >= 2000
    assert len({r["lead_id"] for r in leads}) == len(leads)
    stamps = _stamps(leads)
    assert stamps == sorted(stamps) and (max(stamps) - min(stamps)).days >= 21  # several weeks
    empty_notes = sum(not r["notes"].strip() for r in leads)
    assert 0.05 * len(leads) < empty_notes < 0.3 * len(leads)
    assert sum(r["website_domain"] in ("gmail.com", "outlook.com", "yahoo.com") for r in leads) > 100
    values = [int(r["pipeline_value_usd"]) for r in leads]
    assert 0.05 * len(leads) < sum(v >= 50_000 for v in values) < 0.2 * len(leads)
    assert len({len(r["notes"]) // 20 for r in leads}) > 4  # notes of varying quality


def test_crm_labels(leads: list[dict[str, str]]) -> None:
    labels = _csv("crm_leads_labels.csv")
    ids = {r["lead_id"] for r in leads}
    assert 100 <= len(labels) <= 300 and {r["lead_id"] for r in labels} <= ids
    for field in ("industry", "company_size", "persona"):
        counts = Counter(r[field] for r in labels)
        assert counts["unknown"] > 5, field  # weak evidence is labelled unknown, not guessed
        assert len(counts) >= 4, field


def test_documents(docs: list[dict[str, str]]) -> None:
    assert len(docs) >= 200
    assert {d["doc_type"] for d in docs} >= {"policy", "incident_report", "contract"}
    lengths = sorted(len(d["body"]) for d in docs)
    assert lengths[0] < 2000
    assert sum(n > 24_000 for n in lengths) >= 10  # several longer than one request should carry
    for d in docs:
        assert re.fullmatch(r"DOC-\d{4}", d["doc_id"])
        assert "\n\n" in d["body"]  # paragraph boundaries to split on
    stamps = _stamps(docs)
    assert stamps == sorted(stamps)


def test_cancellation_reasons(reasons: list[dict[str, str]]) -> None:
    assert len(reasons) >= 5000
    texts = [r["reason_for_cancellation"] for r in reasons]
    normalised = Counter(" ".join(re.sub(r"[^\w]+", " ", t.lower()).split()) for t in texts)
    raw_variants: dict[str, set[str]] = {}
    for t in texts:
        raw_variants.setdefault(" ".join(re.sub(r"[^\w]+", " ", t.lower()).split()), set()).add(t)
    assert sum(len(v) > 1 for v in raw_variants.values()) > 50  # near-duplicates
    assert sum(t.strip().lower() in ("n/a", "na", "-", "", "none", ".", "x") for t in texts) > 100
    assert any("teuer" in t for t in texts) and any("cher" in t for t in texts)  # languages
    assert any("love paying more" in t for t in texts)  # sarcasm
    assert len(normalised) > 300
    labels = Counter(r["expected_reason"] for r in reasons)
    assert labels["too_expensive"] > labels["other"] > 0
    assert _stamps(reasons) == sorted(_stamps(reasons))

"""Guards for the bundled synthetic ticket backlog (``airflow_provider_fable/example_data/support_tickets.csv``).

The CSV is generated, not hand-edited: the drift test regenerates it with the script's defaults and
demands byte equality, so a changed generator without a regenerated CSV (or a hand-edited CSV) fails
here instead of silently skewing QA numbers. The remaining tests pin the properties the example DAG and
its QA comparison rely on. Nothing here imports Airflow.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_tickets.py"
DATASET = ROOT / "airflow_provider_fable" / "example_data" / "support_tickets.csv"

COLUMNS = [
    "ticket_id",
    "created_at",
    "channel",
    "customer_tier",
    "subject",
    "body",
    "expected_category",
    "expected_priority",
    "expected_escalate",
]
CATEGORIES = {"billing", "account_access", "bug", "feature_request", "shipping"}
PRIORITIES = {"low", "medium", "high", "urgent"}
CHANNELS = {"email", "chat", "web_form", "phone_transcript"}
TIERS = {"free", "pro", "enterprise"}
ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _load_generator() -> ModuleType:
    """Import ``scripts/generate_tickets.py`` by path: ``scripts/`` is not a package.

    The module must be registered in ``sys.modules`` before execution, otherwise ``dataclasses`` cannot
    resolve its postponed annotations.
    """
    spec = importlib.util.spec_from_file_location("generate_tickets", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return _load_generator()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with DATASET.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_committed_csv_matches_generator(tmp_path: Path) -> None:
    """Regenerate with default args in a fresh interpreter (different hash seed) and compare bytes."""
    out = tmp_path / "support_tickets.csv"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, env=env, capture_output=True)
    assert out.read_bytes() == DATASET.read_bytes(), (
        "airflow_provider_fable/example_data/support_tickets.csv is out of date: run `python scripts/generate_tickets.py`"
    )


def test_generation_is_deterministic_and_seed_sensitive(generator: ModuleType) -> None:
    first = generator.generate_tickets(count=120, seed=3)
    assert first == generator.generate_tickets(count=120, seed=3)
    assert first != generator.generate_tickets(count=120, seed=4)
    assert len(first) == 120


def test_file_format() -> None:
    raw = DATASET.read_bytes()
    assert b"\r" not in raw, "line endings must be \\n only"
    assert len(raw) < 2_000_000
    raw.decode("utf-8")  # must be valid UTF-8
    assert raw.split(b"\n", 1)[0].decode() == ",".join(COLUMNS)


def test_shape_and_values(rows: list[dict[str, str]]) -> None:
    assert len(rows) >= 2000
    assert list(rows[0]) == COLUMNS
    ids = [r["ticket_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(ID_RE.match(i) for i in ids)
    assert {r["channel"] for r in rows} == CHANNELS
    assert {r["customer_tier"] for r in rows} == TIERS
    assert {r["expected_category"] for r in rows} == CATEGORIES
    assert {r["expected_priority"] for r in rows} == PRIORITIES
    assert {r["expected_escalate"] for r in rows} == {"true", "false"}
    for r in rows:
        assert r["subject"].strip() and r["body"].strip(), r["ticket_id"]
        # A leftover brace means an unfilled template slot.
        assert not re.search(r"[{}]", r["subject"] + r["body"]), r["ticket_id"]


def test_created_at_spread_over_2026(rows: list[dict[str, str]]) -> None:
    stamps = [datetime.strptime(r["created_at"], "%Y-%m-%dT%H:%M:%SZ") for r in rows]
    assert all(s.year == 2026 for s in stamps)
    assert 80 <= (max(stamps) - min(stamps)).days <= 95
    assert stamps == sorted(stamps), "rows are in creation order"


def test_escalation_only_with_high_or_urgent(rows: list[dict[str, str]]) -> None:
    escalated = [r for r in rows if r["expected_escalate"] == "true"]
    assert escalated
    assert all(r["expected_priority"] in {"high", "urgent"} for r in escalated)
    # Escalation vocabulary never appears in a ticket labelled as not needing escalation.
    for r in rows:
        if re.search(r"lawyer|chargeback|data loss|outage", r["body"], re.IGNORECASE):
            assert r["expected_escalate"] == "true", r["ticket_id"]


def test_label_distribution_is_uneven(rows: list[dict[str, str]]) -> None:
    counts = Counter(r["expected_category"] for r in rows)
    ordered = [c for c, _ in counts.most_common()]
    assert ordered == ["bug", "billing", "account_access", "shipping", "feature_request"]
    assert counts["feature_request"] / len(rows) < 0.15


def test_near_misses_exist(rows: list[dict[str, str]]) -> None:
    def mentions(category: str, pattern: str) -> int:
        rx = re.compile(pattern, re.IGNORECASE)
        return sum(
            1
            for r in rows
            if r["expected_category"] == category and rx.search(r["subject"] + " " + r["body"])
        )

    assert mentions("account_access", r"\bcard\b|invoice") >= 10
    assert mentions("billing", r"password") >= 10
    assert mentions("feature_request", r"\bbug\b") >= 5
    assert mentions("shipping", r"express") >= 5
    assert mentions("bug", r"invoice") >= 3


def test_text_variety(rows: list[dict[str, str]]) -> None:
    bodies = [r["body"] for r in rows]
    lengths = sorted(len(b) for b in bodies)
    assert lengths[0] < 80 and lengths[-1] > 2000
    assert sum("Sent from my iPhone" in b for b in bodies) >= 10
    assert sum(bool(re.search(r"[ÀłøäöüéñçşğŁÉ]", b)) for b in bodies) >= 50
    assert len(set(bodies)) >= 0.98 * len(bodies)  # a few exact duplicates, as in a real queue

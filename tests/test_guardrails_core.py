"""Pure-core guardrails: prices, sampling, estimate and budget, guardrail checks, QA sample."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import sqlalchemy as sa

from airflow_provider_fable.core.cost import (
    DEFAULT_PRICES,
    Price,
    UnknownPriceError,
    merge_prices,
    parse_prices,
    price_for,
    usage_cost_usd,
)
from airflow_provider_fable.core.estimate import BudgetExceededError, check_budget, estimate_run
from airflow_provider_fable.core.guardrails import check_config, check_guardrails, format_summary
from airflow_provider_fable.core.job import DEFAULT_MODEL
from airflow_provider_fable.core.qa import select_qa_rows, write_qa_sample
from airflow_provider_fable.core.results import Usage
from airflow_provider_fable.core.sampling import BottomK, sample
from airflow_provider_fable.core.sinks import ResultSink
from airflow_provider_fable.core.validation import Accepted
from tests.conftest import Paint

TICKETS = Path(__file__).resolve().parents[1] / "airflow_provider_fable" / "example_data" / "support_tickets.csv"


def ticket_ids() -> list[str]:
    with TICKETS.open(newline="", encoding="utf-8") as fh:
        return [row["ticket_id"] for row in csv.DictReader(fh)]


# -- prices -----------------------------------------------------------------------------------
def test_fable_5_is_the_default_model_and_has_a_price():
    assert DEFAULT_MODEL == "claude-fable-5"
    price = price_for("claude-fable-5")
    assert (price.input_per_mtok, price.output_per_mtok) == (10.0, 50.0)
    assert (price.cache_write_5m_per_mtok, price.cache_write_1h_per_mtok, price.cache_read_per_mtok) == (
        12.5,
        20.0,
        1.0,
    )
    # Longest prefix wins: 5.1 is its own row (cheaper cache reads), dated ids find their family.
    assert price_for("claude-fable-5-1").cache_read_per_mtok == 0.25
    assert price_for("claude-haiku-4-5-20251001") is DEFAULT_PRICES["claude-haiku-4-5"]
    assert price_for("gpt-4o") is None


def test_cache_writes_are_charged_at_their_ttl_rate_and_batches_half_price():
    one_hour = Usage(cache_creation_input_tokens=1_000_000, cache_creation_1h_input_tokens=1_000_000)
    five_min = Usage(cache_creation_input_tokens=1_000_000)
    assert usage_cost_usd(one_hour, "claude-fable-5") == pytest.approx(10.0)  # $20 x 0.5
    assert usage_cost_usd(five_min, "claude-fable-5") == pytest.approx(6.25)  # $12.50 x 0.5
    assert usage_cost_usd(five_min, "claude-fable-5", batch=False) == pytest.approx(12.5)
    assert usage_cost_usd(Usage(input_tokens=10), "no-such-model") is None  # unknown, never $0


def test_price_overrides_from_connection_and_operator():
    table = merge_prices(
        '{"claude-fable-5": [1, 2]}', {"my-model": {"input": 4, "output": 8, "cache_read": 0}}
    )
    assert table["claude-fable-5"] == Price(1.0, 2.0)
    assert table["my-model"].cache_read_per_mtok == 0
    assert table["my-model"].cache_write_1h_per_mtok == 8.0  # default 2x input
    assert table["claude-opus-4-5"] is DEFAULT_PRICES["claude-opus-4-5"]
    with pytest.raises(ValueError, match="needs 'input' and 'output'"):
        parse_prices({"m": {"input": 1}})


# -- sampling ---------------------------------------------------------------------------------
def test_pilot_sample_of_200_from_2400_tickets_covers_every_decile():
    ids = ticket_ids()
    assert len(ids) == 2400
    picked, seen = sample(iter(ids), 200, seed=0, key=lambda x: x)
    assert seen == 2400 and len(picked) == 200 == len(set(picked))
    order = sorted(ids)
    deciles = {order.index(i) * 10 // len(order) for i in picked}
    assert deciles == set(range(10))
    assert picked == [i for i in ids if i in set(picked)]  # source order kept
    # Same seed, any source order: the same records. Another seed: another sample.
    assert set(sample(reversed(ids), 200, seed=0, key=lambda x: x)[0]) == set(picked)
    assert set(sample(iter(ids), 200, seed=1, key=lambda x: x)[0]) != set(picked)


def test_bottom_k_holds_only_k_items():
    chooser: BottomK[int] = BottomK(5, seed="s")
    for i in range(10_000):
        chooser.offer(i, i)
        assert len(chooser) <= 5
    assert chooser.seen == 10_000 and len(chooser.items()) == 5


# -- estimate and budget ---------------------------------------------------------------------
def test_estimate_extrapolates_cache_and_uses_max_tokens_as_upper_bound():
    est = estimate_run(
        model="claude-fable-5",
        requests=1000,
        batches=1,
        sample_counts=[1300, 1400],
        prefix_tokens=1100,
        max_tokens=400,
    )
    assert est.cached and est.cache_write_tokens == 1100 and est.cache_read_tokens == 1100 * 999
    assert est.input_tokens == 1350 * 1000 - 1100 * 1000
    assert est.output_tokens == 400_000 and est.output_basis == "max_tokens"
    expected = (250_000 * 10 + 1100 * 20 + 1100 * 999 * 1 + 400_000 * 50) / 1e6 * 0.5
    assert est.cost_usd == pytest.approx(expected)
    assert "upper bound" in est.describe() and "sample of 2" in est.describe()


def test_prefix_under_the_minimum_is_not_cached():
    est = estimate_run(
        model="claude-haiku-4-5",
        requests=10,
        batches=1,
        sample_counts=[2000],
        prefix_tokens=1500,
        max_tokens=10,
    )
    assert not est.cached and est.input_tokens == 20_000
    assert any("minimum cacheable" in n for n in est.notes)


def test_budget_cap_refuses_over_budget_and_unpriced_runs():
    kwargs = dict(requests=100, batches=1, sample_counts=[500], prefix_tokens=0, max_tokens=100)
    est = estimate_run(model="claude-fable-5", **kwargs)
    check_budget(est, None)
    check_budget(est, est.cost_usd)
    with pytest.raises(BudgetExceededError, match=r"estimated cost \$0\.5000 .* over max_cost_usd=\$0\.1000"):
        check_budget(est, 0.1)
    unknown = estimate_run(model="acme-llm", **kwargs)
    assert unknown.cost_usd is None
    check_budget(unknown, None)  # no cap: the unknown cost is reported, not refused
    with pytest.raises(UnknownPriceError, match="model 'acme-llm' has no known price"):
        check_budget(unknown, 1000.0)


# -- guardrails -------------------------------------------------------------------------------
SUMMARY = {
    "records": 100,
    "accepted": 80,
    "rejected": 20,
    "reject_reasons": {"schema": 20},
    "distribution": {"color": {"red": 60, "blue": 20}, "glossy": {"False": 80}},
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 90},
    "cost_usd": 1.0,
    "estimated_cost_usd": 1.05,
}


def test_guardrail_messages_name_field_value_share_and_limit():
    breaches = check_guardrails(
        SUMMARY,
        max_share={"color": {"red": 0.5}},
        min_share={"color": {"green": 0.05}},
        max_reject_rate=0.1,
        min_accepted=90,
    )
    messages = [b.message for b in breaches]
    assert "color='red' share 75.0% (60/80 accepted) > max_share 50.0%" in messages
    assert "color='green' share 0.0% (0/80 accepted) < min_share 5.0%" in messages
    assert "reject rate 20.0% (20/100) > max_reject_rate 10.0%" in messages
    assert "accepted 80 < min_accepted 90" in messages
    assert check_guardrails(SUMMARY, max_share={"color": {"red": 0.75}, "glossy": {False: 1.0}}) == []


def test_all_rejected_fails_by_default():
    dead = {"records": 5, "accepted": 0, "rejected": 5}
    assert [b.rule for b in check_guardrails(dead)] == ["all_rejected"]
    assert check_guardrails(dead, fail_when_all_rejected=False) == []
    assert check_guardrails({"records": 0, "accepted": 0, "rejected": 0}) == []


def test_guardrail_config_typos_fail_up_front():
    fields = {"color": ["red", "green", "blue"], "glossy": ["True", "False"]}
    with pytest.raises(ValueError, match="'colour' is not an enum or boolean field"):
        check_config(max_share={"colour": {"red": 0.5}}, min_share=None, fields=fields)
    with pytest.raises(ValueError, match="'pink' is not a value of color"):
        check_config(max_share={"color": {"pink": 0.5}}, min_share=None, fields=fields)
    with pytest.raises(ValueError, match="share in 0..1"):
        check_config(max_share=None, min_share={"color": {"red": 15}}, fields=fields)


def test_summary_block_reads_like_a_report():
    block = format_summary({**SUMMARY, "cache_hit_share": 0.9, "qa_table": "paint_qa", "qa_rows": 3})
    assert "accepted 80, rejected 20 (20.0%)" in block
    assert "color: red 60 (75%), blue 20 (25%)" in block
    assert "actual $1.0000 vs estimate $1.0500 (estimate 5.0% above actual)" in block
    assert "cache hit share 90.0%" in block and "3 rows in paint_qa" in block
    # An estimate below the actual says so in words too (a bare sign read the wrong way round).
    under = format_summary({**SUMMARY, "cost_usd": 2.0, "estimated_cost_usd": 1.5})
    assert "actual $2.0000 vs estimate $1.5000 (estimate 25.0% below actual)" in under


# -- QA sample --------------------------------------------------------------------------------
def test_qa_sample_is_spread_seeded_and_carries_excerpts(sqlite_engine):
    ids = ticket_ids()
    rows = [{"id": i, "n": n} for n, i in enumerate(ids)]
    chosen = select_qa_rows(rows, id_column="id", size=50, seed=0)
    assert {r["n"] * 10 // len(ids) for r in chosen} == set(range(10))
    assert chosen == select_qa_rows(list(reversed(rows)), id_column="id", size=50, seed=0)

    sink = ResultSink(sqlite_engine, table="paint", id_column="paint_id", output_model=Paint)
    sink.ensure_tables()
    answers = [
        Accepted(f"p{i}", {"color": "red", "glossy": False, "coats": 1, "note": "n"}, Usage())
        for i in range(30)
    ]
    sink.write_accepted(answers[:20], batch_id="b1", model="m")
    sink.write_accepted(answers[20:], batch_id="b0", model="m")  # another load's rows: never sampled
    name, n = write_qa_sample(
        sqlite_engine,
        table=sink.table,
        id_column="paint_id",
        batch_ids=["b1"],
        size=5,
        excerpts={"p3": "the input"},
    )
    assert (name, n) == ("paint_qa", 5)
    with sqlite_engine.connect() as conn:
        qa = conn.execute(sa.text("SELECT paint_id, source_excerpt, color, _batch_id FROM paint_qa")).all()
    assert len(qa) == 5 and {r._batch_id for r in qa} == {"b1"}
    expected = [
        r["paint_id"]
        for r in select_qa_rows(
            [{"paint_id": f"p{i}"} for i in range(20)], id_column="paint_id", size=5, seed=0
        )
    ]
    assert [r.paint_id for r in qa] == expected
    assert all((r.source_excerpt == "the input") == (r.paint_id == "p3") for r in qa)
    # A second load replaces the sample rather than mixing old and new rows.
    write_qa_sample(sqlite_engine, table=sink.table, id_column="paint_id", batch_ids=["b1"], size=2)
    with sqlite_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM paint_qa")).scalar_one() == 2


def test_qa_sample_on_postgres(pg_engine):
    sink = ResultSink(pg_engine, table="paint", id_column="paint_id", output_model=Paint)
    sink.ensure_tables()
    answers = [
        Accepted(f"p{i}", {"color": "blue", "glossy": True, "coats": 2, "note": "n"}, Usage())
        for i in range(12)
    ]
    sink.write_accepted(answers, batch_id="b1", model="m")
    for size in (5, 3):  # recreated, not appended
        name, n = write_qa_sample(
            pg_engine, table=sink.table, id_column="paint_id", batch_ids=["b1"], size=size
        )
    with pg_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT paint_id, glossy, coats FROM paint_qa ORDER BY qa_rank")).all()
    assert (name, n, len(rows)) == ("paint_qa", 3, 3)
    assert all(r.glossy is True and r.coats == 2 for r in rows)

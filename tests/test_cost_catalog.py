"""Issue #21 (4): the model catalog is current, every model is priced with a source, legacy models
are said so once per task, and the emulator accepts every model the catalog says is served."""

from __future__ import annotations

import re

import anthropic
import pytest

from airflow_provider_fable.core.cost import (
    CONTEXT_WINDOWS,
    DEFAULT_PRICES,
    MODEL_CATALOG,
    context_window,
    legacy_notice,
    model_info,
    price_for,
    served_models,
)
from airflow_provider_fable.core.job import DEFAULT_MODEL
from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings
from airflow_provider_fable.testing.plugin import point_connection_at
from tests.test_ledger import context, dbs, submit_op  # noqa: F401 - dbs is a fixture

OFFICIAL = "https://platform.claude.com/docs/"


def test_every_catalog_model_is_priced_with_a_source_and_a_date():
    assert set(MODEL_CATALOG) == set(DEFAULT_PRICES)
    for name, info in MODEL_CATALOG.items():
        assert info.status in ("current", "legacy", "retired"), name
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", info.checked), (name, info.checked)
        assert info.source, name
        # A figure not read on an official page is a placeholder, and says where it came from.
        if DEFAULT_PRICES[name].placeholder:
            assert "third-party" in info.source, name
        else:
            assert OFFICIAL in info.source, name
        if info.successor is not None:
            assert MODEL_CATALOG[info.successor].status == "current", name


def test_published_prices_of_the_current_models():
    fable, opus, sonnet = (price_for(m) for m in ("claude-fable-5-1", "claude-opus-5-5", "claude-sonnet-5-5"))
    rates = lambda p: (  # noqa: E731
        p.input_per_mtok,
        p.cache_write_5m_per_mtok,
        p.cache_write_1h_per_mtok,
        p.cache_read_per_mtok,
        p.output_per_mtok,
    )
    assert rates(fable) == (10.0, 12.5, 20.0, 0.25, 50.0)  # cache reads a quarter of Fable 5's
    assert rates(opus) == (4.0, 5.0, 8.0, 0.2, 20.0)
    assert rates(sonnet) == (2.0, 2.5, 4.0, 0.2, 10.0)
    assert not (fable.placeholder or opus.placeholder or sonnet.placeholder)
    assert price_for("claude-fable-5").cache_read_per_mtok == 1.0


def test_the_default_stays_fable_5_and_is_marked_legacy_with_its_successor():
    assert DEFAULT_MODEL == "claude-fable-5"  # changing it would change every job's fingerprint
    assert model_info(DEFAULT_MODEL).status == "legacy"
    notice = legacy_notice(DEFAULT_MODEL)
    assert notice is not None and "legacy" in notice and "claude-fable-5-1" in notice
    assert "\n" not in notice  # one line
    for current in ("claude-fable-5-1", "claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5"):
        assert model_info(current).status == "current"
        assert legacy_notice(current) is None
    assert "retired" in legacy_notice("claude-3-haiku-20240307")
    assert legacy_notice("my-fine-tune") is None  # unknown: nothing said


def test_a_dated_id_stays_on_its_own_model():
    # claude-fable-5-2 (Fable 5.2) is a prefix of a dated Fable 5 id; matching ends at a separator.
    assert price_for("claude-fable-5-20260609") is DEFAULT_PRICES["claude-fable-5"]
    assert model_info("claude-fable-5-20260609").status == "legacy"
    assert price_for("claude-fable-5-2-20261109") is DEFAULT_PRICES["claude-fable-5-2"]
    assert price_for("claude-haiku-4-5-20251001") is DEFAULT_PRICES["claude-haiku-4-5"]


def test_context_windows_are_the_documented_ones():
    for model in served_models():
        assert context_window(model) is not None, model
    for model in (
        "claude-fable-5",
        "claude-fable-5-1",
        "claude-opus-5-5",
        "claude-sonnet-5-5",
        "claude-opus-4-6",
    ):
        assert context_window(model) == 1_000_000, model
    for model in ("claude-haiku-4-5-20251001", "claude-sonnet-4-5", "claude-opus-4-5", "claude-3-haiku"):
        assert context_window(model) == 200_000, model
    assert set(CONTEXT_WINDOWS.values()) == {200_000, 1_000_000}


def test_the_emulator_accepts_every_served_model_and_refuses_retired_ones():
    with EmulatorServer(EmulatorSettings()) as server:
        sdk = anthropic.Anthropic(api_key=server.settings.api_key or "test-key", base_url=server.base_url)
        params = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
        for model in served_models():
            assert sdk.messages.create(model=model, **params).model == model
        with pytest.raises(anthropic.NotFoundError):
            sdk.messages.create(model="claude-3-haiku", **params)


def test_a_legacy_model_is_said_once_per_task(fable_emulator_factory, dbs, capfd):  # noqa: F811
    server = fable_emulator_factory()
    point_connection_at(server)
    # The estimate counts tokens 7 times and the submit checks the model: one notice. (Airflow's
    # task loggers write to the console through structlog, not to pytest's log capture.)
    submit_op(model="claude-fable-5").execute(context())
    out = "".join(capfd.readouterr())
    notices = [line for line in out.splitlines() if "is a legacy model" in line]
    assert len(notices) == 1, notices
    assert "Model claude-fable-5 is a legacy model" in notices[0] and "claude-fable-5-1" in notices[0]

    submit_op(model="claude-fable-5-1").execute(context("manual__2"))
    out = "".join(capfd.readouterr())
    assert "Submitting 7 requests for model claude-fable-5-1" in out
    assert "is a legacy model" not in out

"""Issue #21 (5): one exceptions module, one root class, every old import path still works and
``retryable`` means what it meant (fail-fast without Airflow's retries when False)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from airflow_provider_fable import exceptions
from airflow_provider_fable.exceptions import FableError

PACKAGE = Path(exceptions.__file__).parent

#: Where each class lived before ``exceptions.py``, and its ``retryable`` then.
OLD_HOMES = {
    "FableError": ("core.errors", True),
    "RecordError": ("core.errors", False),
    "JobSpecError": ("core.errors", False),
    "ReportError": ("core.report", True),
    "DatabaseUnavailableError": ("core.dbretry", True),
    "LedgerError": ("core.ledger", False),
    "ClaimLostError": ("core.ledger", True),
    "BudgetExceededError": ("core.estimate", False),
    "ResultLineError": ("core.results", True),
    "UnknownPriceError": ("core.cost", False),
    "PreflightError": ("core.preflight", False),
    "GuardrailError": ("core.guardrails", False),
    "ConnectionSetupError": ("triggers.poller", True),
    "BacklogConfigError": ("backlog.config", True),
    "FableConfigError": ("hooks.fable", True),
    "FableApiError": ("hooks.fable", True),
    "ResultsIncompleteError": ("hooks.fable", True),
    "UnknownModelError": ("hooks.fable", True),
    "BatchCreateUncertainError": ("hooks.fable", True),
}


@pytest.mark.parametrize("name", sorted(OLD_HOMES))
def test_every_old_import_path_gives_the_one_class(name):
    module, retryable = OLD_HOMES[name]
    old = getattr(importlib.import_module(f"airflow_provider_fable.{module}"), name)
    assert old is getattr(exceptions, name)
    assert issubclass(old, FableError)
    assert old.retryable is retryable
    assert name in exceptions.__all__


def test_every_exception_class_of_the_package_is_defined_in_exceptions_py():
    """A new module-level ``class XError(Exception)`` elsewhere would split the family again.

    (Classes local to a function, like the submit's test-only ``InjectedFault``, are not API.)
    """
    defined_elsewhere = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "emulator" or rel == Path("exceptions.py"):
            continue  # the emulator's ApiError is an HTTP answer of the fake API, not ours
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(b) for b in node.bases}
                if node.name.endswith("Error") or bases & {"Exception", "FableError", "ValueError"}:
                    defined_elsewhere.append(f"{rel}:{node.name}")
    assert defined_elsewhere == []
    assert set(exceptions.__all__) == set(OLD_HOMES)


def test_value_errors_stay_value_errors():
    from airflow_provider_fable.backlog import BacklogConfigError
    from airflow_provider_fable.core.errors import RecordError
    from airflow_provider_fable.core.results import ResultLineError, parse_result_line

    for cls in (BacklogConfigError, RecordError, ResultLineError):
        assert issubclass(cls, ValueError)
    with pytest.raises(ValueError):
        parse_result_line(b"{not json")
    with pytest.raises(FableError):
        parse_result_line(b"{not json")


def test_exceptions_module_imports_nothing_from_airflow():
    tree = ast.parse((PACKAGE / "exceptions.py").read_text(encoding="utf-8"))
    imported = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [ast.unparse(n) for n in imported] == ["from __future__ import annotations"]


def test_retryable_false_still_fails_fast_and_keeps_type_and_attributes():
    from airflow_provider_fable._compat import AirflowFailException
    from airflow_provider_fable.core.ledger import ClaimLostError, LedgerError
    from airflow_provider_fable.core.preflight import PreflightError
    from airflow_provider_fable.retries import fail_fast

    with pytest.raises(AirflowFailException) as info, fail_fast():
        raise PreflightError(["table t has no column answer"])
    assert isinstance(info.value, PreflightError) and isinstance(info.value, FableError)
    assert info.value.problems == ["table t has no column answer"]
    with pytest.raises(LedgerError) as info, fail_fast():
        raise LedgerError("ambiguous")
    assert isinstance(info.value, AirflowFailException)
    with pytest.raises(ClaimLostError) as info, fail_fast():  # retryable: Airflow retries it
        raise ClaimLostError("claim lost")
    assert not isinstance(info.value, AirflowFailException)

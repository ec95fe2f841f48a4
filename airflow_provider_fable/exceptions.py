"""Every exception the provider raises, under one root: :class:`FableError`.

One module so a user can see (and catch) the whole family in one place: ``except FableError``
catches anything this provider raises on purpose; the subclasses say which rule failed. The
classes used to live next to the code raising them (``core.errors``, ``core.ledger``,
``hooks.fable``, ...); each is still importable from its old module, which re-exports it from
here, so existing ``from airflow_provider_fable.core.ledger import LedgerError`` keeps working.

``retryable`` says whether running the same task again could succeed. API and network failures
can (the default); a bad record, a bad spec, a budget refusal or a guardrail breach cannot: the
same input meets the same rule. The operator shells fail a task whose error has
``retryable = False`` without Airflow's retries (``retries.fail_fast``, the one place that maps
it to ``AirflowFailException``), so nobody waits ``retries x retry_delay`` for a failure that was
certain on the first try.

This module imports nothing from Airflow (``core/`` imports it, and ``core/`` stays Airflow-free)
and nothing from the rest of the package. Each message says what went wrong *and* what to do
about it, because it ends up in the Airflow task log read by someone at 3 a.m.; none ever
carries the API key.
"""

from __future__ import annotations

__all__ = [
    "BacklogConfigError",
    "BatchCreateUncertainError",
    "BudgetExceededError",
    "ClaimLostError",
    "ConnectionSetupError",
    "DatabaseUnavailableError",
    "FableApiError",
    "FableConfigError",
    "FableError",
    "GuardrailError",
    "JobSpecError",
    "LedgerError",
    "PreflightError",
    "RecordError",
    "ReportError",
    "ResultLineError",
    "ResultsIncompleteError",
    "UnknownModelError",
    "UnknownPriceError",
]


class FableError(Exception):
    """Base class for every error raised by airflow_provider_fable.

    ``retryable`` says whether running the same task again could succeed (see the module
    docstring); ``True`` unless a subclass says otherwise.
    """

    retryable: bool = True


# ------------------------------------------------------------------------------- input and spec
class RecordError(FableError, ValueError):
    """A source record cannot become a request (missing id, bad template field, bad id)."""

    retryable = False

    def __init__(self, record_id: object, rule: str, message: str, position: int | None = None) -> None:
        self.record_id = record_id
        self.rule = rule
        self.message = message
        self.position = position
        where = f"record {record_id!r}" if record_id is not None else "record without id"
        if position is not None:
            where += f" (#{position} in the source)"
        super().__init__(f"{where}: [{rule}] {message}")

    def at(self, position: int) -> RecordError:
        """The same error, located in the source (callers iterating records know the position)."""
        return RecordError(self.record_id, self.rule, self.message, position)


class JobSpecError(FableError):
    """The BatchJob spec itself is unusable (bad template, output model, limits).

    Deliberately not a ValueError: pydantic would fold it into a generic ValidationError and
    the actionable message would be buried.
    """

    retryable = False


class BacklogConfigError(FableError, ValueError):
    """A backlog configuration that cannot work; raised while the DAG file is parsed.

    Still a ``ValueError`` (what it was before the root class existed), so callers catching that
    keep working.
    """


# ------------------------------------------------------------------------------ cost and limits
class UnknownPriceError(FableError):
    """The model has no known price; a budget cap can not be checked against an unknown cost."""

    retryable = False  # the same input meets the same rule: Airflow must not retry it


class BudgetExceededError(FableError):
    """The estimate of a run is above ``max_cost_usd``; nothing was created."""

    retryable = False  # the same input meets the same rule: Airflow must not retry it


class PreflightError(FableError):
    """The destination cannot take this job's answers; nothing has been submitted yet.

    Not retryable: the table stays as it is until someone changes it (an unreachable database
    raises the driver's own error instead, which Airflow retries).
    """

    retryable = False

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "pre-flight check failed before any batch was created (nothing was paid for):\n- "
            + "\n- ".join(problems)
        )


class GuardrailError(FableError):
    """A loaded result set broke one or more guardrails (the rows are loaded)."""

    retryable = False  # the same input meets the same rule: Airflow must not retry it


# ---------------------------------------------------------------------------- ledger and storage
class LedgerError(FableError):
    """The ledger cannot decide safely (e.g. an orphaned intent with ambiguous candidates)."""

    retryable = False  # the same input meets the same rule: Airflow must not retry it


class ClaimLostError(LedgerError):
    """The submit's per-job claim ended mid-run (a failover, a killed session): nothing more is
    created by this try, and a retry re-attaches to what exists, so this one is retried."""

    retryable = True


class DatabaseUnavailableError(FableError):
    """A database the task needs failed (after retries when the failure looked transient)."""


class ReportError(FableError):
    """A report question that cannot be answered (unknown or ambiguous job id)."""


# ---------------------------------------------------------------------------------- the API side
class FableConfigError(FableError):
    """The Airflow connection cannot produce a working client."""


class FableApiError(FableError):
    """An API call failed after the SDK's own retries."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        unknown_model: bool = False,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        #: The API answered that it does not know the request's model (see ``check_model``).
        self.unknown_model = unknown_model


class BatchCreateUncertainError(FableApiError):
    """A create failed in a way that does not tell whether the batch exists (and is billed)."""


class UnknownModelError(FableError):
    """The API does not know the model: nothing can succeed, so nothing is sent (or paid)."""


class ResultsIncompleteError(FableError):
    """The results download kept breaking off; what was read is kept, the rest must be re-read."""


class ResultLineError(FableError, ValueError):
    """A line of the results file is not a result object (truncated download, corruption).

    Still a ``ValueError`` (what it was before the root class existed).
    """


class ConnectionSetupError(FableError):
    """The connection could not be read or the client not built: no poll can work (final)."""

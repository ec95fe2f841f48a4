"""Exception types shared by the core and the Airflow shells.

Each one says what went wrong *and* what to do about it, because these messages end up in the
Airflow task log read by someone at 3 a.m. None of them ever carries the API key.
"""

from __future__ import annotations


class FableError(Exception):
    """Base class for every error raised by airflow_provider_fable.

    ``retryable`` says whether running the same task again could succeed. API and network
    failures can (the default); a bad record, a bad spec, a budget refusal or a guardrail breach
    cannot: the same input meets the same rule. The operator shells fail a task whose error has
    ``retryable = False`` without Airflow's retries (``retries.fail_fast``), so nobody waits
    ``retries x retry_delay`` for a failure that was certain on the first try.
    """

    retryable: bool = True


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

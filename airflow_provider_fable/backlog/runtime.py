"""What the ``Backlog`` unit's own tasks do at run time (imported only inside tasks).

Each function takes the unit's ``spec`` (plain values + the config objects), the task context and
its own arguments. Work on data is done here or in ``backlog.selection`` (pure SQLAlchemy), never
at parse time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def select(spec: dict[str, Any], context: Any) -> dict[str, Any]:
    """Decide the run mode and window; write the pilot sample and the full pass into the work table."""
    raise NotImplementedError


def stage_records(
    spec: dict[str, Any], run_id: str, pass_name: str, stage_index: int
) -> Iterator[dict[str, Any]]:
    """Source records of this run's pass and stage (work table rows joined to the source)."""
    raise NotImplementedError


def plan_escalation(
    spec: dict[str, Any], context: Any, *, pass_name: str, stage_index: int
) -> dict[str, Any]:
    """Which answers of stage ``stage_index`` go to the next stage, in priority order within the budget."""
    raise NotImplementedError


def finalize(spec: dict[str, Any], context: Any, *, pass_name: str) -> dict[str, Any]:
    """One final row per record of the pass; rejects with their last reason; needs_review; QA; guardrails."""
    raise NotImplementedError


def project(spec: dict[str, Any], context: Any) -> dict[str, Any]:
    """The full pass's projected cost per stage from the pilot (or earlier runs), as markdown for the approval."""
    raise NotImplementedError


def gate(spec: dict[str, Any], context: Any, *, approve: str, no_approval: str) -> list[str]:
    """Branch: ask for approval, go straight on, or stop an estimate_only run."""
    raise NotImplementedError


def gate_no_pilot(spec: dict[str, Any], context: Any) -> bool:
    """Short-circuit: False stops an estimate_only run before anything is paid for."""
    raise NotImplementedError

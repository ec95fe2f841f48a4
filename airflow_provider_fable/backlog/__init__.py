"""One declarative unit per backlog: source, prompt, stages with escalation, destination, guardrails.

``Backlog(...)`` builds, inside a ``with DAG(...)`` block, a TaskGroup made of the provider's
public operators (``FableBatchSubmitOperator``, ``FableBatchSensor``,
``FableValidateLoadOperator``, unchanged) plus a few small tasks of its own: selection by run
mode, escalation planning, the projection and human approval between pilot and full run, and the
final table. See docs/backlog.md.

Importing this package costs the standard library's dataclasses only; the operators are imported
when a ``Backlog`` is built and the core when a task runs (``bench/dag_parse.py``).
"""

from __future__ import annotations

from airflow_provider_fable.backlog.config import (
    RUN_MODES,
    BacklogConfigError,
    Chunking,
    Destination,
    Escalate,
    Guardrails,
    Prompt,
    Source,
    Stage,
)

__all__ = [
    "RUN_MODES",
    "Backlog",
    "BacklogConfigError",
    "Chunking",
    "Destination",
    "Escalate",
    "Guardrails",
    "Prompt",
    "Source",
    "Stage",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: Backlog pulls in the operators' modules
    if name == "Backlog":
        from airflow_provider_fable.backlog.unit import Backlog

        return Backlog
    raise AttributeError(name)

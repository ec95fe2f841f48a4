"""``airflow fable estimate <dag_id>``: the projected cost of a DAG run, nothing paid.

It needs the submit operator's estimate-only path (``estimate_only=``), which is not part of this
provider version yet; until it is, the command says so instead of guessing (running the DAG's
submit tasks for real would pay).
"""

from __future__ import annotations

from typing import Any


def run_estimate(args: Any) -> None:
    from airflow_provider_fable.operators.submit import FableBatchSubmitOperator

    if "estimate_only" not in FableBatchSubmitOperator.__init__.__code__.co_varnames:
        raise SystemExit(
            "error: `airflow fable estimate` needs FableBatchSubmitOperator(estimate_only=...), which this "
            "provider version does not have yet; set max_cost_usd on the submit task to cap a run instead"
        )
    raise SystemExit("error: `airflow fable estimate` is not wired to estimate_only yet")

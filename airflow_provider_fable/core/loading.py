"""Results -> validation -> sinks, in chunks, with running statistics for the task summary.

Kept out of the operator so the whole validate-and-load path can be tested and benchmarked
without Airflow: the operator only wires a hook's result stream and a database engine to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from airflow_provider_fable.core.cost import usage_cost_usd
from airflow_provider_fable.core.results import BatchResult, Usage
from airflow_provider_fable.core.sinks import ResultSink, resolve
from airflow_provider_fable.core.validation import Accepted, Rejected, validate_result


def distribution_fields(output_model: type[BaseModel]) -> list[str]:
    """Output fields whose values form a closed set (enums, booleans): worth a distribution."""
    schema = output_model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    return [
        name
        for name, prop in schema.get("properties", {}).items()
        if "enum" in (target := resolve(prop, defs)) or target.get("type") == "boolean"
    ]


@dataclass
class LoadStats:
    """Running totals over every batch loaded by one task."""

    accepted: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    distribution: dict[str, Counter[str]] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = 0.0
    #: Price table for the cost (default table when None; see core.cost.merge_prices).
    prices: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.accepted + self.rejected,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "reject_reasons": dict(self.reasons.most_common()),
            "distribution": {f: dict(c.most_common()) for f, c in self.distribution.items()},
            "usage": self.usage.as_dict(),
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 6),
        }


def load_batch(
    results: Iterable[BatchResult],
    *,
    batch_id: str,
    output_model: type[BaseModel],
    sink: ResultSink,
    stats: LoadStats,
    chunk_size: int = 1000,
) -> None:
    """Validate every result of one batch and write it, ``chunk_size`` rows per transaction."""
    fields = distribution_fields(output_model)
    for f in fields:
        stats.distribution.setdefault(f, Counter())
    accepted: list[Accepted] = []
    rejected: list[Rejected] = []
    batch_usage = Usage()
    model_name: str | None = None
    for result in results:
        model_name = model_name or result.model
        outcome = validate_result(result, output_model)
        batch_usage.add(outcome.usage)
        if isinstance(outcome, Accepted):
            accepted.append(outcome)
            stats.accepted += 1
            for f in fields:
                stats.distribution[f][str(outcome.data.get(f))] += 1
        else:
            rejected.append(outcome)
            stats.rejected += 1
            stats.reasons[outcome.reason] += 1
        if len(accepted) + len(rejected) >= chunk_size:
            sink.write_accepted(accepted, batch_id=batch_id, model=model_name)
            sink.write_rejected(rejected, batch_id=batch_id)
            accepted.clear()
            rejected.clear()
    sink.write_accepted(accepted, batch_id=batch_id, model=model_name)
    sink.write_rejected(rejected, batch_id=batch_id)
    stats.usage.add(batch_usage)
    cost = usage_cost_usd(batch_usage, model_name, prices=stats.prices) if model_name else 0.0
    stats.cost_usd = None if cost is None or stats.cost_usd is None else stats.cost_usd + cost

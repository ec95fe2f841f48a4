"""Cost from token usage, with Message Batches' 50 % discount.

Prices are USD per million tokens at standard (non-batch) rates, matched by model-name prefix;
cache writes cost 1.25x input (5-minute TTL) and cache reads 0.1x input. The table is a default:
pass your own ``prices`` when your contract differs or a model is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from airflow_provider_fable.core.results import Usage

BATCH_DISCOUNT = 0.5
CACHE_WRITE_MULTIPLIER = 1.25
CACHE_READ_MULTIPLIER = 0.1


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float


#: Longest matching prefix wins.
DEFAULT_PRICES: dict[str, Price] = {
    "claude-opus-4-5": Price(5.0, 25.0),
    "claude-opus-4": Price(15.0, 75.0),
    "claude-sonnet-4": Price(3.0, 15.0),
    "claude-3-7-sonnet": Price(3.0, 15.0),
    "claude-haiku-4": Price(1.0, 5.0),
    "claude-3-5-haiku": Price(0.8, 4.0),
    "claude-3-haiku": Price(0.25, 1.25),
}


def price_for(model: str, prices: dict[str, Price] | None = None) -> Price | None:
    table = prices or DEFAULT_PRICES
    matches = [p for p in table if model.startswith(p)]
    return table[max(matches, key=len)] if matches else None


def usage_cost_usd(
    usage: Usage, model: str, *, batch: bool = True, prices: dict[str, Price] | None = None
) -> float | None:
    """Dollar cost of ``usage`` on ``model``; None when the model has no known price."""
    price = price_for(model, prices)
    if price is None:
        return None
    per_in = price.input_per_mtok / 1e6
    per_out = price.output_per_mtok / 1e6
    total = (
        usage.input_tokens * per_in
        + usage.cache_creation_input_tokens * per_in * CACHE_WRITE_MULTIPLIER
        + usage.cache_read_input_tokens * per_in * CACHE_READ_MULTIPLIER
        + usage.output_tokens * per_out
    )
    return round(total * (BATCH_DISCOUNT if batch else 1.0), 6)

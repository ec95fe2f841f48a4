"""Cost estimate of a run before anything is paid for, and the budget check on it.

How the numbers are made (docs/cost.md has the long form):

- **Input**: the real ``count_tokens`` endpoint counts a seeded sample of the built requests;
  the per-request mean times the number of requests is the run's prompt tokens.
- **Cache**: the shared prefix (system prompt + few-shot turns) is counted once as the
  difference between a sampled request and the same request without the prefix. When it is at
  least the model's minimum cacheable size, each batch is assumed to write it once and every
  other request to read it; otherwise it is plain input.
- **Output**: the mean output tokens the ledger measured on earlier loads of the same job (any
  run: a pilot, a full run, an earlier stage's rerun), else ``max_tokens`` per request as an
  upper bound (and the estimate says so).
- **Later stages** of a multi-stage backlog: :func:`project_stages` scales each later stage's
  estimate by the share of answers expected to escalate to it (measured on the pilot).

The estimate is a plain dict in the submit manifest so the load can report estimate vs actual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_provider_fable.core.cost import Price, UnknownPriceError, price_for
from airflow_provider_fable.exceptions import BudgetExceededError as BudgetExceededError

OUTPUT_FROM_PILOT = "pilot"
OUTPUT_GIVEN = "given"
OUTPUT_MEASURED = "measured"
OUTPUT_UPPER_BOUND = "max_tokens"


@dataclass
class Estimate:
    """Extrapolated tokens and dollars for one run, with the basis of every number."""

    model: str
    requests: int
    batches: int
    sample_size: int
    avg_prompt_tokens: float
    prefix_tokens: int
    cached: bool
    cache_ttl: str
    input_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    output_tokens: int
    output_per_request: float
    output_basis: str
    output_basis_detail: str
    cost_usd: float | None
    price: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One log paragraph: the total first, then the basis of each part."""
        cost = "unknown (no price for this model)" if self.cost_usd is None else f"${self.cost_usd:,.4f}"
        lines = [
            f"Estimated cost of {self.requests} request(s) on {self.model} in {self.batches} batch(es): {cost}",
            f"  input : {self.input_tokens:,} tokens (mean prompt {self.avg_prompt_tokens:,.1f} tokens "
            f"from count_tokens on a seeded sample of {self.sample_size})",
            f"  cache : prefix {self.prefix_tokens:,} tokens, "
            + (
                f"written {self.cache_write_tokens:,} ({self.cache_ttl} TTL), read {self.cache_read_tokens:,}"
                if self.cached
                else "not cached"
            ),
            f"  output: {self.output_tokens:,} tokens ({self.output_per_request:,.1f}/request, "
            f"{self.output_basis_detail})",
        ]
        if self.price is not None:
            p = self.price
            lines.append(
                f"  prices: USD/MTok in {p['input_per_mtok']} out {p['output_per_mtok']} "
                f"cache write 5m {p['cache_write_5m_per_mtok']} 1h {p['cache_write_1h_per_mtok']} "
                f"read {p['cache_read_per_mtok']}, batch share {p['batch_discount']}"
                + (" (PLACEHOLDER price, unconfirmed)" if p.get("placeholder") else "")
            )
        lines.extend(f"  note  : {n}" for n in self.notes)
        return "\n".join(lines)


def estimate_run(
    *,
    model: str,
    requests: int,
    batches: int,
    sample_counts: list[int],
    prefix_tokens: int,
    max_tokens: int,
    cache_ttl: str = "1h",
    output_per_request: float | None = None,
    output_basis: str = OUTPUT_UPPER_BOUND,
    output_basis_detail: str | None = None,
    prices: dict[str, Price] | None = None,
) -> Estimate:
    """Extrapolate a sample of ``count_tokens`` results to the whole run and price it."""
    if requests and not sample_counts:
        raise ValueError("an estimate of a non-empty run needs at least one counted request")
    avg = sum(sample_counts) / len(sample_counts) if sample_counts else 0.0
    price = price_for(model, prices)
    notes: list[str] = []
    min_cache = price.min_cache_tokens if price is not None else 1024
    cached = prefix_tokens > 0 and prefix_tokens >= min_cache and requests > 0
    if prefix_tokens > 0 and not cached and requests:
        notes.append(
            f"the shared prefix ({prefix_tokens} tokens) is under the model's minimum cacheable "
            f"size ({min_cache}): it is billed as plain input on every request"
        )
    total_prompt = math.ceil(avg * requests)
    if cached:
        writes = min(batches, requests)
        cache_write = prefix_tokens * writes
        cache_read = prefix_tokens * (requests - writes)
        input_tokens = max(0, total_prompt - cache_write - cache_read)
        notes.append("assumes one cache write per batch and cache reads for every other request")
    else:
        cache_write = cache_read = 0
        input_tokens = total_prompt
    if output_per_request is None:
        output_per_request = float(max_tokens)
        output_basis = OUTPUT_UPPER_BOUND
    detail = output_basis_detail or {
        OUTPUT_UPPER_BOUND: f"upper bound: max_tokens={max_tokens} per request, no pilot measured yet",
        OUTPUT_FROM_PILOT: "mean measured on the pilot",
        OUTPUT_MEASURED: "mean measured on earlier loads of this job",
        OUTPUT_GIVEN: "given by output_tokens_per_request",
    }.get(output_basis, output_basis)
    output_tokens = math.ceil(output_per_request * requests)
    cost = None
    if price is not None:
        cost = (
            input_tokens * price.input_per_mtok
            + cache_write * price.cache_write_per_mtok(cache_ttl)
            + cache_read * price.cache_read_per_mtok  # type: ignore[operator]
            + output_tokens * price.output_per_mtok
        ) / 1e6
        cost = round(cost * price.batch_discount, 6)
    else:
        notes.append(f"no known price for model {model!r}: pass prices= to get a dollar figure")
    return Estimate(
        model=model,
        requests=requests,
        batches=batches,
        sample_size=len(sample_counts),
        avg_prompt_tokens=round(avg, 2),
        prefix_tokens=prefix_tokens,
        cached=cached,
        cache_ttl=cache_ttl,
        input_tokens=input_tokens,
        cache_write_tokens=cache_write,
        cache_read_tokens=cache_read,
        output_tokens=output_tokens,
        output_per_request=round(output_per_request, 2),
        output_basis=output_basis,
        output_basis_detail=detail,
        cost_usd=cost,
        price=None if price is None else price.as_dict(),
        notes=notes,
    )


def check_budget(estimate: Estimate, max_cost_usd: float | None) -> None:
    """Raise before the first create when the estimate is over the cap, or can not be priced."""
    if max_cost_usd is None:
        return
    if estimate.cost_usd is None:
        raise UnknownPriceError(
            f"max_cost_usd={max_cost_usd} is set but model {estimate.model!r} has no known price, so "
            f"the run's cost can not be checked; nothing was submitted. Pass prices={{{estimate.model!r}: "
            f"{{'input': ..., 'output': ...}}}} (USD per million tokens) or the connection extra 'prices'"
        )
    if estimate.cost_usd > max_cost_usd:
        raise BudgetExceededError(
            f"estimated cost ${estimate.cost_usd:,.4f} for {estimate.requests} request(s) on "
            f"{estimate.model} is over max_cost_usd=${max_cost_usd:,.4f}; nothing was submitted. "
            f"Basis: input {estimate.input_tokens:,} + cache write {estimate.cache_write_tokens:,} + "
            f"cache read {estimate.cache_read_tokens:,} + output {estimate.output_tokens:,} tokens "
            f"(output {estimate.output_basis_detail}). "
            + (
                "Run a pilot (sample=N) to measure output instead of assuming max_tokens, reduce "
                "the records, or raise the cap"
                if estimate.output_basis == OUTPUT_UPPER_BOUND
                else "Reduce the records (a smaller sample=N) or raise the cap"
            )
        )


def mean_output_tokens(outputs: list[int]) -> float | None:
    """Mean output tokens over succeeded requests of a pilot (None when there were none)."""
    return sum(outputs) / len(outputs) if outputs else None


def project_stages(
    stages: Sequence[Mapping[str, Any]], escalation_rate: float | Sequence[float]
) -> list[dict[str, Any]]:
    """Project each stage of a multi-stage backlog from the share of answers that escalate.

    ``stages`` are per-stage estimates *as if every record reached that stage* (``Estimate.as_dict()``
    or any mapping with ``requests`` and ``cost_usd``; other keys are kept), in stage order.
    ``escalation_rate`` is the share of a stage's answers that go on to the next stage (measured on
    the pilot: escalated / answered), one number for every step or one per step. Stage 1 is
    kept; stage k's requests and dollars (and token counts) are scaled by the product of the rates
    before it, so a stage with a 20 % escalation rate costs a fifth of its all-records estimate.

    Why a separate, simple function: the estimate of one submit knows only its own stage; the
    backlog unit asks each stage for its all-records estimate and projects the total with this,
    before the full run is approved. Returns new dicts with ``share`` (records reaching the
    stage) added; ``cost_usd`` stays None for a stage without a price.
    """
    steps = len(stages) - 1
    rates = (
        [float(escalation_rate)] * steps
        if isinstance(escalation_rate, (int, float))
        else list(escalation_rate)
    )
    if len(rates) < steps:
        rates += rates[-1:] * (steps - len(rates)) if rates else [0.0] * steps
    for rate in rates:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"an escalation rate is a share in 0..1, got {rate!r}")
    out: list[dict[str, Any]] = []
    share = 1.0
    for index, stage in enumerate(stages):
        if index:
            share *= rates[index - 1]
        row = dict(stage)
        row["share"] = round(share, 6)
        for key in ("requests", "input_tokens", "cache_write_tokens", "cache_read_tokens", "output_tokens"):
            if isinstance(row.get(key), (int, float)):
                row[key] = math.ceil(row[key] * share)
        if row.get("cost_usd") is not None:
            row["cost_usd"] = round(float(row["cost_usd"]) * share, 6)
        out.append(row)
    return out

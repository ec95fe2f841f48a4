"""Distribution guardrails checked after a load, and the summary block a person reads.

A backlog run that "succeeded" with 40 % of tickets in one category, or with every answer
rejected, is a failed run that nobody notices until the numbers are used. The checks here run on
the load's summary *after* the rows are written (nothing loaded is lost, the rows are there to
inspect) and fail the task with the observed numbers next to the limits.

Shares are of accepted rows: ``max_share={"category": {"other": 0.15}}`` fails when more than
15 % of the accepted answers say ``category = other``. Rejects are governed by
``max_reject_rate`` (share of all results) and ``min_accepted`` (an absolute floor). A load where
every result is rejected fails by default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_fable.exceptions import GuardrailError as GuardrailError  # noqa: E402  (moved there)


@dataclass(frozen=True)
class Breach:
    rule: str
    message: str


ShareLimits = Mapping[str, Mapping[str, float]]


def _value_key(value: Any) -> str:
    """Distribution keys are strings (``str(value)``); booleans appear as 'True'/'False'."""
    return str(value)


def share_limits(value: Any, name: str = "max_share") -> dict[str, dict[str, Any]] | None:
    """``max_share``/``min_share`` as given, or as an Airflow template rendered them.

    The operators template these fields so a DAG Param can feed a limit
    (``{"label": {"other": "{{ params.max_other_share }}"}}``); a rendered template is a string,
    so numeric strings become floats here, a whole-dict template (a JSON object) is parsed, and
    an empty or ``None`` share means "no limit on that value". Anything else is left for
    :func:`check_config` to refuse with its usual message.
    """
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "None", "none", "null"):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"{name} must be a mapping (or a JSON object), got {value!r}") from None
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must map fields to {{value: share}}, got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for field_name, per_value in value.items():
        if not isinstance(per_value, Mapping):
            out[field_name] = per_value
            continue
        shares: dict[str, Any] = {}
        for key, share in per_value.items():
            if isinstance(share, str):
                if share.strip() in ("", "None", "none", "null"):
                    continue
                try:
                    share = float(share)
                except ValueError:
                    pass  # check_config names it
            elif share is None:
                continue
            shares[key] = share
        out[field_name] = shares
    return out


def check_config(
    *,
    max_share: ShareLimits | None,
    min_share: ShareLimits | None,
    fields: Mapping[str, list[str] | None],
    max_reject_rate: float | None = None,
    min_accepted: int | None = None,
) -> None:
    """Refuse a guardrail that can never fire (unknown field, value outside the enum, bad share).

    Called before loading so a typo such as ``{"categroy": ...}`` fails at once instead of
    silently passing every run. ``fields`` maps each distribution field to its allowed values
    (None when any value is possible).
    """
    for name, limits in (("max_share", max_share), ("min_share", min_share)):
        for field_name, per_value in (limits or {}).items():
            if field_name not in fields:
                raise ValueError(
                    f"{name}: {field_name!r} is not an enum or boolean field of the output model "
                    f"(those with a distribution: {', '.join(sorted(fields)) or 'none'})"
                )
            allowed = fields[field_name]
            if not isinstance(per_value, Mapping):
                raise ValueError(f"{name}[{field_name!r}] must map values to shares, got {per_value!r}")
            for value, share in per_value.items():
                if allowed is not None and _value_key(value) not in allowed:
                    raise ValueError(
                        f"{name}[{field_name!r}]: {value!r} is not a value of {field_name} "
                        f"(values: {', '.join(allowed)})"
                    )
                if not isinstance(share, (int, float)) or not 0 <= share <= 1:
                    raise ValueError(
                        f"{name}[{field_name!r}][{value!r}] must be a share in 0..1, got {share!r}"
                    )
    if max_reject_rate is not None and not 0 <= max_reject_rate <= 1:
        raise ValueError(f"max_reject_rate must be a share in 0..1, got {max_reject_rate!r}")
    if min_accepted is not None and min_accepted < 0:
        raise ValueError(f"min_accepted must be >= 0, got {min_accepted!r}")


def check_guardrails(
    summary: Mapping[str, Any],
    *,
    max_share: ShareLimits | None = None,
    min_share: ShareLimits | None = None,
    max_reject_rate: float | None = None,
    min_accepted: int | None = None,
    fail_when_all_rejected: bool = True,
    reject_rule: str = "max_reject_rate",
) -> list[Breach]:
    """Every guardrail the load summary breaks, with the observed numbers and the limit.

    ``reject_rule`` names the limit ``max_reject_rate`` stands for in the breach: a rerun of
    failed records is checked against its own rule (``max_reject_rate_rerun``), not the full
    run's, because it sends exactly the records that failed and expects many to fail again.
    """
    breaches: list[Breach] = []
    total = int(summary.get("records", 0))
    accepted = int(summary.get("accepted", 0))
    rejected = int(summary.get("rejected", 0))
    distribution: Mapping[str, Mapping[str, int]] = summary.get("distribution") or {}
    if fail_when_all_rejected and total and not accepted:
        breaches.append(
            Breach("all_rejected", f"all {total} results were rejected (0 accepted); see reject reasons")
        )
    if max_reject_rate is not None and total and rejected / total > max_reject_rate:
        breaches.append(
            Breach(
                reject_rule,
                f"reject rate {rejected / total:.1%} ({rejected}/{total}) > {reject_rule} {max_reject_rate:.1%}",
            )
        )
    if min_accepted is not None and accepted < min_accepted:
        breaches.append(Breach("min_accepted", f"accepted {accepted} < min_accepted {min_accepted}"))
    for rule, limits, breaks in (
        ("max_share", max_share, lambda share, limit: share > limit),
        ("min_share", min_share, lambda share, limit: share < limit),
    ):
        for field_name, per_value in (limits or {}).items():
            counts = distribution.get(field_name) or {}
            for value, limit in per_value.items():
                n = int(counts.get(_value_key(value), 0))
                share = n / accepted if accepted else 0.0
                if accepted and breaks(share, limit):  # type: ignore[no-untyped-call]
                    sign = ">" if rule == "max_share" else "<"
                    breaches.append(
                        Breach(
                            rule,
                            f"{field_name}={_value_key(value)!r} share {share:.1%} ({n}/{accepted} accepted) "
                            f"{sign} {rule} {limit:.1%}",
                        )
                    )
    return breaches


def raise_on_breaches(breaches: list[Breach], *, table: str, rejects_table: str) -> None:
    if breaches:
        raise GuardrailError(
            f"{len(breaches)} guardrail(s) breached: "
            + "; ".join(b.message for b in breaches)
            + f". The rows are loaded (accepted in {table}, rejects in {rejects_table}): inspect them "
            f"before using the results or rerunning"
        )


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: round(v / total, 4) if total else 0.0 for k, v in counts.items()}


def cache_hit_share(usage: Mapping[str, int]) -> float | None:
    """Share of prompt tokens served from the cache (reads / all prompt tokens)."""
    prompt = (
        usage.get("input_tokens", 0)
        + usage.get("cache_creation_input_tokens", 0)
        + usage.get("cache_read_input_tokens", 0)
    )
    return round(usage.get("cache_read_input_tokens", 0) / prompt, 4) if prompt else None


def format_summary(summary: Mapping[str, Any]) -> str:
    """The compact block at the end of a load's log: counts, reasons, shares, cost, cache, QA."""
    total = summary.get("records", 0)
    lines = [
        "==== fable load summary ====",
        f"results {total}: accepted {summary.get('accepted', 0)}, rejected {summary.get('rejected', 0)}"
        + (f" ({summary.get('rejected', 0) / total:.1%})" if total else ""),
    ]
    reasons = summary.get("reject_reasons") or {}
    if reasons:
        lines.append("reject reasons: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    for field_name, counts in (summary.get("distribution") or {}).items():
        share = shares(counts)
        parts = [f"{k} {v} ({share[k]:.0%})" for k, v in counts.items()]
        lines.append(f"{field_name}: " + (", ".join(parts) or "-"))
    usage = summary.get("usage") or {}
    lines.append(
        f"tokens: in {usage.get('input_tokens', 0):,}, out {usage.get('output_tokens', 0):,}, "
        f"cache write {usage.get('cache_creation_input_tokens', 0):,}, "
        f"cache read {usage.get('cache_read_input_tokens', 0):,}; cache hit share "
        + ("-" if summary.get("cache_hit_share") is None else f"{summary['cache_hit_share']:.1%}")
    )
    actual = summary.get("cost_usd")
    estimated = summary.get("estimated_cost_usd")
    cost = "actual " + ("unknown (no price)" if actual is None else f"${actual:,.4f}")
    if estimated is not None:
        cost += f" vs estimate ${estimated:,.4f}"
        if actual:
            # Said in words: a bare "(+302.6%)" after "actual ... vs estimate ..." read as the
            # actual being over the estimate when the estimate was the one over.
            error = (estimated - actual) / actual
            cost += f" (estimate {abs(error):.1%} {'above' if error >= 0 else 'below'} actual)"
    lines.append("cost: " + cost)
    if summary.get("qa_table"):
        lines.append(f"QA sample: {summary.get('qa_rows', 0)} rows in {summary['qa_table']}")
    if summary.get("guardrails"):
        lines.append("guardrails: " + "; ".join(summary["guardrails"]))
    lines.append("============================")
    return "\n".join(lines)

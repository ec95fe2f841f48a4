"""Prices and dollar cost of token usage, with the Message Batches discount.

One table is used both before a run (the estimate and the budget cap) and after it (the cost the
load reports), so "estimate vs actual" compares like with like. Prices are USD per million
tokens at standard rates; each model has its own cache-write rates for the 5-minute and the
1-hour TTL and its cache-read rate, because those multipliers are not the same on every model
(Fable 5.1 reads the cache at 0.025x input, Fable 5 at 0.1x). The batch discount applies to
every kind of token.

A model is matched by the longest table key that prefixes its name up to a separator, so
dated ids (``claude-haiku-4-5-20251001``) find their family, and ``claude-fable-5-20260609``
stays Fable 5 rather than Fable 5.2 (``claude-fable-5-2``). A model with no match has *no*
price: cost is ``None`` (shown as unknown), never 0, so an unpriced run can not slip under a
budget cap. ``MODEL_CATALOG`` says, per model, whether it is current, legacy or retired, and
where and when its price was read (docs/cost.md shows the same table).

The table can be overridden per connection (extra ``prices``) and per operator (``prices=``),
e.g. ``{"claude-fable-5": {"input": 10, "output": 50}}``: see :func:`parse_prices`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from airflow_provider_fable.core.errors import FableError
from airflow_provider_fable.core.results import Usage
from airflow_provider_fable.exceptions import UnknownPriceError as UnknownPriceError

BATCH_DISCOUNT = 0.5
CACHE_WRITE_5M_MULTIPLIER = 1.25
CACHE_WRITE_1H_MULTIPLIER = 2.0
CACHE_READ_MULTIPLIER = 0.1
#: Kept for callers of the first release; the 5-minute rate.
CACHE_WRITE_MULTIPLIER = CACHE_WRITE_5M_MULTIPLIER


@dataclass(frozen=True, slots=True)
class Price:
    """Standard (non-batch) USD per million tokens for one model family.

    Cache rates default to the usual multipliers of the input price when not given.
    ``min_cache_tokens`` is the smallest prefix the API caches for the model: below it a
    ``cache_control`` breakpoint is silently ignored and the prefix is billed as plain input.
    ``placeholder`` marks prices the project could not confirm from the official price list.
    """

    input_per_mtok: float
    output_per_mtok: float
    cache_write_5m_per_mtok: float | None = None
    cache_write_1h_per_mtok: float | None = None
    cache_read_per_mtok: float | None = None
    batch_discount: float = BATCH_DISCOUNT
    min_cache_tokens: int = 1024
    placeholder: bool = False

    def __post_init__(self) -> None:
        fill = {
            "cache_write_5m_per_mtok": self.input_per_mtok * CACHE_WRITE_5M_MULTIPLIER,
            "cache_write_1h_per_mtok": self.input_per_mtok * CACHE_WRITE_1H_MULTIPLIER,
            "cache_read_per_mtok": self.input_per_mtok * CACHE_READ_MULTIPLIER,
        }
        for name, value in fill.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("input_per_mtok", "output_per_mtok", *fill):
            if getattr(self, name) < 0:
                raise ValueError(f"price {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.batch_discount <= 1:
            raise ValueError(f"batch_discount is the share paid (0 < x <= 1), got {self.batch_discount}")

    def cache_write_per_mtok(self, ttl: str) -> float:
        return self.cache_write_1h_per_mtok if ttl == "1h" else self.cache_write_5m_per_mtok  # type: ignore[return-value]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Where each figure below was read; the date is the day it was read (the pages carry none).
PRICING_PAGE = "https://platform.claude.com/docs/en/about-claude/pricing"
MODELS_OVERVIEW = "https://platform.claude.com/docs/en/about-claude/models/overview"
CONTEXT_WINDOWS_PAGE = "https://platform.claude.com/docs/build-with-claude/context-windows"


def _model_page(slug: str) -> str:
    return f"https://platform.claude.com/docs/en/models/{slug}/overview"


#: Longest matching prefix wins. Sources per row in :data:`MODEL_CATALOG` (and in docs/cost.md);
#: rows marked ``placeholder`` were not found on an official page (third-party price trackers
#: only) and must be checked before relying on them. ``min_cache_tokens`` per the
#: prompt-caching documentation where known (1024 otherwise).
DEFAULT_PRICES: dict[str, Price] = {
    "claude-fable-5-2": Price(8.0, 40.0, 10.0, 16.0, 0.2, placeholder=True),
    "claude-fable-5-1": Price(10.0, 50.0, 12.5, 20.0, 0.25, min_cache_tokens=1024),
    "claude-fable-5": Price(10.0, 50.0, 12.5, 20.0, 1.0, min_cache_tokens=1024),
    "claude-mythos-5-2": Price(8.0, 40.0, 10.0, 16.0, 0.2, placeholder=True),
    "claude-mythos-5-1": Price(10.0, 50.0, 12.5, 20.0, 0.25),
    "claude-mythos-5": Price(10.0, 50.0, 12.5, 20.0, 1.0),
    "claude-opus-5-5": Price(4.0, 20.0, 5.0, 8.0, 0.2),
    "claude-opus-5": Price(5.0, 25.0, 6.25, 10.0, 0.5),
    "claude-opus-4-8": Price(5.0, 25.0, 6.25, 10.0, 0.5),
    "claude-opus-4-7": Price(5.0, 25.0, 6.25, 10.0, 0.5, min_cache_tokens=2048),
    "claude-opus-4-6": Price(5.0, 25.0, 6.25, 10.0, 0.5, min_cache_tokens=4096),
    "claude-opus-4-5": Price(5.0, 25.0, 6.25, 10.0, 0.5, min_cache_tokens=4096),
    "claude-opus-4-1": Price(15.0, 75.0, 18.75, 30.0, 1.5),
    "claude-opus-4": Price(15.0, 75.0, 18.75, 30.0, 1.5),
    "claude-sonnet-5-5": Price(2.0, 10.0, 2.5, 4.0, 0.2),
    "claude-sonnet-5": Price(2.0, 10.0, 2.5, 4.0, 0.2),
    "claude-sonnet-4-6": Price(3.0, 15.0, 3.75, 6.0, 0.3),
    "claude-sonnet-4-5": Price(3.0, 15.0, 3.75, 6.0, 0.3),
    "claude-sonnet-4": Price(3.0, 15.0, 3.75, 6.0, 0.3),
    "claude-3-7-sonnet": Price(3.0, 15.0, 3.75, 6.0, 0.3),
    # Haiku 5.5 is priced in two bands by prompt size; this is the band for prompts up to 100,000
    # tokens (over it: 5x). Its cache-read rate was not found on an official page: placeholder.
    "claude-haiku-5-5": Price(0.1, 0.5, 0.125, 0.2, 0.01, placeholder=True),
    "claude-haiku-4-5": Price(1.0, 5.0, 1.25, 2.0, 0.1, min_cache_tokens=4096),
    "claude-3-5-haiku": Price(0.8, 4.0, 1.0, 1.6, 0.08, min_cache_tokens=2048),
    "claude-3-haiku": Price(0.25, 1.25, 0.3, 0.5, 0.03, min_cache_tokens=2048),
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Where a model stands in Anthropic's lineup, and where its price was read.

    ``status``: ``"current"`` (in the models overview's current lineup), ``"legacy"`` (still
    served, a newer model replaces it: the docs advise migrating) or ``"retired"`` (the API
    refuses it). ``successor`` is the model the docs name as its replacement. ``source`` is the
    page the price and status were read from, ``checked`` the day they were read there.
    """

    status: Literal["current", "legacy", "retired"]
    source: str
    checked: str
    successor: str | None = None


_READ = "2026-12-04"  # every official figure below was (re-)read on this day

#: Lifecycle and price source of every priced model (the same keys as :data:`DEFAULT_PRICES`;
#: a test keeps them equal). Legacy = listed by the docs as legacy, or no longer in the models
#: overview's current lineup while still served; retired = marked retired on the pricing page or
#: in the release notes.
MODEL_CATALOG: dict[str, ModelInfo] = {
    "claude-fable-5-2": ModelInfo(
        "current",
        "third-party only: developersdigest.tech (2026-11-09), docs.laozhang.ai (2026-11-10); "
        "the model is on platform.claude.com/docs/en/models/fable-5-2/migration-guide",
        "2026-11-10",
    ),
    "claude-fable-5-1": ModelInfo("current", PRICING_PAGE + " ; " + _model_page("fable-5-1"), _READ),
    "claude-fable-5": ModelInfo(
        "legacy", PRICING_PAGE + " ; " + _model_page("fable-5"), _READ, successor="claude-fable-5-1"
    ),
    "claude-mythos-5-2": ModelInfo(
        "current", "third-party only: github.com/phuryn/claude-usage v1.5.7", "2026-12-01"
    ),
    "claude-mythos-5-1": ModelInfo("current", PRICING_PAGE, _READ),
    "claude-mythos-5": ModelInfo("legacy", PRICING_PAGE, _READ, successor="claude-mythos-5-1"),
    "claude-opus-5-5": ModelInfo("current", _model_page("opus-5-5") + " ; " + MODELS_OVERVIEW, _READ),
    "claude-opus-5": ModelInfo(
        "legacy",
        PRICING_PAGE + " ; https://platform.claude.com/docs/about-claude/models/whats-new-opus-5",
        _READ,
        successor="claude-opus-5-5",
    ),
    "claude-opus-4-8": ModelInfo("legacy", PRICING_PAGE, _READ, successor="claude-opus-5-5"),
    "claude-opus-4-7": ModelInfo("legacy", PRICING_PAGE, _READ, successor="claude-opus-5-5"),
    "claude-opus-4-6": ModelInfo("legacy", PRICING_PAGE, _READ, successor="claude-opus-5-5"),
    "claude-opus-4-5": ModelInfo("legacy", PRICING_PAGE, _READ, successor="claude-opus-5-5"),
    "claude-opus-4-1": ModelInfo("retired", PRICING_PAGE, _READ, successor="claude-opus-5-5"),
    "claude-opus-4": ModelInfo("retired", PRICING_PAGE, _READ, successor="claude-opus-5-5"),
    "claude-sonnet-5-5": ModelInfo("current", _model_page("sonnet-5-5") + " ; " + MODELS_OVERVIEW, _READ),
    "claude-sonnet-5": ModelInfo("legacy", _model_page("sonnet-5"), _READ, successor="claude-sonnet-5-5"),
    "claude-sonnet-4-6": ModelInfo(
        "legacy",
        "the project's earlier reading of " + PRICING_PAGE,
        "2026-11-23",
        successor="claude-sonnet-5-5",
    ),
    "claude-sonnet-4-5": ModelInfo(
        "legacy",
        "the project's earlier reading of " + PRICING_PAGE,
        "2026-11-23",
        successor="claude-sonnet-5-5",
    ),
    "claude-sonnet-4": ModelInfo(
        "retired",
        "the project's earlier reading of " + PRICING_PAGE,
        "2026-11-23",
        successor="claude-sonnet-5-5",
    ),
    "claude-3-7-sonnet": ModelInfo(
        "retired",
        "the project's earlier reading of " + PRICING_PAGE,
        "2026-11-23",
        successor="claude-sonnet-5-5",
    ),
    "claude-haiku-5-5": ModelInfo(
        "current",
        _model_page("haiku-5-5") + " (cache read: third-party only, PromptFuel v1.0.23 2026-10-16)",
        _READ,
    ),
    "claude-haiku-4-5": ModelInfo("legacy", PRICING_PAGE, "2026-11-23", successor="claude-haiku-5-5"),
    "claude-3-5-haiku": ModelInfo("retired", PRICING_PAGE, "2026-11-23", successor="claude-haiku-5-5"),
    "claude-3-haiku": ModelInfo("retired", PRICING_PAGE, "2026-11-23", successor="claude-haiku-5-5"),
}


def _longest_prefix(model: str, keys: Iterable[str]) -> str | None:
    """The longest key that is ``model`` or a prefix of it ending at a separator.

    The separator rule keeps a dated id on its own model: ``claude-fable-5-20260609`` is Fable 5,
    not ``claude-fable-5-2`` (Fable 5.2), and ``claude-opus-4-10`` would not be ``claude-opus-4-1``.
    """
    n = len(model)
    matches = [k for k in keys if model.startswith(k) and (len(k) == n or not model[len(k)].isalnum())]
    return max(matches, key=len) if matches else None


def model_info(model: str) -> ModelInfo | None:
    """The catalog entry of ``model`` (longest matching prefix, like the prices), or None."""
    key = _longest_prefix(model, MODEL_CATALOG)
    return MODEL_CATALOG[key] if key is not None else None


def legacy_notice(model: str) -> str | None:
    """One line telling that ``model`` is legacy or retired, with its successor; None otherwise.

    Said, not enforced: a job's model is part of its fingerprint, so moving a backlog to a newer
    model is a decision (it re-answers every record), never something the provider does itself.
    """
    info = model_info(model)
    if info is None or info.status == "current":
        return None
    then = f"; its successor is {info.successor}" if info.successor else ""
    if info.status == "retired":
        return f"Model {model} is retired per Anthropic's docs: the API may refuse it{then}."
    return (
        f"Model {model} is a legacy model per Anthropic's docs (still served{then}). Changing a "
        "job's model changes its fingerprint: the next run answers every record again."
    )


def served_models() -> tuple[str, ...]:
    """Model ids of the catalog that the API still serves (current and legacy, not retired)."""
    return tuple(name for name, info in MODEL_CATALOG.items() if info.status != "retired")


_ALIASES = {
    "input": "input_per_mtok",
    "output": "output_per_mtok",
    "cache_write_5m": "cache_write_5m_per_mtok",
    "cache_write_1h": "cache_write_1h_per_mtok",
    "cache_read": "cache_read_per_mtok",
}


def parse_price(model: str, value: Any) -> Price:
    """One price from a ``Price``, ``[input, output]`` or a dict (short or long key names)."""
    if isinstance(value, Price):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return Price(float(value[0]), float(value[1]))
    if isinstance(value, dict):
        fields = {_ALIASES.get(k, k): v for k, v in value.items()}
        unknown = set(fields) - set(Price.__dataclass_fields__)
        if unknown or "input_per_mtok" not in fields or "output_per_mtok" not in fields:
            raise ValueError(
                f"price for {model!r} needs 'input' and 'output' (USD per million tokens) and may "
                f"have cache_write_5m, cache_write_1h, cache_read, batch_discount, min_cache_tokens; "
                f"got {sorted(value)}"
            )
        return Price(**{str(k): v for k, v in fields.items()})
    raise ValueError(f"price for {model!r} must be a dict or [input, output], got {value!r}")


def parse_prices(table: Any) -> dict[str, Price]:
    """An override table (model prefix -> price), e.g. from a connection extra or ``prices=``."""
    if table is None:
        return {}
    if isinstance(table, str):
        import json

        table = json.loads(table)
    if not isinstance(table, dict):
        raise ValueError(f"prices must be a mapping of model name -> price, got {type(table).__name__}")
    return {str(model): parse_price(str(model), value) for model, value in table.items()}


def merge_prices(*overrides: Any) -> dict[str, Price]:
    """The default table with each override applied in turn (later wins, per model key)."""
    table = dict(DEFAULT_PRICES)
    for override in overrides:
        table.update(parse_prices(override))
    return table


def price_for(model: str, prices: Mapping[str, Price] | None = None) -> Price | None:
    """The price of ``model`` by longest matching key, or None when the model is unknown."""
    table = prices if prices is not None else DEFAULT_PRICES
    key = _longest_prefix(model, table)
    return table[key] if key is not None else None


def require_price(model: str, prices: Mapping[str, Price] | None = None) -> Price:
    price = price_for(model, prices)
    if price is None:
        raise UnknownPriceError(
            f"no known price for model {model!r}: its cost can not be estimated or checked against "
            f"a budget. Pass prices={{{model!r}: {{'input': ..., 'output': ...}}}} (USD per million "
            f"tokens) on the operator or in the connection's 'prices' extra"
        )
    return price


def usage_cost_usd(
    usage: Usage,
    model: str,
    *,
    batch: bool = True,
    prices: Mapping[str, Price] | None = None,
    price: Price | None = None,
) -> float | None:
    """Dollar cost of ``usage`` on ``model``; None when the model has no known price.

    Cache writes are split by TTL when the usage says how many were 1-hour writes (the API's
    ``cache_creation.ephemeral_1h_input_tokens``); the rest are charged at the 5-minute rate.
    """
    price = price or price_for(model, prices)
    if price is None:
        return None
    write_1h = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
    write_5m = usage.cache_creation_input_tokens - write_1h
    total = (
        usage.input_tokens * price.input_per_mtok
        + write_5m * price.cache_write_5m_per_mtok  # type: ignore[operator]
        + write_1h * price.cache_write_1h_per_mtok  # type: ignore[operator]
        + usage.cache_read_input_tokens * price.cache_read_per_mtok  # type: ignore[operator]
        + usage.output_tokens * price.output_per_mtok
    ) / 1e6
    return round(total * (price.batch_discount if batch else 1.0), 6)


#: Context window (tokens: input + ``max_tokens``) per model family, longest matching prefix wins,
#: like the price table; a model absent from the table is not checked. 1M: the model pages of the
#: 5.x models and the context-windows page (Fable, Mythos, Opus 5/4.8/4.7/4.6, Sonnet 5/4.6);
#: "other Claude models, including Claude Sonnet 4.5, have a 200k-token context window" (the 1M
#: beta header of Sonnet 4/4.5 is not sent by the provider). Read 2026-12-04 (docs/cost.md).
CONTEXT_WINDOWS: dict[str, int] = {
    "claude-fable-5": 1_000_000,
    "claude-mythos-5": 1_000_000,
    "claude-opus-5": 1_000_000,
    "claude-opus-4-8": 1_000_000,
    "claude-opus-4-7": 1_000_000,
    "claude-opus-4-6": 1_000_000,
    "claude-opus-4": 200_000,
    "claude-sonnet-5": 1_000_000,
    "claude-sonnet-4-6": 1_000_000,
    "claude-sonnet-4": 200_000,
    "claude-3-7-sonnet": 200_000,
    "claude-haiku-5-5": 1_000_000,
    "claude-haiku-4-5": 200_000,
    "claude-3-5-haiku": 200_000,
    "claude-3-haiku": 200_000,
}


def context_window(model: str, windows: Mapping[str, int] | None = None) -> int | None:
    """The model's context window in tokens by longest matching prefix, or None when unknown."""
    table = windows if windows is not None else CONTEXT_WINDOWS
    key = _longest_prefix(model, table)
    return table[key] if key is not None else None


class ContextWindowGuard:
    """Refuses, before anything is paid for, a request the model cannot take.

    The rule: a request's input tokens plus its ``max_tokens`` must fit the model's context
    window (what the API checks). Counting every request would cost a ``count_tokens`` call
    each, so a cheap upper bound comes first: a token covers at least one byte of the request's
    serialised JSON (which also holds the JSON syntax, the ``custom_id`` and the schema: more
    bytes than the text the API tokenises), so a request of ``bytes + max_tokens <= window``
    surely fits and is never counted. Only larger requests (over ~200 KB for a 200k window:
    a few documents, never the typical record, so a million-record job stays one pass over its
    bytes) are counted with ``count_tokens``; when counting fails, the usual ~4 bytes per token
    decides instead, with a warning.

    :param count_tokens: ``params -> input tokens`` (the hook's ``count_tokens``).
    :param name_of: ``custom_id -> record id`` for the error message (encoded ids).
    """

    BYTES_PER_TOKEN_ESTIMATE = 4

    def __init__(
        self,
        window: int,
        max_tokens: int,
        count_tokens: Any,
        *,
        name_of: Any = None,
        warn: Any = None,
    ) -> None:
        self.window = window
        self.max_tokens = max_tokens
        self.count_tokens = count_tokens
        self.name_of = name_of or (lambda custom_id: custom_id)
        self.warn = warn
        #: Requests counted with ``count_tokens`` (the candidates near or over the window).
        self.counted = 0
        self.sure_below = window - max_tokens  # bytes at or under this surely fit

    def __call__(self, request: dict[str, Any], size: int) -> None:
        if size <= self.sure_below:
            return
        self._check(request, size)

    def _check(self, request: dict[str, Any], size: int) -> None:
        from airflow_provider_fable.core.errors import RecordError

        custom_id = request.get("custom_id")
        params = request.get("params") or {}
        max_tokens = int(params.get("max_tokens") or self.max_tokens)
        self.counted += 1
        try:
            tokens = int(self.count_tokens(params))
            how = "counted by count_tokens"
        except FableError as exc:
            tokens = size // self.BYTES_PER_TOKEN_ESTIMATE
            how = f"estimated at {self.BYTES_PER_TOKEN_ESTIMATE} bytes per token (count_tokens failed)"
            if self.warn is not None:
                self.warn(f"could not count the tokens of record {self.name_of(custom_id)!r} ({exc}); {how}")
        if tokens + max_tokens > self.window:
            raise RecordError(
                self.name_of(custom_id),
                "context_window",
                f"the request has {tokens:,} input tokens ({how}; {size:,} bytes) + max_tokens "
                f"{max_tokens:,}, over the model's {self.window:,}-token context window; the API "
                "would refuse it after the batch is paid for. Shorten or split this record's input, "
                "or leave it out",
            )

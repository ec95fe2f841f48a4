"""Settings of the Message Batches emulator.

They are frozen pydantic models because one settings object is shared by every request
handler thread of a running server: nothing may change it behind their backs, and invalid
values (a rate of 1.5, an unknown endpoint name) must fail when the server is configured,
not halfway through a test run.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from airflow_provider_fable.emulator.validation import KNOWN_MODELS

__all__ = [
    "ENDPOINTS",
    "INVALID_KINDS",
    "EmulatorSettings",
    "FaultSettings",
]

#: Endpoint names used by ``http_error_endpoints`` and by the call counters of ``/_emulator/stats``.
ENDPOINTS: tuple[str, ...] = (
    "create",
    "retrieve",
    "list",
    "cancel",
    "delete",
    "results",
    "count_tokens",
    "messages",
)

#: Ways a succeeded answer can be broken on purpose (``invalid_answer_rate``).
INVALID_KINDS: tuple[str, ...] = ("non_json", "wrong_type", "bad_enum", "missing_field")


def _split_csv(value: Any) -> Any:
    """Accept ``"429,500"`` as well as a list, so env vars and CLI strings need no parsing upstream."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class FaultSettings(BaseModel):
    """What goes wrong, and how often, for one server start.

    Every decision is a hash of ``(seed, custom_id or call index, fault name)``, never a random
    draw, so a failing test reproduces exactly: the same requests fail the same way every run.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    #: Share of requests ending ``errored`` (``api_error``/``overloaded_error``).
    errored_rate: float = Field(0.0, ge=0.0, le=1.0)
    #: Share of requests the emulated backend never gets to: they keep the batch
    #: ``in_progress`` until its 24-hour expiry (advance ``/_emulator/clock``), then end
    #: ``expired``. Never ``expired`` in a batch canceled before then (they are ``canceled``).
    expired_rate: float = Field(0.0, ge=0.0, le=1.0)
    invalid_answer_rate: float = Field(0.0, ge=0.0, le=1.0)
    invalid_kinds: tuple[str, ...] = INVALID_KINDS
    http_error_rate: float = Field(0.0, ge=0.0, le=1.0)
    http_error_codes: tuple[int, ...] = (429, 500, 529)
    http_error_endpoints: tuple[str, ...] = ENDPOINTS
    http_error_first_n: int = Field(0, ge=0)
    #: ``retry-after`` (seconds) sent with injected 429/529/5xx, as the API does. The SDK waits
    #: that long before retrying (it honours 1..60 s), so the default is realistic, not fast.
    retry_after_seconds: int = Field(5, ge=0, le=600)
    #: When set, also send ``retry-after-ms`` (which the SDK prefers): tests that inject
    #: retryable errors set this (e.g. 10) so their retries take milliseconds.
    retry_after_ms: int | None = Field(None, ge=1)
    #: Share of constraints that only reach the model as description hints (``{maxLength: 80}``
    #: after ``transform_schema``) that an answer breaks, as a real model sometimes does.
    description_break_rate: float = Field(0.02, ge=0.0, le=1.0)
    #: Share of verbatim-quote fields (``evidence``, ``quote``... described as a quote from the
    #: record) answered with a paraphrase or an invented specific instead, as real models do.
    invented_quote_rate: float = Field(0.02, ge=0.0, le=1.0)
    transient_404_after_create: int = Field(0, ge=0)
    cut_results_after: int | None = Field(None, ge=0)
    cut_results_times: int = Field(1, ge=0)
    #: The first N creates make the batch and then lose the response, the worst case for a
    #: client: the batch exists (and is billed) but the caller never learns its id.
    lose_create_response_first_n: int = Field(0, ge=0)
    #: How the response is lost: ``"500"`` (an internal error after the batch was made) or
    #: ``"drop"`` (the connection closes mid-response).
    lose_create_response_mode: str = Field("500", pattern="^(500|drop)$")

    @field_validator("invalid_kinds", "http_error_codes", "http_error_endpoints", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("invalid_kinds")
    @classmethod
    def _known_kinds(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(kinds) - set(INVALID_KINDS))
        if unknown or not kinds:
            raise ValueError(
                f"invalid_kinds must be a non-empty subset of {list(INVALID_KINDS)}, got {unknown}"
            )
        return kinds

    @field_validator("http_error_endpoints")
    @classmethod
    def _known_endpoints(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(names) - set(ENDPOINTS))
        if unknown:
            raise ValueError(f"unknown http_error_endpoints {unknown}; known: {list(ENDPOINTS)}")
        return names

    @field_validator("http_error_codes")
    @classmethod
    def _error_codes(cls, codes: tuple[int, ...]) -> tuple[int, ...]:
        if not codes or any(not 400 <= code <= 599 for code in codes):
            raise ValueError(f"http_error_codes must be non-empty HTTP error codes (400-599), got {codes}")
        return codes

    @model_validator(mode="after")
    def _outcome_shares(self) -> FaultSettings:
        # Both shares are cut from one hash fraction per request, so together they must fit in 1.
        if self.errored_rate + self.expired_rate > 1.0:
            raise ValueError("errored_rate + expired_rate must not exceed 1")
        return self


class EmulatorSettings(BaseModel):
    """How the emulated API behaves: timing, limits, auth and faults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Seconds from create until a batch ends; 0 ends it on the first retrieve after create.
    processing_seconds: float = Field(0.0, ge=0.0)
    #: When set, a batch ends on its N-th retrieve instead of after ``processing_seconds``:
    #: tests that must see a wait really happen (a sensor deferring) do not depend on timing.
    processing_retrieves: int | None = Field(None, ge=1)
    #: Seconds a batch stays ``canceling`` before it ends.
    cancel_seconds: float = Field(0.2, ge=0.0)
    #: Request body cap; larger bodies get 413 request_too_large like the real API's 256 MB cap.
    max_body_bytes: int = Field(256 * 1024 * 1024, ge=1)
    #: Smallest cacheable prompt prefix, in estimated tokens (the API's minimum is 1024 for most models).
    min_cache_tokens: int = Field(1024, ge=0)
    #: When set, only this key is accepted; when None any non-empty key is.
    api_key: str | None = None
    #: Model ids and aliases the API knows; others are ``not_found_error`` (None: accept any).
    known_models: tuple[str, ...] | None = KNOWN_MODELS
    #: Optional state file (SQLite): batches, results and the clock survive a restart.
    state_path: str | None = None
    #: Initial offset of the emulated clock, in seconds (``/_emulator/clock`` moves it later).
    clock_offset_seconds: float = 0.0
    #: Worker processes that generate the answers of large batches (``generation_min_batch``
    #: requests or more); 0 generates in a thread of the emulator's own process. None (the
    #: default): one per CPU the emulator may run on (at most 4), or 0 on a single CPU. The
    #: answers are the same either way (docs/emulator.md, "Throughput").
    generation_workers: int | None = Field(None, ge=0, le=64)
    #: Smaller batches are answered in process (no worker start-up, nothing to ship).
    generation_min_batch: int = Field(5000, ge=1)
    faults: FaultSettings = FaultSettings()

    @field_validator("known_models", mode="before")
    @classmethod
    def _models_csv(cls, value: Any) -> Any:
        return _split_csv(value)

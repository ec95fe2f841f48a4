"""Deterministic fault decisions.

Each decision hashes ``(seed, custom_id or call index, fault name)``: a test that saw request
``r7`` expire sees it expire on every run, and changing ``seed`` reshuffles which requests
are hit without changing how many. A request sent again in a later batch (a rerun of what
failed, an escalation) hashes ``r7~2``, ``r7~3``...: like the real service, a rerun is a fresh
draw, so reruns of failed records mostly succeed instead of failing the same way for ever, and
the first run stays exactly reproducible.
"""

from __future__ import annotations

import hashlib
import threading
from collections import defaultdict

from airflow_provider_fable.emulator.model import stable_fraction, stable_hash
from airflow_provider_fable.emulator.settings import FaultSettings

__all__ = [
    "HttpFaults",
    "attempt_key",
    "custom_id_of",
    "errored_type",
    "is_invalid_answer",
    "request_outcome",
    "result_order_key",
]


def attempt_key(custom_id: str, attempt: int) -> str:
    """The fault key of the ``attempt``-th batch request carrying ``custom_id`` (1-based)."""
    return custom_id if attempt <= 1 else f"{custom_id}~{attempt}"


def custom_id_of(key: str) -> str:
    """Back from a fault key to its custom_id (custom_ids never contain ``~``: API pattern)."""
    return key.split("~", 1)[0]


def request_outcome(faults: FaultSettings, custom_id: str) -> str | None:
    """``"errored"``, ``"expired"`` or None for a request that is processed normally.

    One fraction serves both rates (errored below ``errored_rate``, expired in the next
    ``expired_rate``), so the shares are exact-ish and raising one rate only adds requests.
    """
    if not faults.errored_rate and not faults.expired_rate:
        return None
    f = stable_fraction(faults.seed, custom_id, "outcome")
    if f < faults.errored_rate:
        return "errored"
    if f < faults.errored_rate + faults.expired_rate:
        return "expired"
    return None


def errored_type(faults: FaultSettings, custom_id: str) -> str:
    """Which server-side error an errored request reports."""
    return ("api_error", "overloaded_error")[stable_hash(faults.seed, custom_id, "errored_type") % 2]


def is_invalid_answer(faults: FaultSettings, key: str) -> bool:
    """Whether a succeeded request gets a deliberately broken answer."""
    return bool(faults.invalid_answer_rate) and (
        stable_fraction(faults.seed, key, "invalid_answer") < faults.invalid_answer_rate
    )


def result_order_key(faults: FaultSettings, custom_id: str) -> int:
    """Sort key of a result line: results are deliberately not in request order."""
    return stable_hash(faults.seed, custom_id, "result_order")


def result_order_keys(faults: FaultSettings, custom_ids: list[str]) -> list[int]:
    """``result_order_key`` of each custom_id, the hashed text's constant ends encoded once
    (a batch end sorts up to 100,000 lines)."""
    head = f"{faults.seed}\x1f".encode()
    tail = b"\x1fresult_order"
    sha256, from_bytes = hashlib.sha256, int.from_bytes
    return [
        from_bytes(sha256(head + custom_id.encode("utf-8", "surrogatepass") + tail).digest()[:8], "big")
        for custom_id in custom_ids
    ]


class HttpFaults:
    """Counts calls per endpoint and decides which of them fail with an HTTP error."""

    def __init__(self, faults: FaultSettings) -> None:
        self._faults = faults
        self._calls: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def lose_create_response(self) -> str | None:
        """``"500"``/``"drop"`` when this create (already made) must lose its response, else None."""
        with self._lock:
            index = self._calls["create:made"]
            self._calls["create:made"] += 1
        if index < self._faults.lose_create_response_first_n:
            return self._faults.lose_create_response_mode
        return None

    def check(self, endpoint: str) -> int | None:
        """The status code this call must fail with, or None to serve it."""
        faults = self._faults
        with self._lock:
            index = self._calls[endpoint]
            self._calls[endpoint] += 1
        if endpoint not in faults.http_error_endpoints:
            return None
        codes = faults.http_error_codes
        if index < faults.http_error_first_n:
            return codes[index % len(codes)]
        if faults.http_error_rate and stable_fraction(faults.seed, endpoint, index, "http_error") < (
            faults.http_error_rate
        ):
            return codes[stable_hash(faults.seed, endpoint, index, "http_error_code") % len(codes)]
        return None

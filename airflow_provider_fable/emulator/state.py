"""In-memory batch store: validation, lifecycle, results, prompt cache and stats.

State is advanced lazily, on access, from the clock: a batch "ends" when someone looks at it
after ``created_at + processing_seconds``. That keeps the emulator free of background
threads, makes ``processing_seconds=0`` mean "ended on the first retrieve", and lets the
results be computed exactly once, at the end, like the real API's immutable results file.

The clock is controllable (``Clock.advance``, ``POST /_emulator/clock``): a batch whose
requests are not all processed stays ``in_progress`` until ``created_at + 24 h`` on that
clock, then ends with those requests ``expired``, as in the real API. With a state file the
store writes every batch change to SQLite and reloads it on start.

Locking: one store lock guards the batch index only; each batch has its own lock, so
computing the results of a 100,000-request batch never blocks requests about other batches.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from airflow_provider_fable.core.ids import CUSTOM_ID_RE
from airflow_provider_fable.emulator import faults as fault_rules
from airflow_provider_fable.emulator import model
from airflow_provider_fable.emulator.errors import ApiError, error_body, new_request_id, random_id
from airflow_provider_fable.emulator.faults import HttpFaults
from airflow_provider_fable.emulator.persist import Clock, StateFile
from airflow_provider_fable.emulator.settings import ENDPOINTS, EmulatorSettings
from airflow_provider_fable.emulator.validation import (
    API_VERSIONS,
    Problem,
    prefix_params,
    validate_request,
    validate_shared,
)

__all__ = [
    "MAX_REQUESTS",
    "Batch",
    "BatchStore",
    "PromptCache",
    "ResultsDownload",
    "Stats",
    "parse_create_body",
]

MAX_REQUESTS = 100_000
EXPIRY_SECONDS = 24 * 3600
_EXPIRY_SECONDS = EXPIRY_SECONDS
_TYPES = ("succeeded", "errored", "canceled", "expired")


def rfc3339(ts: float | None) -> str | None:
    """Timestamps the way the API writes them (UTC, ``Z`` suffix)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body, answering 400 like the API when it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"There was an error parsing the body of your request: {exc}") from None


def parse_create_body(raw: bytes) -> list[tuple[str, Any]]:
    """Validate a create body the way the API does synchronously; returns (custom_id, params) pairs.

    Only the envelope is checked here (count, custom_id, params is an object); the content of
    params is validated later and turns into errored results, as with the real API.
    """
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    for key in body:
        if key != "requests":
            raise ApiError(400, f"{key}: Extra inputs are not permitted")
    if "requests" not in body:
        raise ApiError(400, "requests: Field required")
    requests = body["requests"]
    if not isinstance(requests, list):
        raise ApiError(400, "requests: Input should be a valid list")
    if not requests:
        raise ApiError(400, "requests: List should have at least 1 item after validation, not 0")
    if len(requests) > MAX_REQUESTS:
        raise ApiError(
            400,
            f"requests: List should have at most {MAX_REQUESTS} items after validation, not {len(requests)}",
        )
    seen: dict[str, int] = {}
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(requests):
        if not isinstance(item, dict):
            raise ApiError(400, f"requests.{i}: Input should be a valid dictionary")
        for key in item:
            if key not in ("custom_id", "params"):
                raise ApiError(400, f"requests.{i}.{key}: Extra inputs are not permitted")
        if "custom_id" not in item:
            raise ApiError(400, f"requests.{i}.custom_id: Field required")
        custom_id = item["custom_id"]
        if not isinstance(custom_id, str):
            raise ApiError(400, f"requests.{i}.custom_id: Input should be a valid string")
        if not CUSTOM_ID_RE.fullmatch(custom_id):
            shown = custom_id if len(custom_id) <= 80 else custom_id[:77] + "..."
            raise ApiError(
                400,
                f"requests.{i}.custom_id: {shown!r} ({len(custom_id)} characters) must match "
                "^[a-zA-Z0-9_-]{1,64}$: 1 to 64 letters, digits, '_' or '-'",
            )
        if custom_id in seen:
            raise ApiError(
                400,
                f"requests.{i}.custom_id: duplicate custom_id {custom_id!r} (also used by "
                f"requests.{seen[custom_id]}); custom_id must be unique within a batch",
            )
        seen[custom_id] = i
        if "params" not in item:
            raise ApiError(400, f"requests.{i}.params: Field required")
        if not isinstance(item["params"], dict):
            raise ApiError(400, f"requests.{i}.params: Input should be a valid dictionary")
        out.append((custom_id, item["params"]))
    return out


class Stats:
    """Counters behind ``GET /_emulator/stats``: what tests and demos assert on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter({name: 0 for name in ENDPOINTS})
        self.counters: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.http_errors_by_code: Counter[str] = Counter()
        self.invalid_by_kind: Counter[str] = Counter()
        self.results: Counter[str] = Counter()

    def call(self, endpoint: str) -> None:
        with self._lock:
            self.calls[endpoint] += 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def fault(self, name: str, n: int = 1, *, code: int | None = None, kind: str | None = None) -> None:
        with self._lock:
            self.faults[name] += n
            if code is not None:
                self.http_errors_by_code[str(code)] += n
            if kind is not None:
                self.invalid_by_kind[kind] += n

    def add_results(self, counts: dict[str, int]) -> None:
        with self._lock:
            self.results.update(counts)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self.calls),
                "batches_created": self.counters["batches_created"],
                "requests_seen": self.counters["requests_seen"],
                "messages_created": self.counters["messages_created"],
                "results": {t: self.results[t] for t in _TYPES},
                "cache": {
                    "creations": self.counters["cache_creations"],
                    "reads": self.counters["cache_reads"],
                },
                "auth_failures": self.counters["auth_failures"],
                "faults": {
                    "http_error": self.faults["http_error"],
                    "http_error_by_code": dict(self.http_errors_by_code),
                    "transient_404": self.faults["transient_404"],
                    "cut_stream": self.faults["cut_stream"],
                    "lost_create_response": self.faults["lost_create_response"],
                    "errored": self.faults["errored"],
                    "expired": self.faults["expired"],
                    "invalid_answer": self.faults["invalid_answer"],
                    "invalid_answer_by_kind": dict(self.invalid_by_kind),
                    "description_constraint_broken": self.faults["description_constraint_broken"],
                    "invented_quote": self.faults["invented_quote"],
                },
                "header_rejects": self.counters["header_rejects"],
            }


class PromptCache:
    """Server-global prompt cache: (model, prefix hash) -> expiry, refreshed on every hit."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, float] = {}

    def touch(self, key: str, ttl_seconds: float) -> bool:
        """Record a use of ``key``; True when it was a hit (a live entry existed)."""
        with self._lock:
            now = self._clock()
            expires = self._entries.get(key)
            hit = expires is not None and expires > now
            self._entries[key] = now + ttl_seconds
            if len(self._entries) > 50_000:
                self._entries = {k: v for k, v in self._entries.items() if v > now}
            return hit


@dataclass
class Batch:
    """One message batch and everything the emulator remembers about it."""

    id: str
    seq: int
    created_at: float
    processing_seconds: float
    requests: list[tuple[str, Any]]
    size: int = 0
    status: str = "in_progress"
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    counts: dict[str, int] | None = None
    #: Result lines (JSON + newline), in the stream order, computed once when the batch ends.
    lines: list[bytes] | None = None
    retrieves: int = 0
    downloads: int = 0
    #: The ``anthropic-version``/``anthropic-beta`` of the create call: params are validated
    #: against them when the batch is processed, as the API does.
    api_version: str = API_VERSIONS[-1]
    betas: tuple[str, ...] = ()
    #: Whether some requests are never processed (``expired_rate``): the batch then runs to expiry.
    has_stuck: bool = False
    #: Per request, the key its fault decisions hash (``faults.attempt_key``): the custom_id on
    #: its first appearance in this emulator, ``<custom_id>~N`` when it is sent the Nth time.
    fault_keys: list[str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class ResultsDownload:
    """What one results download sends: all lines, or a cut after ``cut_after`` lines."""

    lines: list[bytes]
    cut_after: int | None = None

    def chunks(self, chunk_lines: int = 256) -> Iterator[bytes]:
        """The body in chunks of many lines: never one giant string, never one write per line."""
        stop = len(self.lines) if self.cut_after is None else min(self.cut_after, len(self.lines))
        for start in range(0, stop, chunk_lines):
            yield b"".join(self.lines[start : min(start + chunk_lines, stop)])
        if self.cut_after is not None and self.cut_after < len(self.lines):
            partial = self.lines[self.cut_after]
            yield partial[: max(1, len(partial) // 2)]


class BatchStore:
    """All batches of one emulator, with the lifecycle rules of the real API."""

    def __init__(self, settings: EmulatorSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.state_file = StateFile(settings.state_path) if settings.state_path else None
        offset = settings.clock_offset_seconds
        if self.state_file is not None:
            offset = max(offset, float(self.state_file.get_meta("clock_offset", 0.0)))
        self.clock = Clock(clock, offset)
        if self.state_file is not None:
            state_file = self.state_file
            self.clock.on_change = lambda value: state_file.set_meta("clock_offset", value)
        self.stats = Stats()
        self.cache = PromptCache(self.clock)
        self.http_faults = HttpFaults(settings.faults)
        self._lock = threading.Lock()
        self._batches: dict[str, Batch] = {}
        self._seq_by_id: dict[str, int] = {}
        self._next_seq = 0
        #: How many created batches carried each custom_id (reruns draw their faults afresh).
        self._sent: dict[str, int] = {}
        if self.state_file is not None:
            self._load()

    # -- persistence -------------------------------------------------------------------------
    _META_FIELDS = (
        "created_at", "processing_seconds", "size", "status", "cancel_initiated_at", "ended_at",
        "counts", "retrieves", "downloads", "api_version", "betas", "has_stuck", "fault_keys",
    )  # fmt: skip

    def _save(self, batch: Batch) -> None:
        """Write one batch to the state file (caller holds ``batch.lock``); no-op without one."""
        if self.state_file is None:
            return
        meta = {name: getattr(batch, name) for name in self._META_FIELDS}
        requests = batch.requests if batch.lines is None else None
        self.state_file.save_batch(batch.id, batch.seq, meta, requests, batch.lines)

    def _load(self) -> None:
        assert self.state_file is not None
        for batch_id, seq, meta, requests, lines, deleted in self.state_file.load():
            self._seq_by_id[batch_id] = seq
            self._next_seq = max(self._next_seq, seq + 1)
            if deleted:
                continue
            meta["betas"] = tuple(meta.get("betas") or ())
            batch = Batch(id=batch_id, seq=seq, requests=requests or [], lines=lines, **meta)
            self._batches[batch_id] = batch
            for key in batch.fault_keys or ():
                custom_id = fault_rules.custom_id_of(key)
                self._sent[custom_id] = self._sent.get(custom_id, 0) + 1

    def close(self) -> None:
        """Release the state file (the in-memory state stays usable for inspection)."""
        if self.state_file is not None:
            self.state_file.close()

    # -- create / read -----------------------------------------------------------------------
    def create(
        self,
        requests: list[tuple[str, Any]],
        base_url: str,
        *,
        api_version: str = API_VERSIONS[-1],
        betas: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Store a validated batch; the response always says ``in_progress``, like the API's."""
        faults = self.settings.faults
        with self._lock:
            keys = []
            for custom_id, _ in requests:
                attempt = self._sent.get(custom_id, 0) + 1
                self._sent[custom_id] = attempt
                keys.append(fault_rules.attempt_key(custom_id, attempt))
            has_stuck = bool(faults.expired_rate) and any(
                fault_rules.request_outcome(faults, key) == "expired" for key in keys
            )
            batch_id = random_id("msgbatch_")
            while batch_id in self._seq_by_id:
                batch_id = random_id("msgbatch_")
            batch = Batch(
                id=batch_id,
                seq=self._next_seq,
                created_at=self.clock(),
                processing_seconds=self.settings.processing_seconds,
                requests=requests,
                size=len(requests),
                api_version=api_version,
                betas=betas,
                has_stuck=has_stuck,
                fault_keys=keys,
            )
            self._next_seq += 1
            self._batches[batch_id] = batch
            self._seq_by_id[batch_id] = batch.seq
        self.stats.add("batches_created")
        self.stats.add("requests_seen", len(requests))
        with batch.lock:
            self._save(batch)
            return self._render(batch, base_url)

    def _get(self, batch_id: str) -> Batch:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No message batch found with id {batch_id!r}")
        return batch

    def retrieve(self, batch_id: str, base_url: str) -> dict[str, Any]:
        """The batch as it is now (advancing its lifecycle first)."""
        batch = self._get(batch_id)
        with batch.lock:
            if batch.retrieves < self.settings.faults.transient_404_after_create:
                # Eventual consistency right after create: the batch is not visible yet.
                batch.retrieves += 1
                self.stats.fault("transient_404")
                raise ApiError(404, f"No message batch found with id {batch_id!r}")
            batch.retrieves += 1
            self._advance(batch)
            return self._render(batch, base_url)

    def list(
        self, *, limit: int, after_id: str | None, before_id: str | None, base_url: str
    ) -> dict[str, Any]:
        """One page, newest first, with the API's cursor semantics.

        ``after_id`` pages towards older batches, ``before_id`` towards newer ones and returns
        the ``limit`` batches right next to the cursor. Cursors stay valid after a delete.

        A batch still inside its ``transient_404_after_create`` window is not listed either (it
        is not visible anywhere yet). Under ``processing_retrieves`` a listed batch counts one
        status read, as a retrieve does: a wait that polls by listing sees it end the same way.
        """
        hidden = self.settings.faults.transient_404_after_create
        with self._lock:
            newest_first = [b for b in reversed(self._batches.values()) if b.retrieves >= hidden]
            cursor = after_id if after_id is not None else before_id
            cursor_seq = self._seq_by_id.get(cursor) if cursor is not None else None
        if cursor is None:
            candidates = newest_first
            page = candidates[:limit]
        elif cursor_seq is None:
            name = "after_id" if after_id is not None else "before_id"
            raise ApiError(400, f"{name}: no message batch with id {cursor!r}")
        elif after_id is not None:
            candidates = [b for b in newest_first if b.seq < cursor_seq]
            page = candidates[:limit]
        else:
            candidates = [b for b in newest_first if b.seq > cursor_seq]
            page = candidates[-limit:]
        data = []
        for batch in page:
            with batch.lock:
                if self.settings.processing_retrieves is not None and batch.status == "in_progress":
                    batch.retrieves += 1
                self._advance(batch)
                data.append(self._render(batch, base_url))
        return {
            "data": data,
            "has_more": len(candidates) > len(page),
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }

    def cancel(self, batch_id: str, base_url: str) -> dict[str, Any]:
        """Start canceling an in-progress batch; an ended or canceling one is returned unchanged."""
        batch = self._get(batch_id)
        with batch.lock:
            self._advance(batch)
            if batch.status == "in_progress":
                batch.status = "canceling"
                batch.cancel_initiated_at = self.clock()
                self._save(batch)
            return self._render(batch, base_url)

    def delete(self, batch_id: str) -> dict[str, Any]:
        """Forget an ended batch (its id stays usable as a list cursor)."""
        batch = self._get(batch_id)
        with batch.lock:
            self._advance(batch)
            if batch.status != "ended":
                raise ApiError(
                    400,
                    f"Message batch {batch_id} is still {batch.status} and cannot be deleted; "
                    "cancel it and wait for it to end first",
                )
        with self._lock:
            self._batches.pop(batch_id, None)
        if self.state_file is not None:
            self.state_file.mark_deleted(batch_id)
        return {"id": batch_id, "type": "message_batch_deleted"}

    def open_results(self, batch_id: str) -> ResultsDownload:
        """The results of an ended batch, cut short for the first downloads when configured."""
        batch = self._get(batch_id)
        with batch.lock:
            self._advance(batch)
            if batch.status != "ended" or batch.lines is None:
                raise ApiError(
                    400,
                    f"Message batch {batch_id} has not finished processing (status {batch.status}); "
                    "results are available once it has ended",
                )
            faults = self.settings.faults
            download = batch.downloads
            batch.downloads += 1
            if faults.cut_results_after is not None and download < faults.cut_results_times:
                self.stats.fault("cut_stream")
                return ResultsDownload(batch.lines, cut_after=faults.cut_results_after)
            return ResultsDownload(batch.lines)

    # -- synchronous Messages API ------------------------------------------------------------
    def _problem(
        self, params: Any, endpoint: str, api_version: str, betas: tuple[str, ...]
    ) -> Problem | None:
        rules: dict[str, Any] = {
            "api_version": api_version,
            "betas": betas,
            "known_models": self.settings.known_models,
            "endpoint": endpoint,
        }
        shared = model.shared_prompt(params) if isinstance(params, dict) else None
        if shared is None:
            return validate_request(params, **rules)
        key = (endpoint, api_version, betas, self.settings.known_models)

        def prefix_problem() -> Problem | None:
            # The verdict on the shared part, once per prompt shape and rules.
            if key not in shared.problems:
                shared.problems[key] = validate_request(prefix_params(shared.params), **rules)
            problem: Problem | None = shared.problems[key]
            return problem

        return validate_shared(params, prefix_problem, **rules)

    def count_tokens(
        self, params: Any, *, api_version: str = API_VERSIONS[-1], betas: tuple[str, ...] = ()
    ) -> int:
        """Input tokens of a request, with the same estimator as batch usage."""
        problem = self._problem(params, "count_tokens", api_version, betas)
        if problem:
            raise ApiError(problem.status, problem.message, error_type=problem.error_type)
        return model.account_prompt(params).total_tokens

    def create_message(
        self, params: Any, *, api_version: str = API_VERSIONS[-1], betas: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """``POST /v1/messages``: the Message a batch request with these params would get."""
        problem = self._problem(params, "messages", api_version, betas)
        if problem:
            raise ApiError(problem.status, problem.message, error_type=problem.error_type)
        if params.get("stream"):
            raise ApiError(400, "stream: streaming responses are not supported by the emulator")
        key = model.stable_token(16, _dumps(params))
        faults = self.settings.faults
        kind = None
        if fault_rules.is_invalid_answer(faults, key):
            kind = faults.invalid_kinds[
                model.stable_hash(faults.seed, key, "invalid_kind") % len(faults.invalid_kinds)
            ]
        message = self._message(params, key, kind, random_id("msg_"), "standard")
        self.stats.add("messages_created")
        return message

    # -- lifecycle ---------------------------------------------------------------------------
    def _advance(self, batch: Batch) -> None:
        """End the batch if its time has come (caller holds ``batch.lock``)."""
        if batch.status == "ended":
            return
        now = self.clock()
        if batch.status == "in_progress":
            expiry = batch.created_at + EXPIRY_SECONDS
            if self.settings.processing_retrieves is not None:
                if batch.retrieves >= self.settings.processing_retrieves and not batch.has_stuck:
                    self._finish(batch, now)
                elif now >= expiry:
                    self._finish(batch, expiry, expiring=True)
                return
            end = batch.created_at + batch.processing_seconds
            if now >= end and not batch.has_stuck and end < expiry:
                self._finish(batch, end)
            elif now >= expiry:
                self._finish(batch, expiry, expiring=True)
        elif batch.status == "canceling":
            assert batch.cancel_initiated_at is not None
            end = batch.cancel_initiated_at + self.settings.cancel_seconds
            if now >= end:
                self._finish(batch, end)

    def _done_by(self, batch: Batch, index: int, at: float) -> bool:
        """Requests complete evenly over the processing window; was request ``index`` done at ``at``?"""
        if self.settings.processing_retrieves is not None:
            # Retrieve-driven batches have no timeline: done only once enough retrieves happened
            # (and never before a cancel).
            return batch.cancel_initiated_at is None and batch.retrieves >= self.settings.processing_retrieves
        if batch.processing_seconds <= 0:
            return True
        done_at = batch.created_at + batch.processing_seconds * (index + 1) / batch.size
        return done_at <= at

    def _finish(self, batch: Batch, ended_at: float, *, expiring: bool = False) -> None:
        """Compute the results file once. ``expiring``: the batch reached its 24 h expiry."""
        faults = self.settings.faults
        counts = dict.fromkeys(_TYPES, 0)
        keyed: list[tuple[int, bytes]] = []
        invalid_seen = 0
        canceled_at = batch.cancel_initiated_at
        fault_keys = batch.fault_keys or [custom_id for custom_id, _ in batch.requests]
        for index, (custom_id, params) in enumerate(batch.requests):
            fault_key = fault_keys[index]
            outcome = fault_rules.request_outcome(faults, fault_key)
            unprocessed = outcome == "expired"  # the backend never gets to it
            if canceled_at is not None and (unprocessed or not self._done_by(batch, index, canceled_at)):
                result: dict[str, Any] = {"type": "canceled"}
            elif expiring and (unprocessed or not self._done_by(batch, index, ended_at)):
                result = {"type": "expired"}
                self.stats.fault("expired")
            else:
                problem = self._problem(params, "batch", batch.api_version, batch.betas)
                if problem:
                    result = _errored(problem.error_type, problem.message)
                elif outcome == "errored":
                    error_type = fault_rules.errored_type(faults, fault_key)
                    message = "Internal server error" if error_type == "api_error" else "Overloaded"
                    result = _errored(error_type, message)
                    self.stats.fault("errored")
                else:
                    kind = None
                    if fault_rules.is_invalid_answer(faults, fault_key) and (
                        model.output_schema(params) is not None or model.forced_tool(params) is not None
                    ):
                        kind = faults.invalid_kinds[invalid_seen % len(faults.invalid_kinds)]
                        invalid_seen += 1
                    message_id = "msg_01" + model.stable_token(22, batch.id, custom_id)
                    msg = self._message(
                        params, f"{batch.id}:{custom_id}", kind, message_id, "batch", fault_key=fault_key
                    )
                    result = {"type": "succeeded", "message": msg}
            counts[result["type"]] += 1
            line = _dumps({"custom_id": custom_id, "result": result}).encode("utf-8", "surrogatepass") + b"\n"
            keyed.append((fault_rules.result_order_key(faults, custom_id), line))
        order = sorted(range(len(keyed)), key=lambda i: keyed[i][0])
        if len(order) > 1 and order == sorted(order):
            order = order[1:] + order[:1]  # never the request order, even by chance
        batch.lines = [keyed[i][1] for i in order]
        batch.counts = counts
        batch.requests = []  # the params are not needed any more; the lines are the results file
        batch.status = "ended"
        batch.ended_at = ended_at
        self.stats.add_results(counts)
        self._save(batch)

    def _message(
        self,
        params: dict[str, Any],
        id_seed: str,
        invalid_kind: str | None,
        message_id: str,
        tier: str,
        *,
        fault_key: str | None = None,
    ) -> dict[str, Any]:
        answer = model.build_answer(
            params,
            invalid_kind=invalid_kind,
            id_seed=id_seed,
            fault_key=f"{self.settings.faults.seed}:{fault_key if fault_key is not None else id_seed}",
            description_break_rate=self.settings.faults.description_break_rate,
            invented_quote_rate=self.settings.faults.invented_quote_rate,
        )
        if answer.invalid_kind is not None:
            self.stats.fault("invalid_answer", kind=answer.invalid_kind)
        if answer.broken_hints:
            self.stats.fault("description_constraint_broken", answer.broken_hints)
        if answer.invented_quotes:
            self.stats.fault("invented_quote", answer.invented_quotes)
        accounting = model.account_prompt(params)
        creation = read = 0
        if (
            accounting.cache_key is not None
            and accounting.cache_prefix_tokens >= self.settings.min_cache_tokens
        ):
            if self.cache.touch(
                f"{params.get('model')}:{accounting.cache_key}", accounting.cache_ttl_seconds
            ):
                read = accounting.cache_prefix_tokens
                self.stats.add("cache_reads")
            else:
                creation = accounting.cache_prefix_tokens
                self.stats.add("cache_creations")
        usage = model.usage_dict(
            input_tokens=accounting.total_tokens - creation - read,
            output_tokens=answer.output_tokens,
            cache_creation=creation,
            cache_read=read,
            cache_ttl_seconds=accounting.cache_ttl_seconds,
            service_tier=tier,
        )
        return model.build_message(params, answer, usage, message_id)

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, batch: Batch, base_url: str) -> dict[str, Any]:
        ended = batch.status == "ended"
        counts = batch.counts if ended and batch.counts is not None else None
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": {
                "processing": 0 if counts else batch.size,
                "succeeded": counts["succeeded"] if counts else 0,
                "errored": counts["errored"] if counts else 0,
                "canceled": counts["canceled"] if counts else 0,
                "expired": counts["expired"] if counts else 0,
            },
            "ended_at": rfc3339(batch.ended_at),
            "created_at": rfc3339(batch.created_at),
            "expires_at": rfc3339(batch.created_at + _EXPIRY_SECONDS),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(batch.cancel_initiated_at),
            "results_url": f"{base_url}v1/messages/batches/{batch.id}/results" if ended else None,
        }


def _errored(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "errored", "error": error_body(error_type, message, new_request_id())}

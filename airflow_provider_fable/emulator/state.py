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

import gc
import itertools
import json
import logging
import multiprocessing
import os
import re
import tempfile
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson

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
    last_message_problem,
    prefix_params,
    validate_request,
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

log = logging.getLogger(__name__)


def rfc3339(ts: float | None) -> str | None:
    """Timestamps the way the API writes them (UTC, ``Z`` suffix)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


#: Bodies from this size on are decoded with the cyclic garbage collector out of the way.
_LARGE_BODY = 4 * 1024 * 1024


@contextmanager
def _gc_paused(size: int) -> Iterator[None]:
    """Keep the cyclic garbage collector off a large decoded body.

    A 100,000-request create body decodes into millions of dicts and lists. With the
    collector on, each allocation burst re-scans everything decoded so far (decoding a 97 MB
    body: 5.5 s instead of 1.0 s), and afterwards every young-generation collection scans the
    whole body again until it has aged into the old generation (3 s more per create). So the
    collector is paused while decoding, and the decoded objects are then frozen
    (``gc.freeze``: moved out of all generations). Decoded JSON has no reference cycles, and
    frozen objects are still freed by reference counting when the batch lets go of them; the
    only cost is that cyclic garbage existing at that moment is never collected, which in an
    emulator process is negligible.
    """
    if size < _LARGE_BODY:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if was_enabled:
            gc.enable()


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body, answering 400 like the API when it is not JSON.

    orjson first (several times faster on 100 MB bodies); anything it refuses (not UTF-8,
    NaN, lone surrogates, huge integers, invalid JSON) is decoded by ``json`` again, so what
    is accepted and the error message are the standard library's, as before.
    """
    with _gc_paused(len(raw)):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
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
    fast = _envelope_fast(requests)
    if fast is not None:
        if len(raw) >= _LARGE_BODY:
            _share_equal_values([params for _, params in fast])
        return fast
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


_ID_CHARS_RE = re.compile(r"[a-zA-Z0-9_\n-]*")


def _envelope_fast(requests: list[Any]) -> list[tuple[str, Any]] | None:
    """The (custom_id, params) pairs when every request passes the envelope checks, else None.

    A 100,000-request create is checked in bulk: exact types, two keys each, every custom_id
    in one pass of a regex over them all (newline-joined, so a newline inside an id shows as
    a count mismatch) plus their lengths, duplicates by set size. Any failure returns None and
    the request-by-request loop finds the first problem and its message, as before.
    """
    try:
        ids = [item["custom_id"] for item in requests]
        params = [item["params"] for item in requests]
    except (KeyError, TypeError, IndexError):
        return None
    if not (
        all(type(item) is dict and len(item) == 2 for item in requests)
        and all(type(c) is str for c in ids)
        and all(type(p) is dict for p in params)
    ):
        return None
    joined = "\n".join(ids)
    if (
        joined.count("\n") != len(ids) - 1
        or _ID_CHARS_RE.fullmatch(joined) is None
        or min(map(len, ids)) < 1
        or max(map(len, ids)) > 64
        or len(set(ids)) != len(ids)
    ):
        return None
    return list(zip(ids, params, strict=True))


def _share_equal_values(params_list: list[dict[str, Any]]) -> None:
    """Make the requests of a create share one copy of each value they carry equal copies of.

    A batch is built from one template: every request repeats the same schema, system prompt,
    tools and few-shot turns, and decoding gives each its own copy (4.3 KB of objects a request
    for bench/end_to_end.py's prompt: 430 MB held per 100,000-request batch until it ends).
    Equal values (same JSON) are replaced by the first one seen; only the last message, the
    record, stays each request's own. Nothing in the emulator modifies params, so sharing is
    invisible; the batch then holds ~1 KB a request.
    """
    table: dict[tuple[str, bytes | str], Any] = {}
    ints: dict[tuple[str, int], int] = {}

    def shared(key: str, value: Any) -> Any:
        if isinstance(value, str):
            return table.setdefault((key, value), value)
        if type(value) is int:
            # 1024 is a new object in every request: one object lets the end of the batch tell
            # the requests of one prompt shape by identity (``model.shared_prompt``).
            return ints.setdefault((key, value), value)
        if not isinstance(value, (dict, list)):
            return value
        try:
            return table.setdefault((key, orjson.dumps(value)), value)
        except (TypeError, orjson.JSONEncodeError):
            return value

    for params in params_list:
        for key, value in params.items():
            if key != "messages":
                params[key] = shared(key, value)
            elif isinstance(value, list):
                for i in range(len(value) - 1):  # the few-shot turns; the last one is the record
                    value[i] = shared("message", value[i])


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
    #: Result lines held in memory (JSON + newline, stream order): only when set explicitly
    #: (a state file's batch, a test rewriting what is served) or read through ``lines``.
    line_list: list[bytes] | None = None
    #: The results file on disk, written once, in stream order, from the moment the batch ends.
    results: ResultsFile | None = None
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

    @property
    def lines(self) -> list[bytes] | None:
        """All result lines as a list (None before the end), for inspection: the served stream
        reads the results file instead, unless lines were set here (then they are served)."""
        if self.line_list is None and self.results is not None:
            self.line_list = self.results.all_lines()
        return self.line_list

    @lines.setter
    def lines(self, value: list[bytes] | None) -> None:
        self.line_list = value


#: Results come in windows of this many requests, in request order, shuffled within each
#: window: the answers of a window can be written as soon as the batch end has decided it
#: (a batch of up to this size is shuffled as a whole).
_ORDER_WINDOW = 1000


def _stream_order(window: list[tuple[int, int, Any]]) -> list[Any]:
    """The jobs of one window, (order key, request index, job), in the order they are served:
    by order key, never the request order, even by chance."""
    window.sort(key=lambda item: item[0])
    if len(window) > 1 and all(window[i][1] < window[i + 1][1] for i in range(len(window) - 1)):
        window = window[1:] + window[:1]
    return [job for _, _, job in window]


class _JobFeed:
    """A batch's jobs in stream order, handed from the batch end (``put``) to the thread that
    answers them (``parts``) while the rest of the batch is still being decided."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: list[Any] = []
        self._closed = False
        self._error: BaseException | None = None

    def put(self, jobs: list[Any]) -> None:
        with self._cond:
            self._jobs.extend(jobs)
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        """No more jobs; with ``error``, the batch end failed and the generation must too."""
        with self._cond:
            self._closed = True
            self._error = error
            self._cond.notify_all()

    def parts(self, size: int) -> Iterator[list[Any]]:
        """The jobs in chunks of ``size`` (the last one shorter), each as soon as it is decided."""
        taken = 0
        while True:
            with self._cond:
                while len(self._jobs) - taken < size and not self._closed:
                    self._cond.wait()
                if self._error is not None:
                    raise RuntimeError("the batch end failed") from self._error
                end = min(taken + size, len(self._jobs))
                part = self._jobs[taken:end]
                self._jobs[taken:end] = [b""] * (end - taken)  # dropped here once handed over
            if not part:
                return
            taken = end
            yield part


class _CacheUses:
    """The prompt-cache touches of one batch end, in request order (``BatchStore._usage_of``).

    Up to 100,000 requests share a prefix: the first touch of each (prefix, TTL) goes to the
    cache, the later ones are reads without its lock; ``done`` counts the reads and writes and
    touches every prefix once more, in the order of their last use, so each entry ends with
    the expiry the last request of the batch gave it, as per-request touches would.
    """

    __slots__ = ("cache", "creations", "reads", "used")

    def __init__(self, cache: PromptCache) -> None:
        self.cache = cache
        self.used: dict[tuple[str, float], None] = {}
        self.reads = 0
        self.creations = 0

    def touch(self, key: str, ttl: float) -> bool:
        pair = (key, ttl)
        if pair in self.used:
            del self.used[pair]  # re-inserted last: the last use decides the final expiry
            hit = True
        else:
            hit = self.cache.touch(key, ttl)
        self.used[pair] = None
        if hit:
            self.reads += 1
        else:
            self.creations += 1
        return hit

    def done(self, stats: Stats) -> None:
        if self.reads:
            stats.add("cache_reads", self.reads)
        if self.creations:
            stats.add("cache_creations", self.creations)
        for key, ttl in self.used:
            self.cache.touch(key, ttl)


class ResultsFile:
    """One batch's results file: an unnamed temporary file, appended once, read by any download.

    The lines are generated after the batch ends (in a background thread) and written in the
    order they are served; a download streams what exists and waits for the rest, so the first
    lines go out while later answers are still being generated, and no download ever holds the
    whole file in memory. Only the end offset of each line is kept (8 bytes a line).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._file = tempfile.TemporaryFile(prefix="fable-emulator-results-")
        self._fd = self._file.fileno()
        self._ends = array("q")
        self._size = 0
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    @classmethod
    def of_lines(cls, lines: list[bytes]) -> ResultsFile:
        results = cls(len(lines))
        results.append(lines)
        results.finish()
        return results

    def append(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        view = memoryview(data)
        offset = self._size
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        ends = array("q")
        end = self._size
        for line in lines:
            end += len(line)
            ends.append(end)
        with self._cond:
            self._ends.extend(ends)
            self._size = end
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    def wait_for(self, count: int) -> int:
        """Block until ``count`` lines exist (or the file is complete); returns how many exist."""
        with self._cond:
            while len(self._ends) < count and not self._done:
                self._cond.wait()
            if self._error is not None and len(self._ends) < count:
                raise RuntimeError("the emulator failed to generate this batch's results") from self._error
            return len(self._ends)

    def read(self, start: int, stop: int) -> bytes:
        """Lines ``start`` to ``stop`` (already written) as one bytes object."""
        if stop <= start:
            return b""
        begin = self._ends[start - 1] if start else 0
        return os.pread(self._fd, self._ends[stop - 1] - begin, begin)

    def all_lines(self) -> list[bytes]:
        self.wait_for(self.total)
        data = self.read(0, len(self._ends))
        out, begin = [], 0
        for end in self._ends:
            out.append(data[begin:end])
            begin = end
        return out

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class ResultsDownload:
    """What one results download sends: all lines, or a cut after ``cut_after`` lines.

    ``source`` is the batch's results file (streamed while it is still being written) or a
    list of lines set in memory.
    """

    source: ResultsFile | list[bytes]
    cut_after: int | None = None

    def chunks(self, chunk_lines: int = 256) -> Iterator[bytes]:
        """The body in chunks of many lines: never one giant string, never one write per line."""
        source = self.source
        if isinstance(source, list):
            total = len(source)

            def read(start: int, stop: int) -> bytes:
                return b"".join(source[start:stop])

            def wait_for(count: int) -> int:
                return total
        else:
            total, read, wait_for = source.total, source.read, source.wait_for
        stop = total if self.cut_after is None else min(self.cut_after, total)
        start = 0
        while start < stop:
            end = min(wait_for(min(start + chunk_lines, stop)), start + chunk_lines, stop)
            yield read(start, end)
            start = end
        if self.cut_after is not None and self.cut_after < total:
            wait_for(self.cut_after + 1)
            partial = read(self.cut_after, self.cut_after + 1)
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
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        #: large batches waiting for their answers, in end order (``_queue_generation``)
        self._generation_queue: deque[tuple[ResultsFile, _JobFeed]] = deque()
        self._generation_lock = threading.Lock()
        self._generation_thread: threading.Thread | None = None
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
            batch = Batch(id=batch_id, seq=seq, requests=requests or [], line_list=lines, **meta)
            self._batches[batch_id] = batch
            for key in batch.fault_keys or ():
                custom_id = fault_rules.custom_id_of(key)
                self._sent[custom_id] = self._sent.get(custom_id, 0) + 1

    def close(self) -> None:
        """Release the state file and the answer workers (the in-memory state stays usable)."""
        if self.state_file is not None:
            self.state_file.close()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

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
        if self.state_file is None and len(requests) >= self.settings.generation_min_batch:
            self._start_workers()
        with batch.lock:
            self._save(batch)
            return self._render(batch, base_url)

    def _start_workers(self) -> None:
        """Start the answer workers while a large batch is processing, not when it ends: each
        takes ~0.5 s to start (a new interpreter importing the emulator)."""
        if not self.generation_workers or self._pool is not None:
            return

        def start() -> None:
            pool = self._worker_pool()
            for _ in range(self.generation_workers):
                pool.submit(model.worker_ready)

        threading.Thread(target=start, name="answer-workers-start", daemon=True).start()

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
            if batch.status != "ended" or (batch.line_list is None and batch.results is None):
                raise ApiError(
                    400,
                    f"Message batch {batch_id} has not finished processing (status {batch.status}); "
                    "results are available once it has ended",
                )
            faults = self.settings.faults
            download = batch.downloads
            batch.downloads += 1
            source: ResultsFile | list[bytes] = (
                batch.line_list if batch.line_list is not None else batch.results  # type: ignore[assignment]
            )
            if faults.cut_results_after is not None and download < faults.cut_results_times:
                self.stats.fault("cut_stream")
                return ResultsDownload(source, cut_after=faults.cut_results_after)
            return ResultsDownload(source)

    # -- synchronous Messages API ------------------------------------------------------------
    def _problem(
        self, params: Any, endpoint: str, api_version: str, betas: tuple[str, ...]
    ) -> Problem | None:
        return self._checker(endpoint, api_version, betas)(params)

    def _checker(
        self, endpoint: str, api_version: str, betas: tuple[str, ...]
    ) -> Callable[[Any], Problem | None]:
        """The params check of one endpoint, version and betas: the rules are built once and
        reused for every request of a batch (its end checks up to 100,000 in a row)."""
        rules: dict[str, Any] = {
            "api_version": api_version,
            "betas": betas,
            "known_models": self.settings.known_models,
            "endpoint": endpoint,
        }
        key = (endpoint, api_version, betas, self.settings.known_models)

        def check(params: Any) -> Problem | None:
            # ``validate_shared`` with the verdict on the shared part (once per prompt shape and
            # rules) looked up here: a request's own work is its last message.
            shared = model.shared_prompt(params) if isinstance(params, dict) else None
            if shared is None:
                return validate_request(params, **rules)
            problems = shared.problems
            if key not in problems:
                problems[key] = validate_request(prefix_params(shared.params), **rules)
            if problems[key] is not None:
                return validate_request(params, **rules)
            return last_message_problem(params["messages"])

        return check

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
        """End the batch: decide every request's outcome now, generate the answers after.

        What a client can see at the end is decided here, in request order, as the API's
        backend processes them: each request's outcome (canceled, expired, errored by the
        params check or a fault, succeeded), the counts, which requests get a broken answer
        (kinds in turn) and the prompt cache's writes and reads. The answers themselves are
        pure functions of each request, so they are generated in stream order into the results
        file by a background thread (inline, afterwards, with a state file, which must hold
        them), starting with the first window of requests decided here (``_ORDER_WINDOW``):
        the answer workers are busy while the rest of the batch is decided, the retrieve that
        ends a 100,000-request batch returns once every outcome is known, and the first result
        lines stream while the rest are generated. ``expiring``: the 24 h expiry.
        """
        faults = self.settings.faults
        counts = dict.fromkeys(_TYPES, 0)
        fault_keys = batch.fault_keys or [custom_id for custom_id, _ in batch.requests]
        check = self._checker("batch", batch.api_version, batch.betas)
        uses = _CacheUses(self.cache)
        order_keys = fault_rules.result_order_keys(faults, [custom_id for custom_id, _ in batch.requests])
        results = ResultsFile(len(batch.requests))
        feed = _JobFeed()
        if self.state_file is None:
            # Answering starts with the first decided window, while the end decides the rest.
            if len(batch.requests) >= self.settings.generation_min_batch:
                self._queue_generation(results, feed)
            else:
                threading.Thread(
                    target=self._generate, args=(results, feed), name=f"results-{batch.id}", daemon=True
                ).start()
        try:
            self._decide(batch, ended_at, expiring, check, uses, order_keys, fault_keys, feed, counts)
        except BaseException as exc:
            feed.close(exc)
            raise
        feed.close()
        uses.done(self.stats)
        batch.results = results
        batch.line_list = None
        batch.counts = counts
        batch.requests = []  # the params live on in the jobs until their answers are written
        batch.status = "ended"
        batch.ended_at = ended_at
        self.stats.add_results(counts)
        if self.state_file is not None:
            self._generate(results, feed)  # the state file stores the whole results file
            self._save(batch)

    def _decide(
        self,
        batch: Batch,
        ended_at: float,
        expiring: bool,
        check: Callable[[Any], Problem | None],
        uses: _CacheUses,
        order_keys: list[int],
        fault_keys: list[str],
        feed: _JobFeed,
        counts: dict[str, int],
    ) -> None:
        """``_finish``'s pass over the requests, in request order: each one's outcome and job,
        fed to the generation one order window at a time (``_ORDER_WINDOW``)."""
        faults = self.settings.faults
        canceled_at = batch.cancel_initiated_at
        invalid_seen = 0
        window: list[tuple[int, int, bytes | model.AnswerJob]] = []
        for index, (custom_id, params) in enumerate(batch.requests):
            fault_key = fault_keys[index]
            outcome = fault_rules.request_outcome(faults, fault_key)
            unprocessed = outcome == "expired"  # the backend never gets to it
            job: bytes | model.AnswerJob
            if canceled_at is not None and (unprocessed or not self._done_by(batch, index, canceled_at)):
                kind_of, result = "canceled", {"type": "canceled"}
            elif expiring and (unprocessed or not self._done_by(batch, index, ended_at)):
                kind_of, result = "expired", {"type": "expired"}
                self.stats.fault("expired")
            else:
                problem = check(params)
                if problem:
                    kind_of, result = "errored", _errored(problem.error_type, problem.message)
                elif outcome == "errored":
                    error_type = fault_rules.errored_type(faults, fault_key)
                    message = "Internal server error" if error_type == "api_error" else "Overloaded"
                    kind_of, result = "errored", _errored(error_type, message)
                    self.stats.fault("errored")
                else:
                    kind = None
                    if fault_rules.is_invalid_answer(faults, fault_key) and (
                        model.output_schema(params) is not None or model.forced_tool(params) is not None
                    ):
                        kind = faults.invalid_kinds[invalid_seen % len(faults.invalid_kinds)]
                        invalid_seen += 1
                    kind_of, result = "succeeded", None
                    job = model.AnswerJob(
                        custom_id, params, batch.id, kind, f"{faults.seed}:{fault_key}",
                        self._usage_of(params, "batch", uses), model.shared_prompt(params),
                    )  # fmt: skip
            if result is not None:
                job = _line({"custom_id": custom_id, "result": result})
            counts[kind_of] += 1
            window.append((order_keys[index], index, job))
            if len(window) == _ORDER_WINDOW:
                feed.put(_stream_order(window))
                window = []
        if window:
            feed.put(_stream_order(window))

    def _queue_generation(self, results: ResultsFile, jobs: _JobFeed) -> None:
        """Answer a large batch after the large batches that ended before it, one at a time.

        A 1M-record job ends ten 100,000-request batches within seconds of each other. Answered
        side by side (a thread each), all ten would finish near the end, every download waiting
        on all of them, and ten CPU-bound threads would starve the HTTP side of the GIL. In end
        order the first batch's results are complete after a tenth of the time, so its download
        and load run while the others are answered. Small batches keep their own thread: they
        never wait behind a large one.
        """
        with self._generation_lock:
            self._generation_queue.append((results, jobs))
            if self._generation_thread is None:
                self._generation_thread = threading.Thread(
                    target=self._drain_generation, name="results-queue", daemon=True
                )
                self._generation_thread.start()

    def _drain_generation(self) -> None:
        while True:
            with self._generation_lock:
                if not self._generation_queue:
                    self._generation_thread = None
                    return
                results, jobs = self._generation_queue.popleft()
            try:
                self._generate(results, jobs)
            except BaseException:  # noqa: BLE001,S112 - logged and reported to its downloads by _generate
                continue

    def _generate(self, results: ResultsFile, jobs: _JobFeed, chunk: int = 2000) -> None:
        """Write the result lines of ``jobs`` in order, answering the succeeded ones.

        Large batches are answered by worker processes (``generation_workers``), a few chunks
        ahead of the writer, results taken in order; small ones here. Chunks are taken from
        the feed as the batch end decides them, and each job's params are dropped as soon as
        it is handed over.
        """
        faults = self.settings.faults
        rates = (faults.description_break_rate, faults.invented_quote_rate)
        workers = self.generation_workers
        try:
            large = results.total >= self.settings.generation_min_batch
            pool = self._worker_pool() if workers and large else None
            parts = jobs.parts(chunk)
            if pool is not None:
                pending: deque[Future[tuple[list[bytes], list[model.JobCounts]]]] = deque()
                for part in itertools.islice(parts, 2 * workers):
                    pending.append(pool.submit(model.answer_packed, model.pack_jobs(part), *rates))
                while pending:
                    lines, counts = pending.popleft().result()
                    following = next(parts, None)
                    if following is not None:
                        pending.append(pool.submit(model.answer_packed, model.pack_jobs(following), *rates))
                    self._count_answers(counts)
                    results.append(lines)
            else:
                for part in parts:
                    lines, counts = model.answer_lines(part, *rates)
                    self._count_answers(counts)
                    results.append(lines)
        except BaseException as exc:  # noqa: BLE001 - reported to every download waiting for lines
            log.exception("generating the results of a batch failed")
            results.finish(exc)
            raise
        results.finish()

    def _count_answers(self, counts: list[model.JobCounts]) -> None:
        for kind, broken_hints, invented_quotes in counts:
            if kind is not None:
                self.stats.fault("invalid_answer", kind=kind)
            if broken_hints:
                self.stats.fault("description_constraint_broken", broken_hints)
            if invented_quotes:
                self.stats.fault("invented_quote", invented_quotes)

    @property
    def generation_workers(self) -> int:
        """How many worker processes answer large batches (``generation_workers``, None: auto).

        Automatic: every CPU this process may run on, up to 4, when there are at least two (a
        batch's answers are pure functions of its requests and spread evenly over processes;
        the emulator's own process keeps the HTTP side responsive meanwhile), else none.
        """
        configured = self.settings.generation_workers
        if configured is not None:
            return configured
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        return min(cpus, 4) if cpus >= 2 else 0

    def _worker_pool(self) -> ProcessPoolExecutor:
        """The answer workers, started on first use (``spawn``: safe in a threaded server)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.generation_workers,
                    mp_context=multiprocessing.get_context("spawn"),
                )
            return self._pool

    def _usage(self, params: dict[str, Any], tier: str) -> dict[str, Any]:
        """Input-token usage of a request, reading or writing the prompt cache (in processing order)."""
        input_tokens, creation, read, ttl, tier = self._usage_of(params, tier)
        return {
            "input_tokens": input_tokens,
            "cache_creation": creation,
            "cache_read": read,
            "cache_ttl_seconds": ttl,
            "service_tier": tier,
        }

    def _usage_of(
        self, params: dict[str, Any], tier: str, uses: _CacheUses | None = None
    ) -> tuple[int, int, int, float, str]:
        """``_usage`` as (input tokens, cache creation, cache read, cache TTL, tier).

        ``uses`` (the end of one batch): the prompt cache is touched once per prefix and TTL;
        the later requests with that prefix read what the first one wrote (the clock does not
        move while a batch ends, so a real touch would find it live). ``_CacheUses.done``
        counts them and refreshes the entries once the batch is decided.
        """
        accounting = model.account_prompt(params)
        creation = read = 0
        if (
            accounting.cache_key is not None
            and accounting.cache_prefix_tokens >= self.settings.min_cache_tokens
        ):
            key = f"{params.get('model')}:{accounting.cache_key}"
            ttl = accounting.cache_ttl_seconds
            hit = self.cache.touch(key, ttl) if uses is None else uses.touch(key, ttl)
            if uses is None:
                self.stats.add("cache_reads" if hit else "cache_creations")
            if hit:
                read = accounting.cache_prefix_tokens
            else:
                creation = accounting.cache_prefix_tokens
        return (accounting.total_tokens - creation - read, creation, read, accounting.cache_ttl_seconds, tier)

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
        usage = self._usage(params, tier)
        faults = self.settings.faults
        answer = model.build_answer(
            params,
            invalid_kind=invalid_kind,
            id_seed=id_seed,
            fault_key=f"{faults.seed}:{fault_key if fault_key is not None else id_seed}",
            description_break_rate=faults.description_break_rate,
            invented_quote_rate=faults.invented_quote_rate,
        )
        self._count_answers([(answer.invalid_kind, answer.broken_hints, answer.invented_quotes)])
        usage = model.usage_dict(output_tokens=answer.output_tokens, **usage)
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


def _line(obj: dict[str, Any]) -> bytes:
    return model.result_line(obj)


def _errored(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "errored", "error": error_body(error_type, message, new_request_id())}

"""FableHook: an Airflow connection turned into configured anthropic clients, plus every
Message Batches endpoint and count_tokens, sync and async.

The clients always get an explicit ``api_key`` and ``base_url`` so nothing from the worker's
environment (``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``, a developer's SDK profile) can leak
into a task and bill the wrong account. SDK errors are re-raised as :class:`FableApiError` with a
message that says which call failed and what to check; the API key never appears in them.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.sdk import BaseHook

from airflow_provider_fable.core.results import BatchResult, parse_result_line_or_bad
from airflow_provider_fable.exceptions import BatchCreateUncertainError as BatchCreateUncertainError
from airflow_provider_fable.exceptions import FableApiError as FableApiError
from airflow_provider_fable.exceptions import FableConfigError as FableConfigError
from airflow_provider_fable.exceptions import ResultsIncompleteError as ResultsIncompleteError
from airflow_provider_fable.exceptions import UnknownModelError as UnknownModelError

if TYPE_CHECKING:
    from anthropic import Anthropic, AsyncAnthropic
    from anthropic.types.messages import MessageBatch

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_TIMEOUT = 600.0
#: Seconds to establish a connection. The ``timeout`` extra is the read/write timeout of a call
#: (a 256 MB create can legitimately take minutes); an unreachable host should fail in seconds,
#: as with the SDK's own default, not after ``timeout``.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_RETRIES = 2

_HINTS = {
    401: "check the API key (the connection's password field)",
    403: "the key is not allowed to do this; check its workspace and permissions",
    404: "the batch id is unknown to this account/workspace (or was deleted)",
    413: "the batch body is over 256 MB; submit fewer or smaller requests per batch",
    429: "rate limited after retries; lower concurrency or raise the connection's max_retries",
    529: "the API is overloaded; retry later",
}


def is_transient_api_error(exc: BaseException) -> bool:
    """API errors worth another try: eventual-consistency 404s, 408/409/429/5xx, network trouble.

    Configuration errors (no key) and other 4xx are final: retrying them only delays the alert.
    The sensor, the trigger and the load's status read share this rule, so a hiccup the wait
    tolerated does not fail the load that follows it.
    """
    if not isinstance(exc, FableApiError):
        return False
    status = exc.status_code
    return status is None or status in (404, 408, 409, 429) or status >= 500


#: Status reads a results download makes before giving up on transient errors (each already
#: includes the SDK's own retries), and the first back-off in seconds (doubled each time, <= 30 s).
RESULTS_STATUS_ATTEMPTS = 5
RESULTS_STATUS_BACKOFF = 2.0


#: A 404 on a call that names no batch id means the URL itself is wrong, not the batch.
_HINT_404_ENDPOINT = (
    "the API has no such endpoint at this address: check the connection's base URL "
    "(host field); it is the server root, e.g. https://api.anthropic.com"
)


def _not_sent(exc: Exception) -> bool:
    """True when the connection was never established, so the request cannot have reached the API."""
    import httpx2

    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, (httpx2.ConnectError, httpx2.ConnectTimeout))


def _base_url_hint(base_url: str | None) -> str | None:
    if base_url and base_url.rstrip("/").endswith("/v1"):
        return (
            f"the base URL {base_url} ends in /v1, but the client adds /v1/... itself; "
            "remove /v1 from the connection's host"
        )
    return None


def _api_error(
    action: str,
    exc: Exception,
    conn_id: str,
    *,
    base_url: str | None = None,
    names_batch: bool = True,
    scheme_assumed: bool = False,
) -> FableApiError:
    """Wrap an SDK exception with the failing call, the API's error type and a hint.

    ``names_batch=False`` for calls that address no batch id (create, list, count tokens): a 404
    there means a wrong base URL, not an unknown batch. ``base_url`` lets the hint name a base URL
    ending in ``/v1`` and say where a refused connection was aimed.
    """
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    err_type, message = None, None
    if isinstance(body, dict):
        error = body.get("error")
        inner = error if isinstance(error, dict) else body
        err_type, message = inner.get("type"), inner.get("message")
    if message is None:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    head = f"{action} failed"
    head += f": HTTP {status}" if status else f": {type(exc).__name__}"
    if err_type:
        head += f" {err_type}"
    hint = _HINTS.get(status or 0)
    unknown_model = _names_unknown_model(status, err_type, message)
    if unknown_model:
        hint = "the API does not know this model: check the model name (operator's model or the connection's default_model)"
    elif status == 404:
        hint = _base_url_hint(base_url) or (hint if names_batch else _HINT_404_ENDPOINT)
    if status is None:
        where = f" at {base_url}" if base_url else ""
        if _not_sent(exc):
            hint = (
                f"nothing answered{where} (connection refused, unreachable or connect timeout); "
                "the request was never sent. Check the connection's host and port and that the "
                "server is running"
            )
        else:
            hint = f"could not reach the API{where}; check the connection's base URL and the network"
        if scheme_assumed:
            hint += (
                "; the host had no scheme so https was assumed: for a plain-HTTP server (such as "
                "the emulator) set the extra scheme=http (URI form: fable://:KEY@host:port?scheme=http)"
            )
    text = f"{head}: {message} (connection {conn_id!r}"
    text += f"; {hint})" if hint else ")"
    return FableApiError(text, status_code=status, error_type=err_type, unknown_model=unknown_model)


def _names_unknown_model(status: int | None, err_type: str | None, message: str | None) -> bool:
    """A 404 ``not_found_error`` whose message names the model (``"model: claude-x"``), as the
    API answers for a model it does not know; a wrong base URL answers 404 without that."""
    return status == 404 and err_type == "not_found_error" and (message or "").lstrip().startswith("model:")


#: Statuses that mean the API refused the request before doing any work: safe to send again.
_REFUSED_STATUSES = frozenset({429, 529})
_RESULTS_ACCEPT = {"Accept": "application/binary"}


def _retry_delay(exc: Any, attempt: int) -> float:
    """Honour ``retry-after-ms`` / ``retry-after`` when the API sends them, else back off."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except (TypeError, ValueError):
            continue
        if 0 <= value <= 60:
            return value
    return min(0.5 * 2 ** (attempt - 1), 8.0)


def _uncertain(action: str, exc: Exception, conn_id: str, **where: Any) -> BatchCreateUncertainError:
    base = _api_error(action, exc, conn_id, names_batch=False, **where)
    return BatchCreateUncertainError(
        f"{base} The batch may or may not have been created: before submitting these records "
        "again, list recent batches (FableHook.list_batches) and load or cancel any that match, "
        "or you may pay twice.",
        status_code=base.status_code,
        error_type=base.error_type,
    )


def _create_retry_delay(
    action: str, exc: Exception, attempt: int, attempts: int, conn_id: str, **where: Any
) -> float:
    """Seconds to wait before sending a failed create again, or raise the error that fits.

    Only 429/529 and a connection that was never established (refused, unreachable, connect
    timeout) prove nothing was created. A read timeout, a dropped connection or a 500-504 may
    hide a created (billed) batch, so those are never retried and raise
    :class:`BatchCreateUncertainError`. ``where`` (``base_url``, ``scheme_assumed``) sharpens hints.
    """
    import anthropic

    if isinstance(exc, anthropic.APIStatusError):
        if exc.status_code in _REFUSED_STATUSES and attempt < attempts:
            return _retry_delay(exc, attempt)
        if exc.status_code >= 500 and exc.status_code not in _REFUSED_STATUSES:
            raise _uncertain(action, exc, conn_id, **where) from None
    elif isinstance(exc, anthropic.APIConnectionError):  # includes timeouts
        if _not_sent(exc):
            if attempt < attempts:
                return min(0.5 * 2 ** (attempt - 1), 8.0)
            raise _api_error(action, exc, conn_id, names_batch=False, **where) from None
        raise _uncertain(action, exc, conn_id, **where) from None
    raise _api_error(action, exc, conn_id, names_batch=False, **where) from None


def _ended(batch: Any) -> Any:
    if not batch.results_url:
        raise FableApiError(
            f"batch {batch.id} has no results yet (status {batch.processing_status}); "
            "wait for it to end (FableBatchSensor) before reading results"
        )
    return batch


def _parse(batch_id: str, line: bytes) -> BatchResult:
    """One result; a line that is not a result object is handed on as an ``unparseable`` result
    (its record is rejected, or the line counted as unattributable) so the rest of the batch loads.
    """
    return parse_result_line_or_bad(line)


class _ResumableLines:
    """Split a byte stream into JSONL lines across download attempts, handing each line out once.

    The results file of an ended batch is immutable, so after a broken download the next attempt
    re-reads from the start and the first ``handed_out`` lines are skipped. A download that ends
    cleanly but short of the batch's request count counts as broken too.
    """

    def __init__(self, batch: Any) -> None:
        self.batch_id = batch.id
        self.url = batch.results_url
        counts = batch.request_counts
        self.expected = (
            counts.succeeded + counts.errored + counts.canceled + counts.expired + counts.processing
        )
        self.handed_out = 0
        #: True on the last attempt: a torn last line is then handed out (see ``finish``).
        self.final = False
        #: Lines of an earlier download that ended cleanly but short (see ``check_complete``).
        self.clean_short: int | None = None
        #: Set when a short file was accepted as what the batch's results file holds.
        self.short_accepted = False
        self.last_error: Exception | None = None
        self._pending = b""
        self._seen = 0

    def restart(self) -> None:
        self._pending = b""
        self._seen = 0

    def _take(self, line: bytes) -> list[bytes]:
        if not line.strip():
            return []
        self._seen += 1
        if self._seen <= self.handed_out:
            return []
        self.handed_out = self._seen
        return [line]

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete lines of ``chunk`` not handed out before (``_take``'s rule, per chunk:
        a call per line was a measurable share of a million-line download)."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        lines = [line for line in lines if line and not line.isspace()]  # = ``line.strip()``
        seen = self._seen
        self._seen = seen + len(lines)
        if self._seen <= self.handed_out:
            return []
        skip, self.handed_out = max(0, self.handed_out - seen), self._seen
        return lines[skip:] if skip else lines

    def finish(self) -> list[bytes]:
        """The last line when the stream ended without a newline; a torn or short file is an error.

        Except on the last attempt: a stream that ended cleanly on a torn line every time is a
        file whose last line is broken, not a download to retry for ever; the line is handed out
        and becomes an ``unparseable`` result (a reject) so the rest of the batch loads.
        """
        tail, self._pending = self._pending, b""
        if tail.strip() and not self.final:
            try:
                json.loads(tail)
            except ValueError:
                raise ResultsIncompleteError(
                    f"results of {self.batch_id} ended mid-line after {self._seen} lines"
                ) from None
        return self._take(tail)

    def check_complete(self) -> None:
        """A file that ended cleanly but short of the request count is a broken download too.

        Unless two downloads ended cleanly on the same count: then the file itself is short (two
        result lines merged into one, a line missing) and downloading it again cannot help; what
        it holds is handed out (``short_accepted``) instead of blocking the batch's load for ever.
        Records with no line then end as ``missing_result`` (the load's completeness check by
        custom_id, with the job ledger).
        """
        if self._seen < self.expected:
            if self.clean_short == self._seen:
                self.short_accepted = True
                return
            self.clean_short = self._seen
            raise ResultsIncompleteError(
                f"results of {self.batch_id} ended after {self._seen} of {self.expected} lines"
            )

    def warn_if_short(self, log: Any) -> None:
        if self.short_accepted:
            log.warning(
                "Results of %s hold %d lines for %d requests on two downloads alike: the file itself "
                "is short (merged or missing lines). Loading what it holds; with the job ledger, "
                "records with no result line become missing_result rejects (retryable).",
                self.batch_id, self._seen, self.expected,
            )  # fmt: skip

    def failed(self, exc: Exception, attempt: int, max_attempts: int, log: Any) -> None:
        self.last_error = exc
        log.warning(
            "Results download of %s broke off after %d lines (attempt %d/%d): %s",
            self.batch_id, self.handed_out, attempt, max_attempts, exc,
        )  # fmt: skip

    def give_up(self, max_attempts: int) -> NoReturn:
        raise ResultsIncompleteError(
            f"results of {self.batch_id} broke off {max_attempts} times; {self.handed_out} of "
            f"{self.expected} lines were read. Re-run the task to read them again (loading is "
            f"idempotent). Last error: {self.last_error}"
        )


_COUNT_TOKENS_KEYS = frozenset(
    {"messages", "model", "system", "tools", "tool_choice", "output_config", "thinking"}
)


def _count_tokens_body(params: dict[str, Any]) -> dict[str, Any]:
    """count_tokens takes a subset of a request's params (no max_tokens, temperature, ...)."""
    return {k: v for k, v in params.items() if k in _COUNT_TOKENS_KEYS}


class FableHook(BaseHook):
    """Interact with Anthropic's Message Batches API through an Airflow connection.

    Connection fields: password = API key, host = base URL override (empty = the public API;
    ``http://127.0.0.1:8787`` or ``127.0.0.1`` + port + extra ``scheme=http``), extras:
    ``default_model``, ``timeout`` (read timeout of a call, seconds), ``connect_timeout``
    (seconds, default 5), ``max_retries``, ``workspace_id``, ``scheme`` (``http``/``https``, for
    a host given without one, as in the URI form ``fable://:KEY@127.0.0.1:8787?scheme=http``).
    Extra ``prices``: model -> price overrides over the default table (``core.cost.parse_prices``).

    :param fable_conn_id: connection id, default ``fable_default``.
    :param timeout: per-request timeout override (seconds).
    :param max_retries: SDK retry override (408/409/429/5xx, connection errors).
    """

    conn_name_attr = "fable_conn_id"
    default_conn_name = "fable_default"
    conn_type = "fable"
    hook_name = "Fable (Anthropic Message Batches)"
    #: Transient-error tolerance of the status read before a results download (see
    #: :meth:`_retrieve_for_results`); class attributes so a test or a subclass can shorten them.
    results_status_attempts = RESULTS_STATUS_ATTEMPTS
    results_status_backoff = RESULTS_STATUS_BACKOFF

    def __init__(
        self,
        fable_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fable_conn_id = fable_conn_id
        self._timeout = timeout
        self._max_retries = max_retries

    # ------------------------------------------------------------------ configuration
    @cached_property
    def _settings(self) -> dict[str, Any]:
        """Client settings derived from the connection (read once per hook)."""
        return self._settings_from(self.get_connection(self.fable_conn_id))

    async def aload_connection(self) -> None:
        """Read the connection without blocking the event loop (call first thing in a trigger).

        In Airflow 3 a sync ``get_connection`` inside the triggerer's loop fails or blocks, so
        async callers load the settings here and the cached value serves every later call.
        """
        if "_settings" not in self.__dict__:
            conn = await self.aget_connection(self.fable_conn_id)
            self.__dict__["_settings"] = self._settings_from(conn)

    def _settings_from(self, conn: Any) -> dict[str, Any]:
        if not conn.password:
            raise FableConfigError(
                f"connection {self.fable_conn_id!r} has no API key: put it in the password field "
                f'(env form: AIRFLOW_CONN_{self.fable_conn_id.upper()}=\'{{"conn_type": "fable", '
                '"password": "<key>"}\')'
            )
        extra = conn.extra_dejson or {}
        base_url = (conn.host or "").strip().rstrip("/") or DEFAULT_BASE_URL
        scheme = str(extra.get("scheme") or "").strip().lower().rstrip(":/")
        if scheme not in ("", "http", "https"):
            raise FableConfigError(
                f"connection {self.fable_conn_id!r}: extra 'scheme' must be http or https, got {scheme!r}"
            )
        given = base_url.split("://", 1)[0].lower() if "://" in base_url else ""
        if scheme and given and scheme != given:
            raise FableConfigError(
                f"connection {self.fable_conn_id!r}: host says {given}:// but extra scheme is {scheme!r}"
            )
        scheme_assumed = not (scheme or given)
        if "://" not in base_url:
            base_url = f"{scheme or 'https'}://{base_url}"
        if conn.port and base_url.count(":") < 2:
            base_url = f"{base_url}:{conn.port}"

        def _num(key: str, cast: type, default: Any) -> Any:
            value = extra.get(key)
            if value in (None, ""):
                return default
            try:
                return cast(value)
            except (TypeError, ValueError):
                raise FableConfigError(
                    f"connection {self.fable_conn_id!r}: extra {key!r} must be a number, got {value!r}"
                ) from None

        timeout = self._timeout if self._timeout is not None else _num("timeout", float, DEFAULT_TIMEOUT)
        connect_timeout = min(timeout, _num("connect_timeout", float, DEFAULT_CONNECT_TIMEOUT))
        retries = (
            self._max_retries
            if self._max_retries is not None
            else _num("max_retries", int, DEFAULT_MAX_RETRIES)
        )
        return {
            "api_key": conn.password,
            "base_url": base_url,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "scheme_assumed": scheme_assumed and base_url != DEFAULT_BASE_URL,
            "max_retries": retries,
            "workspace_id": extra.get("workspace_id") or None,
            "default_model": extra.get("default_model") or None,
            "prices": extra.get("prices") or None,
        }

    @property
    def base_url(self) -> str:
        return self._settings["base_url"]

    @property
    def default_model(self) -> str | None:
        return self._settings["default_model"]

    @property
    def price_overrides(self) -> Any:
        """The connection's ``prices`` extra (model -> price), applied over the default table."""
        return self._settings.get("prices")

    def _client_settings(self) -> dict[str, Any]:
        """What a client needs, as plain data (no SDK import: the triggerer's shared poll
        client builds from this without loading ``anthropic``)."""
        s = self._settings
        headers = {"anthropic-workspace-id": s["workspace_id"]} if s["workspace_id"] else None
        return {
            "api_key": s["api_key"],
            "base_url": s["base_url"],
            "timeout": s["timeout"],
            "connect_timeout": s["connect_timeout"],
            "max_retries": s["max_retries"],
            "default_headers": headers,
        }

    def _client_kwargs(self) -> dict[str, Any]:
        """The SDK client's keyword arguments: read and connect timeouts kept apart."""
        from anthropic import Timeout

        kwargs = self._client_settings()
        kwargs["timeout"] = Timeout(kwargs["timeout"], connect=kwargs.pop("connect_timeout"))
        return kwargs

    def get_conn(self) -> Anthropic:
        """The synchronous client (cached on the hook)."""
        return self.client

    @cached_property
    def client(self) -> Anthropic:
        from anthropic import Anthropic

        return Anthropic(**self._client_kwargs())

    def get_async_client(self) -> AsyncAnthropic:
        """A new async client; callers own it (one per event loop, e.g. per trigger run)."""
        from anthropic import AsyncAnthropic

        return AsyncAnthropic(**self._client_kwargs())

    def close(self) -> None:
        """Close the sync client's connection pool (the async one: :meth:`aclose`)."""
        if "client" in self.__dict__:
            self.client.close()

    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import anthropic

        try:
            return fn(*args, **kwargs)
        except anthropic.APIError as exc:
            names_batch = not action.startswith(("list batches", "count tokens"))
            raise _api_error(
                action, exc, self.fable_conn_id, names_batch=names_batch, **self._where()
            ) from None

    def _where(self) -> dict[str, Any]:
        """Context for error hints: where the call was aimed and whether its scheme was guessed."""
        s = self.__dict__.get("_settings") or {}
        return {"base_url": s.get("base_url"), "scheme_assumed": bool(s.get("scheme_assumed"))}

    # ------------------------------------------------------------------ batch endpoints
    def create_batch(self, requests: list[dict[str, Any]]) -> MessageBatch:
        """Create one batch, retrying only where the API provably created nothing.

        The SDK would retry a create after a timeout or a 5xx with no idempotency key, which can
        leave two billed batches. Here the SDK's retries are off for this call; 429 and 529 (the
        request was refused before any work) and a connection that was never established are
        retried with backoff, while an ambiguous failure (read timeout, connection drop, 500-504)
        raises :class:`BatchCreateUncertainError` so nobody blindly pays again.
        """
        return self._create(len(requests), lambda client: client.messages.batches.create(requests=requests))  # type: ignore[arg-type]  # dicts of the Request shape

    def create_batch_from_body(
        self, body: Callable[[], Iterable[bytes]], *, count: int, size: int | None = None
    ) -> MessageBatch:
        """Create one batch from an already serialised ``{"requests":[...]}`` body.

        ``body`` is called once per attempt and yields the JSON bytes in chunks (e.g. straight from
        the submit task's spool file), so a 100,000-request shard is never rebuilt as Python dicts:
        the task's memory stays flat in the number of records. ``size`` (the body's byte length)
        is sent as Content-Length instead of chunked encoding. Same retry rule as :meth:`create_batch`.
        """
        from anthropic.types.messages import MessageBatch

        headers = {"Content-Type": "application/json"}
        if size is not None:
            headers["Content-Length"] = str(size)
        return self._create(
            count,
            lambda client: client.post(
                "/v1/messages/batches", cast_to=MessageBatch, content=body(), options={"headers": headers}
            ),
        )

    def _create(self, count: int, send: Callable[[Anthropic], MessageBatch]) -> MessageBatch:
        import anthropic

        action = f"create batch of {count} requests"
        client = self.client.with_options(max_retries=0)
        attempts = max(1, self._settings["max_retries"] + 1)
        for attempt in range(1, attempts + 1):
            try:
                batch = send(client)
            except anthropic.APIError as exc:
                delay = _create_retry_delay(
                    action, exc, attempt, attempts, self.fable_conn_id, **self._where()
                )
                self.log.warning(
                    "%s: %s, retrying in %.1fs",
                    action,
                    f"HTTP {status}" if (status := getattr(exc, "status_code", None)) else type(exc).__name__,
                    delay,
                )
                time.sleep(delay)
                continue
            self.log.info("Created batch %s with %d requests", batch.id, count)
            return batch
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def retrieve_batch(self, batch_id: str) -> MessageBatch:
        return self._call(f"retrieve batch {batch_id}", self.client.messages.batches.retrieve, batch_id)

    def _status_retry_delay(self, batch_id: str, exc: FableApiError, attempt: int) -> float:
        """Seconds to wait before the next status read, or re-raise when the error is final."""
        if not is_transient_api_error(exc) or attempt >= self.results_status_attempts:
            raise exc
        delay = min(self.results_status_backoff * 2 ** (attempt - 1), 30.0)
        self.log.warning(
            "Reading the status of batch %s failed (%s); transient, trying again in %.1f s (%d/%d)",
            batch_id, exc, delay, attempt, self.results_status_attempts,
        )  # fmt: skip
        return delay

    def _retrieve_for_results(self, batch_id: str) -> MessageBatch:
        """The batch's status before a results download, tolerating transient API errors.

        The sensor already tolerates several transient errors in a row; without the same rule
        here a single 5xx between the wait and the download would fail the load task.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return self.retrieve_batch(batch_id)
            except FableApiError as exc:
                time.sleep(self._status_retry_delay(batch_id, exc, attempt))

    def list_batches(
        self, *, limit: int = 100, after_id: str | None = None, before_id: str | None = None
    ) -> Iterator[MessageBatch]:
        """Every batch visible to the key, newest first, walking all pages lazily."""
        from anthropic import omit

        page = self._call(
            "list batches",
            self.client.messages.batches.list,
            limit=limit,
            after_id=after_id or omit,
            before_id=before_id or omit,
        )
        while True:
            yield from page.data
            if not page.has_next_page():
                return
            page = self._call("list batches (next page)", page.get_next_page)

    def cancel_batch(self, batch_id: str) -> MessageBatch:
        batch = self._call(f"cancel batch {batch_id}", self.client.messages.batches.cancel, batch_id)
        self.log.info("Cancel requested for batch %s: now %s", batch_id, batch.processing_status)
        return batch

    def delete_batch(self, batch_id: str) -> str:
        deleted = self._call(f"delete batch {batch_id}", self.client.messages.batches.delete, batch_id)
        return deleted.id

    def count_tokens(self, params: dict[str, Any]) -> int:
        """Input tokens the API would count for one request's params (max_tokens is ignored)."""
        body = _count_tokens_body(params)
        self.note_model(body.get("model"))
        tokens = self._call("count tokens", self.client.messages.count_tokens, **body).input_tokens
        self.__dict__.setdefault("_models_counted", set()).add(body.get("model"))
        return tokens

    def note_model(self, model: Any) -> None:
        """Say once per hook (a task makes one) that ``model`` is legacy or retired.

        One log line from the catalog in ``core.cost`` (:func:`~airflow_provider_fable.core.cost.legacy_notice`):
        info for a legacy model (still served; the default ``claude-fable-5`` is one, kept so
        existing jobs keep their fingerprints), a warning for a retired one. Every estimate and
        every submit reaches it (``count_tokens``, ``check_model``).
        """
        noted: set[Any] = self.__dict__.setdefault("_models_noted", set())
        if model in noted or not isinstance(model, str):
            return
        noted.add(model)
        from airflow_provider_fable.core.cost import legacy_notice, model_info

        notice = legacy_notice(model)
        if notice is not None:
            info = model_info(model)
            (self.log.warning if info is not None and info.status == "retired" else self.log.info)(notice)

    def check_model(self, model: str) -> None:
        """Refuse a model the API does not know, before anything is created (and paid for).

        One free ``count_tokens`` call with a one-word message (none when this hook already
        counted tokens for the model, e.g. for the estimate): the API answers an unknown model
        with 404 ``not_found_error`` ("model: ..."), which raises :class:`UnknownModelError`
        naming the model. Any other failure only logs a warning: the check is a guard, and the
        create that follows reports real trouble (network, key) with its own clear error.
        """
        self.note_model(model)
        if model in self.__dict__.get("_models_counted", ()):
            return  # a count for this model already succeeded (the estimate's): it is known
        try:
            self.count_tokens({"model": model, "messages": [{"role": "user", "content": "ping"}]})
        except FableApiError as exc:
            if exc.unknown_model:
                raise UnknownModelError(
                    f"model {model!r} is not known to the API at {self.base_url} (404 not_found_error): "
                    "check the model name (the operator's model or the connection's default_model); "
                    "nothing was submitted"
                ) from None
            self.log.warning("Could not check model %s before submitting: %s", model, exc)

    def iter_result_lines(self, batch_id: str, *, max_attempts: int = 3) -> Iterator[bytes]:
        """Raw JSONL lines of an ended batch, streamed (never all in memory).

        A download that breaks off, or ends with fewer lines than the batch has requests, is
        reopened and the lines already handed out are skipped: callers see every line once.
        """
        import anthropic
        import httpx2

        lines = _ResumableLines(_ended(self._retrieve_for_results(batch_id)))
        for attempt in range(1, max_attempts + 1):
            lines.restart()
            lines.final = attempt == max_attempts
            try:
                response = self.client.get(
                    lines.url, cast_to=httpx2.Response, options={"headers": _RESULTS_ACCEPT}, stream=True
                )
                try:
                    for chunk in response.iter_bytes():
                        yield from lines.feed(chunk)
                    yield from lines.finish()
                    lines.check_complete()
                finally:
                    response.close()
                lines.warn_if_short(self.log)
                return
            except (ResultsIncompleteError, httpx2.TransportError, anthropic.APIConnectionError) as exc:
                lines.failed(exc, attempt, max_attempts, self.log)
            except anthropic.APIError as exc:
                raise _api_error(f"download results of {batch_id}", exc, self.fable_conn_id) from None
        lines.give_up(max_attempts)

    def iter_results(self, batch_id: str) -> Iterator[BatchResult]:
        """Parsed result lines of an ended batch."""
        for line in self.iter_result_lines(batch_id):
            yield _parse(batch_id, line)

    # ------------------------------------------------------------------ async (triggers)
    async def aclient(self) -> AsyncAnthropic:
        """The async client of this hook, built in a worker thread after an async connection read.

        Waits on batches use :func:`airflow_provider_fable.hooks.shared_client.shared_client`
        instead (one client per connection per triggerer, not one per hook).

        Reading the connection first matters: a sync ``get_connection`` inside the triggerer's
        event loop fails (or blocks it) in Airflow 3.
        """
        await self.aload_connection()
        if "_async_client" not in self.__dict__:
            import asyncio

            # Importing the SDK (seconds, cold) and building the client (TLS context, pool) would
            # stall every other coroutine of the loop: do both in a worker thread.
            self.__dict__["_async_client"] = await asyncio.to_thread(self.get_async_client)
        return self.__dict__["_async_client"]

    async def _acall(self, action: str, call: Any) -> Any:
        import anthropic

        client = await self.aclient()
        try:
            return await call(client)
        except anthropic.APIError as exc:
            raise _api_error(action, exc, self.fable_conn_id) from None

    async def acreate_batch(self, requests: list[dict[str, Any]]) -> MessageBatch:
        """Async :meth:`create_batch`, with the same rule: only provable refusals are retried."""
        import asyncio

        import anthropic

        client = (await self.aclient()).with_options(max_retries=0)
        action = f"create batch of {len(requests)} requests"
        attempts = max(1, self._settings["max_retries"] + 1)
        for attempt in range(1, attempts + 1):
            try:
                return await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]  # dicts of the Request shape
            except anthropic.APIError as exc:
                delay = _create_retry_delay(action, exc, attempt, attempts, self.fable_conn_id)
                self.log.warning(
                    "%s: HTTP %s, retrying in %.1fs", action, getattr(exc, "status_code", "?"), delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def aretrieve_batch(self, batch_id: str) -> MessageBatch:
        return await self._acall(
            f"retrieve batch {batch_id}", lambda c: c.messages.batches.retrieve(batch_id)
        )

    async def _aretrieve_for_results(self, batch_id: str) -> MessageBatch:
        """Async twin of :meth:`_retrieve_for_results`."""
        import asyncio

        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.aretrieve_batch(batch_id)
            except FableApiError as exc:
                await asyncio.sleep(self._status_retry_delay(batch_id, exc, attempt))

    async def alist_batches(self, *, limit: int = 100) -> AsyncIterator[MessageBatch]:
        import anthropic

        client = await self.aclient()
        try:
            async for batch in client.messages.batches.list(limit=limit):
                yield batch
        except anthropic.APIError as exc:
            raise _api_error("list batches", exc, self.fable_conn_id) from None

    async def acancel_batch(self, batch_id: str) -> MessageBatch:
        return await self._acall(f"cancel batch {batch_id}", lambda c: c.messages.batches.cancel(batch_id))

    async def adelete_batch(self, batch_id: str) -> str:
        deleted = await self._acall(f"delete batch {batch_id}", lambda c: c.messages.batches.delete(batch_id))
        return deleted.id

    async def acount_tokens(self, params: dict[str, Any]) -> int:
        body = _count_tokens_body(params)
        counted = await self._acall("count tokens", lambda c: c.messages.count_tokens(**body))
        return counted.input_tokens

    async def aiter_result_lines(self, batch_id: str, *, max_attempts: int = 3) -> AsyncIterator[bytes]:
        """Async twin of :meth:`iter_result_lines` (same resume and completeness checks)."""
        import anthropic
        import httpx2

        lines = _ResumableLines(_ended(await self._aretrieve_for_results(batch_id)))
        client = await self.aclient()
        for attempt in range(1, max_attempts + 1):
            lines.restart()
            lines.final = attempt == max_attempts
            try:
                response = await client.get(
                    lines.url, cast_to=httpx2.Response, options={"headers": _RESULTS_ACCEPT}, stream=True
                )
                try:
                    async for chunk in response.aiter_bytes():
                        for line in lines.feed(chunk):
                            yield line
                    for line in lines.finish():
                        yield line
                    lines.check_complete()
                finally:
                    await response.aclose()
                lines.warn_if_short(self.log)
                return
            except (ResultsIncompleteError, httpx2.TransportError, anthropic.APIConnectionError) as exc:
                lines.failed(exc, attempt, max_attempts, self.log)
            except anthropic.APIError as exc:
                raise _api_error(f"download results of {batch_id}", exc, self.fable_conn_id) from None
        lines.give_up(max_attempts)

    async def aiter_results(self, batch_id: str) -> AsyncIterator[BatchResult]:
        """Parsed result lines of an ended batch, streamed through the async client."""
        async for line in self.aiter_result_lines(batch_id):
            yield _parse(batch_id, line)

    async def aclose(self) -> None:
        client = self.__dict__.pop("_async_client", None)
        if client is not None:
            await client.close()

    # ------------------------------------------------------------------ UI
    def test_connection(self) -> tuple[bool, str]:
        """Called by the UI's Test button: one cheap authenticated call."""
        try:
            page = self.client.messages.batches.list(limit=1)
            return (
                True,
                f"Connected to {self.base_url}; batches visible: {'yes' if page.data else 'none yet'}",
            )
        except Exception as exc:  # noqa: BLE001 - the UI wants a message, not a traceback
            import anthropic

            if isinstance(exc, anthropic.APIError):
                exc = _api_error("list batches", exc, self.fable_conn_id, names_batch=False, **self._where())
            return False, str(exc)

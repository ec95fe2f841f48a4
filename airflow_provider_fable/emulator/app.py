"""FastAPI app speaking the Message Batches wire protocol.

The official ``anthropic`` SDK must work against it unchanged, so every detail a client can
observe follows the real API: paths, JSON shapes, error bodies and status codes, the
``request-id`` header, the ``anthropic-version``/``anthropic-beta`` header checks,
``retry-after`` (seconds) and ``anthropic-ratelimit-*`` on 429/529, and a results file
streamed as JSON Lines from an absolute ``results_url``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_provider_fable.emulator.errors import ApiError, error_body, new_request_id
from airflow_provider_fable.emulator.settings import EmulatorSettings
from airflow_provider_fable.emulator.state import (
    BatchStore,
    ResultsDownload,
    parse_create_body,
    parse_json_body,
    rfc3339,
)
from airflow_provider_fable.emulator.validation import check_betas, check_version

__all__ = ["create_app"]

log = logging.getLogger(__name__)

_RESULTS_MEDIA_TYPE = "application/binary"
_CUT_MESSAGE = "ASGI callable returned without completing response."


class _RequestIdMiddleware:
    """Give every response a ``request-id`` header, as the API does (errors reuse the same id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"request-id" for name, _ in headers):
                    headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _CutStreamResponse(StreamingResponse):
    """A results stream that breaks off: the body ends without the final chunk.

    Returning without ``more_body: False`` makes the server drop the connection mid-body, so
    the client sees what a network cut looks like (an incomplete chunked read), not a
    well-formed short file.
    """

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})


class _DroppedResponse(Response):
    """A response that starts and then breaks off: the client sees a dropped connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"id": "msgbatch_', "more_body": True})


class _QuietCutFilter(logging.Filter):
    """Uvicorn logs an error for every deliberate cut; that is the fault working, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _CUT_MESSAGE


def install_log_filter() -> None:
    """Silence uvicorn's report of deliberately cut results streams (idempotent)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietCutFilter) for f in logger.filters):
        logger.addFilter(_QuietCutFilter())


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None) or new_request_id()
    return JSONResponse(
        error_body(error.error_type, error.message, request_id),
        status_code=error.status,
        headers={**error.headers, "request-id": request_id},
    )


def _api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before and while reading it."""
    too_large = ApiError(413, f"Request exceeds the maximum allowed number of bytes ({limit}).")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        too_large.headers["connection"] = "close"
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_large.headers["connection"] = "close"
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: Input should be a valid integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: Input should be between {lo} and {hi}, got {value}")
    return value


def _retry_headers(settings: EmulatorSettings, code: int, now: float) -> dict[str, str]:
    """What the API sends with a retryable error: ``retry-after`` in seconds and, for rate
    limits and overload, the ``anthropic-ratelimit-*`` state. ``retry-after-ms`` (which the SDK
    prefers) only when a test asks for it, so by default clients wait as long as in production.
    """
    faults = settings.faults
    headers = {"retry-after": str(faults.retry_after_seconds)}
    if faults.retry_after_ms is not None:
        headers["retry-after-ms"] = str(faults.retry_after_ms)
    if code == 429 or code >= 500:
        headers["x-should-retry"] = "true"
    if code in (429, 529):
        reset = datetime.fromtimestamp(now, tz=timezone.utc) + timedelta(seconds=faults.retry_after_seconds)
        reset_at = reset.replace(microsecond=0).isoformat().replace("+00:00", "Z")
        for kind, limit in (
            ("requests", 50),
            ("tokens", 400_000),
            ("input-tokens", 400_000),
            ("output-tokens", 80_000),
        ):
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = "0" if kind == "requests" else str(limit // 2)
            headers[f"anthropic-ratelimit-{kind}-reset"] = reset_at
    return headers


def _api_headers(request: Request) -> tuple[str, tuple[str, ...]]:
    """``anthropic-version`` and the ``anthropic-beta`` values of a request (checked by guard)."""
    version = request.headers.get("anthropic-version", "")
    betas = tuple(b.strip() for b in request.headers.get("anthropic-beta", "").split(",") if b.strip())
    return version, betas


def create_app(settings: EmulatorSettings | None = None) -> FastAPI:
    """Build an emulator app with its own, empty state.

    Each call gets a fresh store, so tests can run several emulators with different settings
    side by side. The store is reachable as ``app.state.store`` for in-process inspection.
    """
    settings = settings or EmulatorSettings()
    store = BatchStore(settings)
    app = FastAPI(
        title="Fable Message Batches emulator",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.store = store
    app.add_middleware(_RequestIdMiddleware)
    install_log_filter()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "Not found" if exc.status_code == 404 else str(exc.detail)
        return _error_response(request, ApiError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, ApiError(400, str(exc.errors())))

    def guard(request: Request, endpoint: str) -> None:
        """Count the call, check the key, then maybe inject an HTTP fault (in that order)."""
        store.stats.call(endpoint)
        key = _api_key(request)
        if key is None:
            store.stats.add("auth_failures")
            raise ApiError(401, "x-api-key header is required")
        if settings.api_key is not None and key != settings.api_key:
            store.stats.add("auth_failures")
            raise ApiError(401, "invalid x-api-key")
        version, betas = _api_headers(request)
        problem = check_version(version) or check_betas(",".join(betas))
        if problem is not None:
            store.stats.add("header_rejects")
            raise ApiError(problem.status, problem.message, error_type=problem.error_type)
        code = store.http_faults.check(endpoint)
        if code is not None:
            store.stats.fault("http_error", code=code)
            headers = _retry_headers(settings, code, store.clock())
            raise ApiError(code, f"Emulated {code} fault on {endpoint} (fault injection)", headers=headers)

    def base_url(request: Request) -> str:
        return str(request.base_url)

    # -- Message Batches ---------------------------------------------------------------------
    @app.post("/v1/messages/batches")
    async def create_batch(request: Request) -> JSONResponse:
        guard(request, "create")
        raw = await _read_body(request, settings.max_body_bytes)
        requests = await run_in_threadpool(parse_create_body, raw)
        version, betas = _api_headers(request)
        batch = store.create(requests, base_url(request), api_version=version, betas=betas)
        lost = store.http_faults.lose_create_response()
        if lost is not None:
            store.stats.fault("lost_create_response")
            if lost == "drop":
                return _DroppedResponse()
            raise ApiError(500, "Emulated internal error after the batch was created (fault injection)")
        return JSONResponse(batch)

    @app.get("/v1/messages/batches")
    def list_batches(request: Request) -> JSONResponse:
        guard(request, "list")
        limit = _int_query(request, "limit", 20, 1, 1000)
        after_id = request.query_params.get("after_id") or None
        before_id = request.query_params.get("before_id") or None
        if after_id and before_id:
            raise ApiError(400, "after_id and before_id cannot be used together")
        page = store.list(limit=limit, after_id=after_id, before_id=before_id, base_url=base_url(request))
        return JSONResponse(page)

    @app.get("/v1/messages/batches/{batch_id}")
    def retrieve_batch(request: Request, batch_id: str) -> JSONResponse:
        guard(request, "retrieve")
        return JSONResponse(store.retrieve(batch_id, base_url(request)))

    @app.delete("/v1/messages/batches/{batch_id}")
    def delete_batch(request: Request, batch_id: str) -> JSONResponse:
        guard(request, "delete")
        return JSONResponse(store.delete(batch_id))

    @app.post("/v1/messages/batches/{batch_id}/cancel")
    def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
        guard(request, "cancel")
        return JSONResponse(store.cancel(batch_id, base_url(request)))

    @app.get("/v1/messages/batches/{batch_id}/results")
    def batch_results(request: Request, batch_id: str) -> Response:
        guard(request, "results")
        download: ResultsDownload = store.open_results(batch_id)
        chunks: Iterator[bytes] = download.chunks()
        response_class = StreamingResponse if download.cut_after is None else _CutStreamResponse
        return response_class(chunks, media_type=_RESULTS_MEDIA_TYPE)

    # -- Messages ----------------------------------------------------------------------------
    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> JSONResponse:
        guard(request, "count_tokens")
        params = parse_json_body(await _read_body(request, settings.max_body_bytes))
        version, betas = _api_headers(request)
        tokens = await run_in_threadpool(lambda: store.count_tokens(params, api_version=version, betas=betas))
        return JSONResponse({"input_tokens": tokens})

    @app.post("/v1/messages")
    async def create_message(request: Request) -> JSONResponse:
        guard(request, "messages")
        params = parse_json_body(await _read_body(request, settings.max_body_bytes))
        version, betas = _api_headers(request)
        message = await run_in_threadpool(
            lambda: store.create_message(params, api_version=version, betas=betas)
        )
        return JSONResponse(message)

    # -- emulator control (no auth, never faulted) -------------------------------------------
    @app.get("/_emulator/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/_emulator/stats")
    def stats() -> JSONResponse:
        return JSONResponse(store.stats.snapshot())

    def clock_state() -> dict[str, object]:
        now = store.clock()
        return {"now": rfc3339(now), "now_unix": now, "offset_seconds": store.clock.offset}

    @app.get("/_emulator/clock")
    def get_clock() -> JSONResponse:
        return JSONResponse(clock_state())

    @app.post("/_emulator/clock")
    async def advance_clock(request: Request) -> JSONResponse:
        """Move the emulated clock forward: ``{"advance_seconds": 86400}`` runs batches to expiry."""
        body = parse_json_body(await request.body() or b"{}")
        seconds = body.get("advance_seconds") if isinstance(body, dict) else None
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
            raise ApiError(
                400, "advance_seconds: a number of seconds >= 0 is required (the clock only moves forward)"
            )
        store.clock.advance(float(seconds))
        return JSONResponse(clock_state())

    return app

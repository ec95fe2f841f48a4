"""One async HTTP client per connection per event loop, for the waits of a whole triggerer.

A triggerer runs every deferred task of a deployment in one event loop; anything slow there
delays all of them. Building an ``AsyncAnthropic`` per trigger imported the SDK on the loop
(seconds, cold: "async thread was blocked for 8.93 seconds") and built a TLS context and a
connection pool per trigger. Measured under asyncio debug mode, even importing the SDK in a
worker thread stalls the loop past 100 ms (the import holds the GIL in long C calls). So a wait
never imports the SDK at all:

- polls and cancels are plain HTTP through one ``httpx.AsyncClient`` per connection per loop,
  built once in a worker thread; every other wait on that loop and connection awaits the same
  build and shares its keep-alive pool. ``httpx`` is what Airflow's own task SDK client uses, so
  a triggerer has it loaded already: a wait adds almost nothing to import (the SDK's fork,
  ``httpx2``, would be one more import competing with the loop for the GIL);
- requests carry the same authentication and version headers the SDK sends (a test pins them
  to the SDK's), and a poll keeps only the five fields a wait needs: no SDK request pipeline and
  no model construction per poll, which is what made thousands of waits expensive;
- the connection is read with Airflow's async API, once per ``CONNECTION_TTL`` per connection,
  and clients are keyed by the connection's settings, so an edited connection (new key, new
  host) gets a new client instead of silently using the old one.

Nothing heavy at module level: the triggerer imports trigger modules (and so this one) inside
its event loop. The hook and Airflow's connection machinery load in ``_warm_imports``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import weakref
from typing import Any

from airflow_provider_fable.core.terminal import summary_from_json

#: The ``anthropic-version`` the installed SDK sends (tests/test_waiting.py keeps them equal).
ANTHROPIC_VERSION = "2026-10-21"
_LIST_PATH = "/v1/messages/batches"
_BATCH_PATH = _LIST_PATH + "/{}"
#: Enough connections for thousands of waits on one loop without opening one per poll.
POOL_SIZE = 16
#: A status poll is tiny; a slow answer is better retried at the next poll than waited on.
POLL_TIMEOUT = 30.0
#: Seconds a connection read is reused by waits starting on the same loop: thousands of waits
#: deferred together read it once, and an edited connection is picked up within this time.
CONNECTION_TTL = 30.0


class SharedAsyncClient:
    """Polls and cancels batches of one connection on one loop (raises ``FableApiError``)."""

    def __init__(self, conn_id: str, http: Any, headers: dict[str, str]) -> None:
        self.conn_id = conn_id
        self.http = http
        self._headers = headers  # holds the key: never logged, never in a repr

    def __repr__(self) -> str:
        return f"SharedAsyncClient({self.conn_id!r})"

    async def _send(self, action: str, method: str, path: str) -> dict[str, Any]:
        body = await self._json(action, method, path)
        try:
            return summary_from_json(body)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            from airflow_provider_fable.hooks.fable import FableApiError

            raise FableApiError(f"{action}: unreadable answer ({exc}); connection {self.conn_id!r}") from None

    async def _json(self, action: str, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            response = await self.http.request(method, path, headers=self._headers, params=params)
        except httpx.HTTPError as exc:
            from airflow_provider_fable.hooks.fable import FableApiError

            raise FableApiError(
                f"{action} failed: {type(exc).__name__}: could not reach the API; check the "
                f"connection's base URL and the network (connection {self.conn_id!r})"
            ) from None
        if response.status_code >= 400:
            raise _status_error(action, response, self.conn_id)
        try:
            return _loads(response.content)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            from airflow_provider_fable.hooks.fable import FableApiError

            raise FableApiError(f"{action}: unreadable answer ({exc}); connection {self.conn_id!r}") from None

    async def poll(self, batch_id: str) -> dict[str, Any]:
        """The wait-relevant summary of one batch."""
        return await self._send(f"retrieve batch {batch_id}", "GET", _BATCH_PATH.format(batch_id))

    async def list_page(self, limit: int, after_id: str | None = None) -> dict[str, Any]:
        """One page of the workspace's batches, newest first (raw JSON: ``data``, ``has_more``,
        ``last_id``). The coalesced poller reads many waits' statuses from one such page."""
        params: dict[str, Any] = {"limit": limit}
        if after_id:
            params["after_id"] = after_id
        page = await self._json("list batches", "GET", _LIST_PATH, params)
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            from airflow_provider_fable.hooks.fable import FableApiError

            raise FableApiError(
                f"list batches: unreadable answer (no data list); connection {self.conn_id!r}"
            )
        return page

    async def cancel(self, batch_id: str) -> str:
        """Ask the API to cancel one batch; returns its new processing status."""
        path = _BATCH_PATH.format(batch_id) + "/cancel"
        return (await self._send(f"cancel batch {batch_id}", "POST", path))["processing_status"]

    async def aclose(self) -> None:
        await self.http.aclose()


def _loads(content: bytes) -> Any:
    """JSON of an answer: orjson (a dependency, ~3x faster on a 1,000-batch list page), or json
    for the rare text orjson refuses and json accepts."""
    import orjson

    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def _status_error(action: str, response: Any, conn_id: str) -> Exception:
    from airflow_provider_fable.hooks.fable import _HINTS, FableApiError

    err_type = message = None
    try:
        body = json.loads(response.content)
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        err_type, message = inner.get("type"), inner.get("message")
    except (ValueError, AttributeError):
        pass
    status = response.status_code
    text = f"{action} failed: HTTP {status}" + (f" {err_type}" if err_type else "")
    text += f": {message or response.reason_phrase} (connection {conn_id!r}"
    hint = _HINTS.get(status)
    text += f"; {hint})" if hint else ")"
    return FableApiError(text, status_code=status, error_type=err_type)


def request_headers(kwargs: dict[str, Any]) -> dict[str, str]:
    """Headers of a batch call, as the SDK builds them from the same client settings."""
    headers = {
        "Accept": "application/json",
        "Authorization": f"Bearer {kwargs['api_key']}",
        "anthropic-version": ANTHROPIC_VERSION,
        "User-Agent": "airflow-provider-fable (trigger)",
    }
    headers.update(kwargs.get("default_headers") or {})
    return headers


def _warm_imports() -> None:
    """Import, in a worker thread, what the first wait would otherwise import on the loop."""
    import httpx  # noqa: F401
    import orjson  # noqa: F401

    import airflow_provider_fable.hooks.fable  # noqa: F401

    try:  # what the first request loads lazily: anyio's asyncio backend and its socket layer
        import anyio._backends._asyncio  # noqa: F401
        import anyio._core._sockets  # noqa: F401
        import httpcore._async.http11  # noqa: F401
    except ImportError:  # pragma: no cover - depends on httpx's transport
        pass

    try:  # loaded in a triggerer already; a fresh process pays ~0.2 s for them on first use
        import airflow.sdk.execution_time.context  # noqa: F401
        import airflow.sdk.execution_time.supervisor  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the installed Airflow
        pass


def _build(conn_id: str, kwargs: dict[str, Any]) -> SharedAsyncClient:
    """Runs in a worker thread: the TLS context and the pool are built off the loop."""
    import httpx

    # Plain numbers from FableHook._client_settings (read and connect limits apart). A poll
    # never waits longer than POLL_TIMEOUT for its answer.
    read = kwargs.get("timeout") or POLL_TIMEOUT
    connect = kwargs.get("connect_timeout") or 10.0
    http = httpx.AsyncClient(
        base_url=kwargs["base_url"],
        timeout=httpx.Timeout(min(POLL_TIMEOUT, read), connect=min(connect, POLL_TIMEOUT)),
        limits=httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE),
    )
    return SharedAsyncClient(conn_id, http, request_headers(kwargs))


class _LoopState:
    """What one event loop shares: the warm-up, the clients, the recent connection reads."""

    def __init__(self) -> None:
        self.warm: asyncio.Future[None] | None = None
        self.clients: dict[str, asyncio.Future[SharedAsyncClient]] = {}
        self.settings: dict[str, tuple[float, asyncio.Future[dict[str, Any]]]] = {}


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()


def _key(conn_id: str, kwargs: dict[str, Any]) -> str:
    blob = json.dumps(kwargs, sort_keys=True, default=str).encode()
    return f"{conn_id}:{hashlib.sha256(blob).hexdigest()}"


async def _read_settings(conn_id: str) -> dict[str, Any]:
    from airflow_provider_fable.hooks.fable import FableHook

    hook = FableHook(conn_id)
    await hook.aload_connection()
    return hook._client_settings()


async def _settings(state: _LoopState, conn_id: str) -> dict[str, Any]:
    """The connection's client settings; one read in flight per connection (no stampede when
    thousands of waits start together), reused for ``CONNECTION_TTL`` seconds."""
    now = time.monotonic()
    cached = state.settings.get(conn_id)
    stale = cached is None or now - cached[0] >= CONNECTION_TTL
    if cached is not None and not stale and cached[1].done() and cached[1].exception() is not None:
        stale = True
    if stale or cached is None:
        cached = state.settings[conn_id] = (now, asyncio.ensure_future(_read_settings(conn_id)))
    return await asyncio.shield(cached[1])


async def shared_client(conn_id: str) -> SharedAsyncClient:
    """The process's client for ``conn_id`` on the running loop, built once, off the loop.

    The connection is read with the async API (a sync read inside the triggerer's loop fails
    or blocks); imports and the client build run in a worker thread, and concurrent callers
    await the same future.
    """
    loop = asyncio.get_running_loop()
    state = _loops.get(loop)
    if state is None:
        state = _loops[loop] = _LoopState()
    if state.warm is None or (state.warm.done() and state.warm.exception() is not None):
        state.warm = asyncio.ensure_future(asyncio.to_thread(_warm_imports))
    await asyncio.shield(state.warm)
    kwargs = await _settings(state, conn_id)
    key = _key(conn_id, kwargs)
    future = state.clients.get(key)
    if future is None or (future.done() and future.exception() is not None):
        future = state.clients[key] = asyncio.ensure_future(asyncio.to_thread(_build, conn_id, kwargs))
    return await asyncio.shield(future)


async def aclose_shared_clients() -> None:
    """Close this loop's shared clients (tests and benchmarks; a triggerer keeps them for life)."""
    state = _loops.pop(asyncio.get_running_loop(), None)
    for future in state.clients.values() if state else ():
        if future.done() and future.exception() is None:
            await future.result().aclose()

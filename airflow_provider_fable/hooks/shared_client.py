"""One async HTTP client per connection per event loop, built off the loop, for batch waits.

A triggerer runs every deferred task of a deployment in one event loop; anything slow there
delays all of them. Building an ``AsyncAnthropic`` per trigger imported the SDK (seconds, cold)
and built a TLS context and connection pool inside the loop, for every trigger. Here:

- the first wait on a connection in a process imports the SDK and builds the clients in a worker
  thread (``asyncio.to_thread``), while the loop keeps serving; every other wait on that loop and
  connection awaits the same build and then shares the clients and their keep-alive pool;
- polls are one GET with the headers the SDK itself would send (taken once from the SDK
  client), read as JSON, keeping only the few fields a wait needs: no SDK request pipeline and
  no model construction per poll, which is what made thousands of waits expensive;
- cancels go through the SDK client (rare, and its retries are welcome there).

Clients are keyed by the connection's settings, not only its id, so an edited connection (new
key, new host) gets a new client instead of silently using the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import weakref
from typing import Any

from airflow_provider_fable.core.terminal import summary_from_json
from airflow_provider_fable.hooks.fable import _HINTS, FableApiError, FableHook

_POLL_PATH = "/v1/messages/batches/{}"
#: Enough connections for thousands of waits on one loop without opening one per poll.
_POOL_SIZE = 64
#: A status poll is tiny; a slow answer is better retried at the next poll than waited on.
_POLL_TIMEOUT = 30.0

_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, asyncio.Future[SharedAsyncClient]]
] = weakref.WeakKeyDictionary()


class SharedAsyncClient:
    """The SDK client (cancel) and a plain HTTP client (polls) of one connection on one loop."""

    def __init__(self, conn_id: str, sdk: Any, http: Any, headers: dict[str, str]) -> None:
        self.conn_id = conn_id
        self.sdk = sdk
        self.http = http
        self.headers = headers

    async def poll(self, batch_id: str) -> dict[str, Any]:
        """The wait-relevant summary of one batch (raises :class:`FableApiError`)."""
        import httpx2

        action = f"retrieve batch {batch_id}"
        try:
            response = await self.http.get(_POLL_PATH.format(batch_id), headers=self.headers)
        except httpx2.HTTPError as exc:
            raise FableApiError(
                f"{action} failed: {type(exc).__name__}: could not reach the API; check the "
                f"connection's base URL and the network (connection {self.conn_id!r})"
            ) from None
        if response.status_code >= 400:
            raise _status_error(action, response, self.conn_id)
        try:
            return summary_from_json(json.loads(response.content))
        except (ValueError, KeyError, TypeError) as exc:
            raise FableApiError(f"{action}: unreadable answer ({exc}); connection {self.conn_id!r}") from None

    async def cancel(self, batch_id: str) -> str:
        """Ask the API to cancel one batch; returns its new processing status."""
        import anthropic

        from airflow_provider_fable.hooks.fable import _api_error

        try:
            batch = await self.sdk.messages.batches.cancel(batch_id)
        except anthropic.APIError as exc:
            raise _api_error(f"cancel batch {batch_id}", exc, self.conn_id) from None
        return batch.processing_status

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.sdk.close()


def _status_error(action: str, response: Any, conn_id: str) -> FableApiError:
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


def _build(conn_id: str, kwargs: dict[str, Any]) -> SharedAsyncClient:
    """Runs in a worker thread: SDK import, TLS context and pool construction stay off the loop."""
    import anthropic
    import httpx2

    sdk = anthropic.AsyncAnthropic(**kwargs)
    headers = {k: v for k, v in sdk.default_headers.items() if isinstance(v, str)}
    headers["Accept"] = "application/json"
    http = httpx2.AsyncClient(
        base_url=kwargs["base_url"],
        timeout=httpx2.Timeout(_POLL_TIMEOUT, connect=10.0),
        limits=httpx2.Limits(max_connections=_POOL_SIZE, max_keepalive_connections=_POOL_SIZE),
    )
    return SharedAsyncClient(conn_id, sdk, http, headers)


def _key(conn_id: str, kwargs: dict[str, Any]) -> str:
    blob = json.dumps(kwargs, sort_keys=True, default=str).encode()
    return f"{conn_id}:{hashlib.sha256(blob).hexdigest()}"


async def shared_client(conn_id: str) -> SharedAsyncClient:
    """The process's client for ``conn_id`` on the running loop, built once, off the loop.

    The connection is read with the async API (a sync read inside the triggerer's loop fails
    or blocks); the build runs in a thread and concurrent callers await the same future.
    """
    hook = FableHook(conn_id)
    await hook.aload_connection()
    kwargs = hook._client_kwargs()
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    key = _key(conn_id, kwargs)
    future = per_loop.get(key)
    if future is None or (future.done() and future.exception() is not None):
        future = per_loop[key] = asyncio.ensure_future(asyncio.to_thread(_build, conn_id, kwargs))
    return await asyncio.shield(future)


async def aclose_shared_clients() -> None:
    """Close this loop's shared clients (tests and benchmarks; a triggerer keeps them for life)."""
    per_loop = _clients.pop(asyncio.get_running_loop(), {})
    for future in per_loop.values():
        if future.done() and future.exception() is None:
            await future.result().aclose()

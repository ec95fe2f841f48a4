"""API errors in the exact shape the real Messages API sends them.

Clients (and the SDK's exception mapping) key off the HTTP status *and* the ``error.type``
in the body, so the emulator raises one exception type carrying both, and the app turns it
into ``{"type": "error", "error": {...}, "request_id": ...}`` in one place.
"""

from __future__ import annotations

import secrets
import string
from typing import Any

__all__ = ["ApiError", "error_body", "error_type_for", "new_request_id", "random_id"]

_ALPHABET = string.ascii_letters + string.digits

_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def random_id(prefix: str, length: int = 24) -> str:
    """``prefix`` + ``01`` + random alphanumerics, shaped like the API's ids (``msgbatch_01...``)."""
    return prefix + "01" + "".join(secrets.choice(_ALPHABET) for _ in range(length - 2))


def new_request_id() -> str:
    """A fresh ``req_...`` id for the ``request-id`` header and error bodies."""
    return random_id("req_")


def error_type_for(status: int) -> str:
    """The API's ``error.type`` for an HTTP status (unknown 4xx/5xx map to the generic ones)."""
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(error_type: str, message: str, request_id: str) -> dict[str, Any]:
    """The JSON body of an error response, also used for errored batch results."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


class ApiError(Exception):
    """An error the emulated API answers with; raised anywhere, rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.headers = headers or {}

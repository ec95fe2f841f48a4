"""Parse result lines of a batch (one JSON object per line) into small, flat records.

Result files can be millions of lines, so parsing works on raw lines and keeps only what
validation and cost accounting need, instead of building the SDK's pydantic objects per line.
The usual line (a succeeded answer of text blocks, token counts as integers) is decoded by a
typed ``msgspec`` decoder that reads only the fields kept here and skips the rest of the message
without building it (~30 % less CPU per line than building the whole object). Any other line,
and any line that decoder refuses, goes through the general path: ``orjson`` (several times
faster than ``json`` on these ~1 KB objects), and ``json`` for the rare line orjson refuses but
``json`` accepts (a lone UTF-16 surrogate escape, ``NaN``), so the accepted input and the
result are exactly what the general path alone gives.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import msgspec
import orjson

SUCCEEDED = "succeeded"
ERRORED = "errored"
CANCELED = "canceled"
EXPIRED = "expired"
#: Not API result types: what the load makes of a line it cannot read (``parse_result_line_or_bad``)
#: and of a record the results file has no line for (the load operator, by custom_id).
UNPARSEABLE = "unparseable"
MISSING = "missing"

#: ``error.type`` of an ``errored`` result -> whether sending the request again may succeed.
#: Server trouble is retryable; a request the API judged invalid, a model it does not know, or a
#: key without the right (or any) credit fails the same way every time. A type not listed here
#: counts as retryable (an errored request is not billed: a rerun costs little).
ERROR_TYPE_RETRYABLE: dict[str, bool] = {
    "api_error": True,
    "overloaded_error": True,
    "rate_limit_error": True,
    "timeout_error": True,
    "invalid_request_error": False,
    "not_found_error": False,
    "permission_error": False,
    "authentication_error": False,
    "billing_error": False,
    "request_too_large": False,
}


def error_type_retryable(error_type: str | None) -> bool:
    """Whether an errored result of this ``error.type`` is worth sending again."""
    return ERROR_TYPE_RETRYABLE.get(error_type or "", True)


class Usage(msgspec.Struct, gc=False):
    """Token usage of one request (zeros for requests that never ran).

    A ``msgspec.Struct`` (like ``BatchResult`` and ``validation``'s outcomes) rather than a
    dataclass: same fields, keyword or positional construction, equality and repr, but built in
    C: one is made per result line, and the dataclass ``__init__`` cost ~0.1 µs more each.
    ``gc=False``: it holds only integers, so it can never be part of a reference cycle.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    #: The part of ``cache_creation_input_tokens`` written with the 1-hour TTL (priced higher).
    cache_creation_1h_input_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cache_creation_1h_input_tokens += other.cache_creation_1h_input_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation_1h_input_tokens": self.cache_creation_1h_input_tokens,
        }


class BatchResult(msgspec.Struct):
    """One result line, flattened."""

    custom_id: str
    type: str
    text: str | None = None
    tool_input: Any = None
    stop_reason: str | None = None
    model: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)
    error_type: str | None = None
    error_message: str | None = None


from airflow_provider_fable.exceptions import ResultLineError as ResultLineError  # noqa: E402  (moved there)

_EMPTY: dict[str, Any] = {}


def _usage(raw: dict[str, Any] | None) -> Usage:
    if not raw:
        return Usage()
    return Usage(
        input_tokens=int(raw.get("input_tokens") or 0),
        output_tokens=int(raw.get("output_tokens") or 0),
        cache_creation_input_tokens=int(raw.get("cache_creation_input_tokens") or 0),
        cache_read_input_tokens=int(raw.get("cache_read_input_tokens") or 0),
        cache_creation_1h_input_tokens=int(
            (raw.get("cache_creation") or {}).get("ephemeral_1h_input_tokens") or 0
        ),
    )


def _usage_fast(raw: dict[str, Any]) -> Usage:
    """The common case (a dict of ints), with one type check per field and no conversions."""
    get = raw.get
    a, b = get("input_tokens") or 0, get("output_tokens") or 0
    c, d = get("cache_creation_input_tokens") or 0, get("cache_read_input_tokens") or 0
    e = 0  # 1-hour cache writes, priced apart; only looked up when there are cache writes
    if c:
        split = get("cache_creation")
        if split.__class__ is dict:
            e = split.get("ephemeral_1h_input_tokens") or 0
    if (
        a.__class__ is int
        and b.__class__ is int
        and c.__class__ is int
        and d.__class__ is int
        and e.__class__ is int
    ):
        return Usage(a, b, c, d, e)
    return Usage(int(a), int(b), int(c), int(d), int(e))


_orjson_loads = orjson.loads
_OrjsonError = orjson.JSONDecodeError


#: 64-bit integers only on the fast path: orjson reads larger ones as floats, and the general
#: path keeps that behaviour.
_Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _CacheSplit(msgspec.Struct, gc=False):
    ephemeral_1h_input_tokens: _Int = 0


class _FastUsage(msgspec.Struct, gc=False):
    input_tokens: _Int = 0
    output_tokens: _Int = 0
    cache_creation_input_tokens: _Int = 0
    cache_read_input_tokens: _Int = 0
    cache_creation: _CacheSplit | None = None


class _FastBlock(msgspec.Struct, gc=False):
    type: str
    text: str | None = None


class _FastMessage(msgspec.Struct, gc=False):
    content: list[_FastBlock] | None = None
    stop_reason: str | None = None
    model: str | None = None
    usage: _FastUsage | None = None


class _FastResult(msgspec.Struct, gc=False):
    type: str
    message: _FastMessage | None = None


class _FastLine(msgspec.Struct, gc=False):
    """The fields of a result line ``parse_result_line`` keeps, with their usual JSON types.

    A line whose kept fields have other types (a null token count, a non-string model, ...) is
    refused by the decoder and parsed by the general path, which knows every variant.
    """

    custom_id: str
    result: _FastResult


_fast_decode = msgspec.json.Decoder(_FastLine).decode
#: Incl. invalid UTF-8 (UnicodeDecodeError) and deep nesting (msgspec raises RecursionError even
#: inside fields it skips): the general path then decides, and refuses such a line cleanly.
_FastError = (msgspec.MsgspecError, ValueError, RecursionError)


def parse_result_line(line: str | bytes) -> BatchResult:
    """Parse one JSONL line. Raises ResultLineError when the line is not a result object."""
    try:
        obj = _fast_decode(line)
    except _FastError:
        return _parse_general(line)
    result = obj.result
    message = result.message
    if result.type != SUCCEEDED or message is None:
        return _parse_general(line)
    content = message.content
    text = None
    if content:
        for block in content:
            if block.type != "text":  # tool use and other blocks: the general path
                return _parse_general(line)
        if len(content) == 1:
            text = content[0].text or ""
        else:
            text = "".join([block.text or "" for block in content])
    raw_usage = message.usage
    if raw_usage is None:
        usage = Usage()
    else:
        c = raw_usage.cache_creation_input_tokens
        split = raw_usage.cache_creation
        usage = Usage(
            raw_usage.input_tokens,
            raw_usage.output_tokens,
            c,
            raw_usage.cache_read_input_tokens,
            split.ephemeral_1h_input_tokens if c and split is not None else 0,
        )
    return BatchResult(obj.custom_id, SUCCEEDED, text, None, message.stop_reason, message.model, usage)


def _parse_general(line: str | bytes) -> BatchResult:
    """``parse_result_line`` for every line: all result types and every variant of the fields."""
    try:
        try:
            obj = _orjson_loads(line)
        except _OrjsonError:
            obj = json.loads(line)  # orjson is stricter (lone surrogates, NaN): keep json's acceptance
        custom_id: str = obj["custom_id"]  # (a JSON number passes through unchanged)
        result = obj["result"]
        kind = result["type"]
        if custom_id.__class__ not in (str, int) or kind.__class__ is not str:
            # (JSON numbers as custom_ids have always been passed through; a list, an object or
            # null cannot name a record)
            raise TypeError("custom_id must be a string and result.type a string")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # RecursionError: ``json`` on thousands of nested brackets (orjson refuses them first).
        preview = line[:120] if isinstance(line, str) else line[:120].decode("utf-8", "replace")
        raise ResultLineError(f"unparseable result line ({exc}): {preview!r}") from None
    if kind == SUCCEEDED:
        message = result.get("message") or _EMPTY
        text = None
        tool_input = None
        content = message.get("content")
        if content:
            texts = []
            for block in content:
                block_type = block.get("type")
                if block_type == "text":
                    texts.append(block.get("text") or "")
                elif block_type == "tool_use" and tool_input is None:
                    tool_input = block.get("input")
            if texts:
                text = texts[0] if len(texts) == 1 else "".join(texts)
        raw_usage = message.get("usage")
        usage = _usage_fast(raw_usage) if raw_usage.__class__ is dict else _usage(raw_usage)
        return BatchResult(
            custom_id, kind, text, tool_input, message.get("stop_reason"), message.get("model"), usage
        )
    out = BatchResult(custom_id, kind)
    if kind == ERRORED:
        envelope = result.get("error") or {}
        inner = envelope.get("error") if isinstance(envelope.get("error"), dict) else envelope
        out.error_type = inner.get("type")  # type: ignore[union-attr]  # envelope is a dict or {}
        out.error_message = inner.get("message")  # type: ignore[union-attr]
    return out


#: A custom_id as the API allows them (``^[a-zA-Z0-9_-]{1,64}$``), read from a line's raw bytes.
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"([A-Za-z0-9_-]{1,64})"')


def parse_result_line_or_bad(line: bytes) -> BatchResult:
    """``parse_result_line``, except that a line that is not a result object becomes a result of
    type ``UNPARSEABLE`` (the load rejects it) instead of an error that stops the whole load.

    Its custom_id is read from the raw bytes when they hold one (the first ``"custom_id": "..."``,
    e.g. in a line with invalid UTF-8 or torn JSON); otherwise it is ``""``: a line nobody can
    attribute, which the caller counts and logs (with the ledger, the record it should have
    answered then ends as ``missing_result``).
    """
    try:
        return parse_result_line(line)
    except ResultLineError as exc:
        found = _CUSTOM_ID.search(line if isinstance(line, bytes) else line.encode("utf-8", "replace"))
        custom_id = found.group(1).decode("ascii") if found else ""
        return BatchResult(custom_id, UNPARSEABLE, error_message=str(exc))

"""Parse result lines of a batch (one JSON object per line) into small, flat records.

Result files can be millions of lines, so parsing works on raw lines and keeps only what
validation and cost accounting need, instead of building the SDK's pydantic objects per line.
Lines are decoded with ``orjson`` (several times faster than ``json`` on these ~1 KB objects);
the rare line orjson refuses but ``json`` accepts (a lone UTF-16 surrogate escape, ``NaN``) goes
through ``json`` so the accepted input is exactly what it was before orjson.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

SUCCEEDED = "succeeded"
ERRORED = "errored"
CANCELED = "canceled"
EXPIRED = "expired"


@dataclass(slots=True)
class Usage:
    """Token usage of one request (zeros for requests that never ran)."""

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


@dataclass(slots=True)
class BatchResult:
    """One result line, flattened."""

    custom_id: str
    type: str
    text: str | None = None
    tool_input: Any = None
    stop_reason: str | None = None
    model: str | None = None
    usage: Usage = field(default_factory=Usage)
    error_type: str | None = None
    error_message: str | None = None


class ResultLineError(ValueError):
    """A line of the results file is not a result object (truncated download, corruption)."""


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


def parse_result_line(line: str | bytes) -> BatchResult:
    """Parse one JSONL line. Raises ResultLineError when the line is not a result object."""
    try:
        try:
            obj = _orjson_loads(line)
        except _OrjsonError:
            obj = json.loads(line)  # orjson is stricter (lone surrogates, NaN): keep json's acceptance
        custom_id = obj["custom_id"]
        result = obj["result"]
        kind = result["type"]
    except (ValueError, KeyError, TypeError) as exc:
        preview = line[:120] if isinstance(line, str) else line[:120].decode("utf-8", "replace")
        raise ResultLineError(f"unparseable result line ({exc}): {preview!r}") from None
    if kind == SUCCEEDED:
        message = result.get("message") or _EMPTY
        text = None
        tool_input = None
        content = message.get("content")
        if content:
            first = content[0] if len(content) == 1 else None
            if first.__class__ is dict and first.get("type") == "text":  # the usual answer
                text = first.get("text") or ""
            else:
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
        if raw_usage.__class__ is dict:  # the common case, inline: a dict of ints
            get = raw_usage.get
            a, b = get("input_tokens") or 0, get("output_tokens") or 0
            c, d = get("cache_creation_input_tokens") or 0, get("cache_read_input_tokens") or 0
            if c or not (a.__class__ is b.__class__ is d.__class__ is int):
                usage = _usage_fast(raw_usage)  # 1-hour cache writes to look up, or conversions
            else:
                usage = Usage(a, b, 0, d, 0)
        else:
            usage = _usage(raw_usage)
        return BatchResult(
            custom_id, kind, text, tool_input, message.get("stop_reason"), message.get("model"), usage
        )
    out = BatchResult(custom_id, kind)
    if kind == ERRORED:
        envelope = result.get("error") or {}
        inner = envelope.get("error") if isinstance(envelope.get("error"), dict) else envelope
        out.error_type = inner.get("type")
        out.error_message = inner.get("message")
    return out

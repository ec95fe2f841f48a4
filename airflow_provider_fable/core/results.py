"""Parse result lines of a batch (one JSON object per line) into small, flat records.

Result files can be millions of lines, so parsing works on raw lines with ``json.loads`` and
keeps only what validation and cost accounting need, instead of building the SDK's pydantic
objects per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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


def parse_result_line(line: str | bytes) -> BatchResult:
    """Parse one JSONL line. Raises ResultLineError when the line is not a result object."""
    try:
        obj = json.loads(line)
        custom_id = obj["custom_id"]
        result = obj["result"]
        kind = result["type"]
    except (ValueError, KeyError, TypeError) as exc:
        preview = line[:120] if isinstance(line, str) else line[:120].decode("utf-8", "replace")
        raise ResultLineError(f"unparseable result line ({exc}): {preview!r}") from None
    out = BatchResult(custom_id=custom_id, type=kind)
    if kind == SUCCEEDED:
        message = result.get("message") or {}
        out.stop_reason = message.get("stop_reason")
        out.model = message.get("model")
        out.usage = _usage(message.get("usage"))
        texts = []
        for block in message.get("content") or ():
            if block.get("type") == "text":
                texts.append(block.get("text") or "")
            elif block.get("type") == "tool_use" and out.tool_input is None:
                out.tool_input = block.get("input")
        out.text = "".join(texts) if texts else None
    elif kind == ERRORED:
        envelope = result.get("error") or {}
        inner = envelope.get("error") if isinstance(envelope.get("error"), dict) else envelope
        out.error_type = inner.get("type")
        out.error_message = inner.get("message")
    return out

"""Split a stream of requests into batches that stay under the API's per-batch limits.

Limits (Message Batches API): at most 100,000 requests and 256 MB of request body per batch.
Sizes are measured on the UTF-8 JSON encoding of each request plus the envelope, with a safety
margin, because a 413 after uploading 250 MB is an expensive way to learn the body was too big.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

MAX_REQUESTS_PER_BATCH = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024
#: Room left for the envelope ``{"requests":[...]}``, separators and serializer differences.
SAFETY_MARGIN = 0.98


def request_size(request: dict[str, Any]) -> int:
    """Bytes this request adds to the create body (compact JSON, UTF-8, plus one comma)."""
    return len(json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()) + 1


def shard_requests(
    requests: Iterable[dict[str, Any]],
    *,
    max_requests: int = MAX_REQUESTS_PER_BATCH,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[list[dict[str, Any]]]:
    """Yield lists of requests, each under both limits. A single oversize request is an error."""
    budget = int(max_bytes * SAFETY_MARGIN) - len(b'{"requests":[]}')
    shard: list[dict[str, Any]] = []
    size = 0
    for request in requests:
        n = request_size(request)
        if n > budget:
            raise ValueError(
                f"request {request.get('custom_id')!r} alone is {n} bytes, over the {budget}-byte "
                "batch budget; shorten its input"
            )
        if shard and (len(shard) >= max_requests or size + n > budget):
            yield shard
            shard, size = [], 0
        shard.append(request)
        size += n
    if shard:
        yield shard

"""custom_id codec: the record's real id is the custom_id whenever the API allows it.

The API accepts custom_ids matching ``^[a-zA-Z0-9_-]{1,64}$``, unique within a batch. Ids that fit
are sent as they are, so a result line names its record with no lookup. Ids that do not fit
(emails, ``ZD#123``, paths, unicode, keys over 64 characters) are *encoded* deterministically:
a readable slug plus a 96-bit hash of the real id. Determinism matters: a retry or a re-run
builds byte-identical requests, which is what lets the ledger re-attach instead of paying again.
The custom_id -> real id mapping of encoded ids is kept in the ledger (``fable_records``), and
the load maps results back through it before anything is written.

Missing ids and booleans stay errors naming the record; duplicates are caught by the caller.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from airflow_provider_fable.core.errors import RecordError

#: The API's rule. Always use ``fullmatch``: with ``match``, ``$`` lets a trailing newline through.
CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
#: Encoded ids start with this; a real id that happens to look encoded is still used as it is,
#: and a collision with an encoded id of another record is reported as a duplicate.
ENCODED_PREFIX = "enc-"
_SLUG_BAD = re.compile(r"[^a-zA-Z0-9_-]+")
_SLUG_LEN = 30
_HASH_LEN = 24  # hex digits: 96 bits, collisions are not a practical concern


def record_id_text(record_id: Any) -> str:
    """The canonical text of a record id (what the destination's id column holds)."""
    if record_id is None or (isinstance(record_id, float) and record_id != record_id):
        raise RecordError(record_id, "custom_id.missing", "the id field is empty")
    if isinstance(record_id, bool):
        raise RecordError(record_id, "custom_id.type", "a boolean is not a usable record id")
    if isinstance(record_id, float) and record_id.is_integer():
        record_id = int(record_id)
    text = str(record_id)
    if not text:
        raise RecordError(record_id, "custom_id.missing", "the id field is an empty string")
    return text


def is_native(text: str) -> bool:
    """Whether ``text`` can be sent as a custom_id unchanged."""
    return CUSTOM_ID_RE.fullmatch(text) is not None


def encode(record_id: Any) -> str:
    """Turn a record id into a custom_id: itself when it fits the API's rule, else its encoding."""
    text = record_id_text(record_id)
    if is_native(text):
        return text
    slug = _SLUG_BAD.sub("-", text).strip("-")[:_SLUG_LEN]
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]
    return f"{ENCODED_PREFIX}{slug}-{digest}" if slug else f"{ENCODED_PREFIX}{digest}"


def decode(custom_id: str, mapping: dict[str, str] | None = None) -> str:
    """Map a custom_id from a result line back to the record id.

    Native ids are their own record id; encoded ids need the ledger's mapping (``mapping``).
    The load operator rewrites result custom_ids through the ledger before validation, so
    code downstream of it sees real ids either way.
    """
    if mapping:
        return mapping.get(custom_id, custom_id)
    return custom_id

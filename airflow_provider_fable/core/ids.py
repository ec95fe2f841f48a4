"""custom_id handling: the record's real id is the custom_id, so results map back without a lookup.

The API accepts custom_ids matching ``^[a-zA-Z0-9_-]{1,64}$`` and unique within a batch. Ids that
break the rule are rejected here, before anything is sent, with the record named; an encoding
scheme for such ids is a deliberate later extension point (``encode``/``decode`` are the seam).
"""

from __future__ import annotations

import re
from typing import Any

from airflow_provider_fable.core.errors import RecordError

#: The API's rule. Always use ``fullmatch``: with ``match``, ``$`` lets a trailing newline through.
CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def encode(record_id: Any) -> str:
    """Turn a record id into a custom_id, or raise RecordError naming the record and the rule."""
    if record_id is None or (isinstance(record_id, float) and record_id != record_id):
        raise RecordError(record_id, "custom_id.missing", "the id field is empty")
    if isinstance(record_id, bool):
        raise RecordError(record_id, "custom_id.type", "a boolean is not a usable record id")
    if isinstance(record_id, float) and record_id.is_integer():
        record_id = int(record_id)
    text = str(record_id)
    if not CUSTOM_ID_RE.fullmatch(text):
        raise RecordError(
            record_id,
            "custom_id.pattern",
            "ids must be 1-64 characters of letters, digits, '_' or '-' to be used as custom_id",
        )
    return text


def decode(custom_id: str) -> str:
    """Map a custom_id from a result line back to the record id (identity for real ids)."""
    return custom_id

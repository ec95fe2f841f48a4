"""The small manifests that travel between tasks through XCom.

Submit returns ``{"batch_ids": [...], ...}`` and the sensor returns the same key, so every
downstream parameter that takes batch ids also takes either manifest.
"""

from __future__ import annotations

from typing import Any


def normalise_batch_ids(value: Any) -> list[str]:
    """Ids from a list, one id, or a manifest; duplicates dropped (first occurrence wins)."""
    if isinstance(value, dict):
        value = value.get("batch_ids")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"batch_ids must be a list of batch id strings (or a manifest), got {value!r}")
    return list(dict.fromkeys(value))


def flag(value: Any, what: str = "flag") -> bool:
    """A templated boolean: a rendered template is a string ("True", "false", "1", "")."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "", "none", "null"):
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")

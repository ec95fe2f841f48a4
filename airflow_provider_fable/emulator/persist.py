"""The emulator's controllable clock and its optional state file.

Both exist for the same reason: a batch's life is measured in hours (24 h to expiry, 29 days
of results), which a test cannot wait for and a long-lived emulator must not forget when it
restarts. The clock is wall time plus an offset that ``/_emulator/clock`` can move forward;
the state file is SQLite, written at every state change of a batch (create, cancel, end,
delete), so a restart loses nothing a client could have observed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["Clock", "StateFile"]


class Clock:
    """Wall time plus an offset; ``advance`` moves it forward (never back: time is monotonic)."""

    def __init__(self, base: Callable[[], float] = time.time, offset: float = 0.0) -> None:
        self._base = base
        self._offset = float(offset)
        self._lock = threading.Lock()
        self.on_change: Callable[[float], None] | None = None

    def __call__(self) -> float:
        return self._base() + self._offset

    @property
    def offset(self) -> float:
        return self._offset

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward; returns the new offset."""
        if seconds < 0:
            raise ValueError("the emulated clock only moves forward")
        with self._lock:
            self._offset += seconds
            offset = self._offset
        if self.on_change is not None:
            self.on_change(offset)
        return offset


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    meta TEXT NOT NULL,
    requests TEXT,
    lines BLOB,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StateFile:
    """Batches and the clock offset in one SQLite file (one connection, serialised by a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def save_batch(
        self,
        batch_id: str,
        seq: int,
        meta: dict[str, Any],
        requests: list[tuple[str, Any]] | None,
        lines: list[bytes] | None,
    ) -> None:
        """Insert or replace one batch (params until it ends, its results file afterwards)."""
        req_json = None if requests is None else json.dumps(requests, ensure_ascii=False)
        blob = None if lines is None else b"".join(lines)
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO batches (id, seq, meta, requests, lines, deleted) VALUES (?, ?, ?, ?, ?, 0)",
                (batch_id, seq, json.dumps(meta), req_json, blob),
            )

    def mark_deleted(self, batch_id: str) -> None:
        """Forget a batch's content but keep its id usable as a list cursor."""
        with self._lock:
            self._conn.execute(
                "UPDATE batches SET deleted = 1, requests = NULL, lines = NULL WHERE id = ?", (batch_id,)
            )

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def load(
        self,
    ) -> Iterator[tuple[str, int, dict[str, Any], list[tuple[str, Any]] | None, list[bytes] | None, bool]]:
        """Every stored batch in creation order: (id, seq, meta, requests, lines, deleted)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, seq, meta, requests, lines, deleted FROM batches ORDER BY seq"
            ).fetchall()
        for batch_id, seq, meta, requests, blob, deleted in rows:
            reqs = None if requests is None else [(c, p) for c, p in json.loads(requests)]
            lines = None if blob is None else [line + b"\n" for line in bytes(blob).split(b"\n")[:-1]]
            yield batch_id, seq, json.loads(meta), reqs, lines, bool(deleted)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

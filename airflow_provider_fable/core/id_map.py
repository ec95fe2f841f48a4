"""custom_id -> record id for encoded ids, in bounded memory: a dict up to 100k, then SQLite.

Why: a record id that does not fit the API's custom_id rule (an e-mail address, ``ZD#123``)
travels as an encoded custom_id (``core.ids``: ``enc-`` + a digest), which cannot be turned
back into the id. The submit must remember each one until its shard's ledger rows are written,
and the duplicate check must name the first of two records whose encodings match. As a dict
that is ~150 bytes a record: 1.5 GB for a 10M-record CRM backlog keyed by e-mail, three times
the submit's memory budget. Here the newest ``IN_MEMORY`` pairs stay in a dict and older ones are
written to a SQLite file in a private temporary directory of the task (removed by ``close``,
or when the object is collected), read back by primary key when asked for. Jobs with native
ids never write an entry, so they never touch the disk.

Nothing is shared through the disk between tasks: the file lives and dies with one submit.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile

#: Pairs held in memory before they are moved to the file (~15 MB of short ids).
IN_MEMORY = 100_000


class IdMap:
    """A ``dict[str, str]`` for ``get``/``[]=``/``in``/``len``, spilled to SQLite past ``IN_MEMORY``.

    ``first_wins``: a key set again keeps its first value (the duplicate check's map: the first
    record that had a custom_id is the one to name); otherwise the last value wins, as in a dict.
    A look-up of a spilled key is a primary-key probe (~10 us): ``get_many`` probes a whole list
    at once, and the duplicate check reads the map only to name the records of a duplicate.
    """

    def __init__(self, in_memory: int | None = None, *, first_wins: bool = False) -> None:
        self._limit = in_memory or IN_MEMORY
        self._first_wins = first_wins
        self._recent: dict[str, str] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._db: sqlite3.Connection | None = None

    def __setitem__(self, key: str, value: str) -> None:
        if self._first_wins:
            self._recent.setdefault(key, value)
        else:
            self._recent[key] = value
        if len(self._recent) >= self._limit:
            self._flush()

    def get(self, key: str, default: str | None = None) -> str | None:
        if self._first_wins and self._db is not None:
            # The file holds the older values: first-wins looks there first.
            row = self._db.execute("SELECT v FROM ids WHERE k = ?", (key,)).fetchone()
            if row is not None:
                return str(row[0])
            return self._recent.get(key, default)
        value = self._recent.get(key)
        if value is not None:
            return value
        if self._db is None:
            return default
        row = self._db.execute("SELECT v FROM ids WHERE k = ?", (key,)).fetchone()
        return row[0] if row is not None else default

    def get_many(self, keys: list[str]) -> dict[str, str]:
        """The values of those ``keys`` that are in the map, probed 500 at a time in the file."""
        if self._first_wins:
            return {k: v for k in keys if (v := self.get(k)) is not None}
        found = {k: v for k in keys if (v := self._recent.get(k)) is not None}
        if self._db is not None:
            rest = [k for k in keys if k not in found]
            for start in range(0, len(rest), 500):
                part = rest[start : start + 500]
                marks = ",".join("?" * len(part))
                found.update(self._db.execute(f"SELECT k, v FROM ids WHERE k IN ({marks})", part).fetchall())
        return found

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __len__(self) -> int:
        if self._db is None:
            return len(self._recent)
        self._flush()
        return int(self._db.execute("SELECT count(*) FROM ids").fetchone()[0])

    @property
    def spilled(self) -> bool:
        """Whether pairs went to the file."""
        return self._db is not None

    def _flush(self) -> None:
        if not self._recent:
            return
        if self._db is None:
            self._dir = tempfile.TemporaryDirectory(prefix="fable-id-map-")
            # Autocommit, no journal, no fsync: a scratch file nobody else reads, gone at close.
            self._db = sqlite3.connect(
                os.path.join(self._dir.name, "ids.sqlite"), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute("CREATE TABLE ids (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID")
        self._db.execute("BEGIN")
        verb = "INSERT OR IGNORE" if self._first_wins else "INSERT OR REPLACE"
        self._db.executemany(f"{verb} INTO ids VALUES (?, ?)", self._recent.items())
        self._db.execute("COMMIT")
        self._recent = {}

    def close(self) -> None:
        """Drop everything (the file included); the map is empty and usable again afterwards."""
        self._recent = {}
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
